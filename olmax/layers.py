"""Olmax's building blocks: norms, causal convolution, MoE, and the primitives the
mixers (olmax/mixers.py) share: the decode cache, shifts, rotary positions.

Every block takes the residual stream `x: [batch, length, features]` plus a
`Context` (segment ids and positions of packed examples) and returns
`(y: [batch, length, features], aux: dict of scalars)`. Blocks never mix across
segments, and never let position t see a position s > t.

Einsum letters used throughout:
  b batch, t/s sequence positions, d features (embed), f hidden features (mlp),
  h channel groups / heads, c channels per group, n/m mixer blocks,
  k/j offsets inside a mixer block, e experts, x expert capacity slots, w window taps.

Parameters are stored in fp32 and cast to `config.dtype` for compute; norms,
softmaxes and the router run in fp32.

Cached decoding. Every block also takes `decode`, one of DECODE_MODES:
  None       the plain forward over whole sequences (training, scoring);
  "init"     create the block's zero cache for x [b, L, d], L the longest sequence
             to decode (T5X's cache-creation call), and return zeros;
  "prefill"  the plain forward over a prompt x [b, L, d] (one segment per row),
             storing in the cache the state after the first `ctx.prefill_lengths[b]`
             positions of each row (later positions are padding);
  "step"     one new position per row, x [b, 1, d] at `ctx.positions` [b, 1], from
             and into the cache: the work of one position, not of the prefix.
Cache leaves are flax variables in the `cache` collection, batch on axis 0, stored
in `config.dtype` (the dtype the full forward computes in, so that a step repeats
the full forward's arithmetic), each created by `cache_variable` with its logical
axis names (recorded in `cache_axes`, the partitioning T5X reads). Per block kind:
  conv       the last k-1 inputs of each of its two convolutions: `inputs` [b, k-1, d]
             and `hidden` [b, k-1, conv_features];
  mixers     see olmax/mixers.py;
  moe        nothing. Decoding is dropless: a step routes its one token alone (a
             group of one, which no capacity can drop) and a prefill lifts the
             capacity, so cached decoding equals the full forward whenever the full
             forward dropped no token.
Entries at or past a row's position are never read before a step writes them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import partitioning as nn_partitioning

from olmax.config import OlmaxConfig

Array = jax.Array
param_with_axes = nn_partitioning.param_with_axes
constrain = nn.with_logical_constraint

AUX_KEYS = ("moe_lb_loss", "moe_z_loss", "moe_dropped", "moe_max_load")


def zero_aux() -> dict[str, Array]:
    return {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Context:
    """Per-token side inputs shared by every block.

    segment_ids: [batch, length] int32; tokens mix only within equal ids (packing).
      0 marks padding (it forms its own segment, so it never leaks into real tokens).
    positions: [batch, length] int32; position of each token inside its segment.
    prefill_lengths: [batch] int32, decode="prefill" only: the prompt length of
      each row (the cache keeps the state after that many positions).
    packed: static; False when every row is one segment (the caller gave no segment ids),
      which lets a kernel without a segment mask (cuDNN attention) run.
    """

    segment_ids: Array
    positions: Array
    prefill_lengths: Array | None = None
    packed: bool = dataclasses.field(default=True, metadata=dict(static=True))


DECODE_MODES = (None, "init", "prefill", "step")


def activation(name: str) -> Callable[[Array], Array]:
    return {
        "gelu": nn.gelu,
        "relu": nn.relu,
        "silu": nn.silu,
        "leaky_relu": functools.partial(nn.leaky_relu, negative_slope=0.01),
    }[name]


def fan_in_normal(fan_in_axes: tuple[int, ...]):
    """Truncated-normal init with variance 1 / fan_in over the given axes."""

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[a] for a in fan_in_axes)
        std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978  # unit variance after truncation
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


def shift_right(x: Array, lag: int, axis: int = 1) -> Array:
    """x[t - lag] at t along `axis`, zeros for t < lag."""
    if lag == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (lag, 0)
    x = jnp.pad(x, pad)
    return jax.lax.slice_in_dim(x, 0, x.shape[axis] - lag, axis=axis)


# ------------------------------------------------------------------- decode cache


CACHE_AXES_COLLECTION = "cache_axes"


def cache_variable(
    module: nn.Module, decode: str, name: str, shape: tuple[int, ...], dtype, axes: tuple[str | None, ...] | None = None
) -> nn.Variable:
    """The block's cache leaf `name`: created as zeros of `shape` when decode == "init",
    required to exist otherwise.

    `axes` are the leaf's logical axis names (from olmax.axes.ACTIVATION_AXES, None for
    a replicated axis); default: batch on axis 0, the rest replicated. They are the one
    source of the cache's partitioning: every write is constrained to them, and they
    are recorded in the `cache_axes` collection (leaf `<name>_axes`) as flax's
    `variable_with_axes` does, where T5X looks for them.
    """
    if decode != "init" and not module.has_variable("cache", name):
        raise ValueError(
            f"decode={decode!r} needs the decode cache, which is missing: create it first with "
            "module.apply({'params': params}, tokens[batch, max_length], decode=True, mutable=['cache'])."
        )
    axes = ("activation_batch",) + (None,) * (len(shape) - 1) if axes is None else tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"Cache leaf {name!r} has shape {shape} but logical axes {axes}; give one name per axis.")
    return nn_partitioning.variable_with_axes("cache", name, jnp.zeros, shape, dtype, axes=axes, module=module)


def last_positions(x: Array, lengths: Array, n: int) -> Array:
    """x[b, lengths[b] - n + i] for i < n, zeros where that index is negative.

    x: [b, t, ...], lengths: [b] -> [b, n, ...]: the window a cache keeps after a prefill.
    """
    idx = lengths[:, None] - n + jnp.arange(n)[None, :]  # [b, n]
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    out = jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1), axis=1)
    return jnp.where(idx >= 0, out, jnp.zeros((), x.dtype))


def write_position(cache: Array, x: Array, positions: Array) -> Array:
    """cache[b, positions[b]] = x[b, 0]; a position past the end is dropped.

    cache: [b, L, ...], x: [b, 1, ...], positions: [b] -> [b, L, ...].
    """
    rows = jnp.arange(cache.shape[0])
    return cache.at[rows, positions].set(x[:, 0].astype(cache.dtype), mode="drop")


def pad_to(x: Array, length: int, what: str) -> Array:
    """Zero-pad axis 1 of x to `length` (a prefill's prompt to the cache length)."""
    if x.shape[1] > length:
        raise ValueError(
            f"The prompt has {x.shape[1]} positions but the {what} cache holds {length}; "
            "create the cache with tokens at least as long as prompt plus generation."
        )
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def slide(window: nn.Variable, x: Array) -> Array:
    """Append x [b, 1, ...] to the cached last-n window [b, n, ...].

    Returns the n+1 values ending at the new position (oldest first) and keeps
    the last n of them in the cache.
    """
    full = jnp.concatenate([window.value, x.astype(window.value.dtype)], axis=1)
    window.value = full[:, 1:]
    return full


# ----------------------------------------------------------------------------- norms


class Norm(nn.Module):
    """RMSNorm (`kind="rms"`: x / sqrt(mean(x^2) + eps) * scale) or LayerNorm, fp32 inside."""

    config: OlmaxConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        if cfg.norm == "layer":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
        y = y * param_with_axes("scale", nn.initializers.ones, (d,), axes=("norm",))
        if cfg.norm == "layer":
            y = y + param_with_axes("bias", nn.initializers.zeros, (d,), axes=("norm",))
        return y.astype(x.dtype)


# ------------------------------------------------------------------ causal convolution


def matmul(x: Array, kernel: Array, groups: int = 1) -> Array:
    """x [..., i] times kernel [i, ...] -> [..., ...], written as one 2-D matmul [(...), i] x [i, (...)].

    As an einsum over x's batch and length axes ("btd,de->bte") the backward's products
    dX = dY K^T and dK = X^T dY reach XLA:CPU as a transposed copy of dY or X, made every
    layer of every step; on 2-D operands the transposes fold into the dot. Same sums either way.

    groups > 1: kernel is [groups, i, ...] (`per_data_shard`), x's leading axis splits into
    `groups` equal parts, and part g meets kernel[g]: a batched matmul [g, (...), i] x [g, i, (...)].
    """
    if groups > 1:
        lead, tail = x.shape[:-1], kernel.shape[2:]
        xg = x.reshape(groups, -1, x.shape[-1])
        return jnp.matmul(xg, kernel.reshape(groups, kernel.shape[1], -1)).reshape(*lead, *tail)
    lead, tail = x.shape[:-1], kernel.shape[1:]
    return (x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[0], -1)).reshape(*lead, *tail)


def data_shards(batch: int) -> int:
    """Into how many data-parallel parts the active mesh and logical axis rules split a batch
    axis ('activation_batch'): 1 outside a mesh, or when `batch` does not divide evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    parts = math.prod(mesh.shape[n] for n in _batch_mesh_axes())
    return parts if parts > 1 and batch % parts == 0 else 1


def _mesh_names(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _batch_mesh_axes() -> tuple[str, ...]:
    """The mesh axes the active logical axis rules give 'activation_batch'."""
    return _mesh_names(nn.logical_to_mesh_axes(("activation_batch",))[0])


def per_data_shard(w: Array, parts: int, axes: tuple) -> Array:
    """w (logical axes `axes`) as [parts, *w.shape], one copy per data-parallel shard, laid out
    like the batch (`data_shards`); w itself when parts == 1.

    For weights used inside a scan over chunks of the row (the recall mixer's projection, the
    conv block): each chunk's weight gradient sums over the batch, which is split over the data
    axis, so GSPMD all-reduces it inside the loop, once per chunk, to add it to the loop's
    gradient carry, which is replicated like w. With a copy per shard, each shard's carry sums its
    own chunks and the broadcast's transpose, after the loop, all-reduces once. A compiler that
    sinks such all-reduces out of loops by itself (XLA's while-loop all-reduce code motion) gets
    the same program; one that does not moves the gradient of those weights once a step, not
    once a chunk."""
    if parts == 1:
        return w
    batch = _batch_mesh_axes()
    own = [tuple(n for n in _mesh_names(e) if n not in batch) or None for e in nn.logical_to_mesh_axes(axes)]
    spec = jax.sharding.PartitionSpec(batch or None, *[e[0] if e and len(e) == 1 else e for e in own])
    return jax.lax.with_sharding_constraint(jnp.broadcast_to(w, (parts, *w.shape)), spec)


def causal_conv(x: Array, kernel: Array, segment_ids: Array, groups: int = 1) -> Array:
    """Causal, segment-masked convolution.

    x: [b, t, i], kernel: [w, i, o] (tap w-1 multiplies x[t], tap 0 x[t-w+1]),
    segment_ids: [b, t] (`Context`) -> [b, t, o]. groups > 1: kernel [groups, w, i, o], one copy
    per data-parallel shard of the batch (`per_data_shard`).
    A lag that crosses a segment boundary is masked per (position, lag), which XLA's
    convolution cannot express, so the conv is one matmul over a w-wide window of the
    narrower side: when i <= o, the masked, shifted inputs stacked to [b, t, w, i] times
    the kernel as [w i, o]; otherwise x times the kernel as [i, w o] and the w outputs
    shifted, masked and summed. One large matmul and w copies of min(i, o) channels beat
    w matmuls with w shifted copies of x (~1.4x for the tiny model's conv block, fwd+bwd).
    """
    width = kernel.shape[-3]
    same = {lag: (segment_ids == shift_right(segment_ids, lag))[..., None] for lag in range(1, width)}

    def shifted(a: Array, lag: int) -> Array:  # a[t - lag], zero across a segment start
        return shift_right(a, lag) * same[lag].astype(a.dtype) if lag else a

    bsz, length, i = x.shape
    o = kernel.shape[-1]
    lead = kernel.shape[:-3]  # (groups,) or ()
    # Both as 2-D matmuls (`matmul`): on [b, t, w, i] the backward made transposed copies of
    # the kernel and the windows (small config: 12% of the CPU step).
    if i <= o:
        window = jnp.stack([shifted(x, width - 1 - tap) for tap in range(width)], axis=2)  # [b, t, w, i]
        return matmul(window.reshape(bsz, length, width * i), kernel.reshape(*lead, width * i, o), groups)
    wide = jnp.swapaxes(kernel, -3, -2)  # [.., i, w, o]
    z = matmul(x, wide, groups)  # [b, t, w, o]: z[:, s, tap] = x[s] @ kernel[tap]
    return sum(shifted(z[:, :, width - 1 - lag], lag) for lag in range(width))


def time_chunked(fn: Callable[[Array, Array], Array], x: Array, segment_ids: Array, chunk: int, reach: int) -> Array:
    """fn(x, segment_ids) for a causal, segment-masked fn of the row (output t depends on inputs
    t - reach .. t of its segment), computed `chunk` positions at a time: a scan over the row
    whose steps see their chunk and the `reach` positions before it, each step recomputed in
    the backward pass. The step's intermediates are those of batch x (chunk + reach)
    positions, not of the whole row. x: [b, t, i], segment_ids: [b, t] -> [b, t, o].
    A row of at most `chunk` positions runs fn once.
    """
    bsz, length = segment_ids.shape
    if length <= chunk:
        return fn(x, segment_ids)
    if reach > chunk:
        raise ValueError(f"a chunk of {chunk} positions cannot hold the {reach} before it that the output reads.")
    steps = -(-length // chunk)
    # `reach` positions of segment -1 (no real one) before the row, and a padded tail.
    pad = ((0, 0), (reach, steps * chunk - length))
    x = jnp.pad(x, pad + ((0, 0),) * (x.ndim - 2))
    seg = jnp.pad(segment_ids, pad, constant_values=-1)

    def windows(a: Array) -> Array:  # [b, reach + steps*chunk, ...] -> [steps, b, reach + chunk, ...]
        own = a[:, reach:].reshape(bsz, steps, chunk, *a.shape[2:])
        before = a[:, :steps * chunk].reshape(bsz, steps, chunk, *a.shape[2:])[:, :, :reach]  # original s*chunk - reach..
        return jnp.moveaxis(jnp.concatenate([before, own], axis=2), 1, 0)

    @jax.checkpoint
    def body(carry, parts):
        return carry, fn(*parts)[:, reach:]

    _, y = jax.lax.scan(body, None, (windows(x), windows(seg)))
    return jnp.moveaxis(y, 0, 1).reshape(bsz, steps * chunk, *y.shape[3:])[:, :length]


def conv_step(window: nn.Variable, x: Array, kernel: Array) -> Array:
    """One position of causal_conv from its cached last w-1 inputs.

    window: [b, w-1, i] cache, x: [b, 1, i], kernel: [w, i, o] -> [b, 1, o].
    """
    full = slide(window, x)  # [b, w, i]: x[t-w+1] .. x[t], tap w-1 on x[t]
    return jnp.einsum("bwi,wio->bo", full, kernel)[:, None]


class ConvBlock(nn.Module):
    """Causal conv (features -> conv_features), activation, causal conv back."""

    config: OlmaxConfig

    @nn.compact
    def __call__(self, x: Array, ctx: Context, decode: str | None = None) -> tuple[Array, dict]:
        cfg = self.config
        d, f, w = cfg.features, cfg.conv_features, cfg.conv_kernel
        k_in = param_with_axes("wi", fan_in_normal((0, 1)), (w, d, f), axes=("conv_window", "embed", "mlp"))
        k_out = param_with_axes("wo", fan_in_normal((0, 1)), (w, f, d), axes=("conv_window", "mlp", "embed"))
        k_in, k_out = k_in.astype(cfg.dtype), k_out.astype(cfg.dtype)
        act = activation(cfg.activation)
        if decode is not None:
            bsz, window = x.shape[0], ("activation_batch", None)
            inputs = cache_variable(self, decode, "inputs", (bsz, w - 1, d), cfg.dtype, window + ("activation_embed",))
            hidden = cache_variable(self, decode, "hidden", (bsz, w - 1, f), cfg.dtype, window + ("activation_mlp",))
            if decode == "init":
                return jnp.zeros_like(x), zero_aux()
            if decode == "step":
                h = act(conv_step(inputs, x, k_in))  # [b,1,d] -> [b,1,f]
                return conv_step(hidden, h, k_out), zero_aux()  # [b,1,f] -> [b,1,d]
        # cfg.reduce_chunk_grads_once: one copy of each kernel per data-parallel shard, so that the
        # chunks' weight gradients are all-reduced once a step, not once a chunk (`per_data_shard`).
        parts = data_shards(x.shape[0]) if cfg.reduce_chunk_grads_once else 1
        g_in, g_out = (per_data_shard(k, parts, ax) for k, ax in ((k_in, ("conv_window", "embed", "mlp")),
                                                                   (k_out, ("conv_window", "mlp", "embed"))))

        def branch(x: Array, seg: Array) -> tuple[Array, Array]:
            h = causal_conv(x, g_in, seg, parts)  # [b,t,d] -> [b,t,f]
            h = constrain(act(h), ("activation_batch", "activation_length", "activation_mlp"))
            return causal_conv(h, g_out, seg, parts), h  # [b,t,f] -> [b,t,d]

        if decode == "prefill":  # the caches need the whole row's h
            y, h = branch(x, ctx.segment_ids)
            inputs.value = last_positions(x, ctx.prefill_lengths, w - 1)
            hidden.value = last_positions(h, ctx.prefill_lengths, w - 1)
            return y, zero_aux()
        # Rows longer than conv_chunk: chunk by chunk, so that the stacked conv windows
        # ([b, t, w, d]) and h exist for one chunk at a time; the output reads 2 (w - 1) back.
        return time_chunked(lambda x, seg: branch(x, seg)[0], x, ctx.segment_ids, cfg.conv_chunk,
                            2 * (w - 1)), zero_aux()


# ------------------------------------------------------------------ mixture of experts


class MoE(nn.Module):
    """Routed top-k mixture of feed-forward experts with a capacity per expert.

    Tokens are routed in groups of `expert_group_size` consecutive positions of a
    row. Capacity slots are handed out in (position, choice) order, so whether a
    token is dropped depends only on itself and earlier tokens: the MoE stays
    causal (the usual "all first choices before any second choice" order is not).
    A dropped token's expert output is zero; the residual carries it on.

    Decoding keeps no cache and drops nothing: a step routes each row's one token
    as a group of one (its top-k distinct experts each have a slot), and a prefill
    gives every expert room for its whole group. Cached decoding therefore equals
    the full forward whenever the full forward dropped no token
    (capacity_factor >= num_experts / expert_top_k guarantees that).
    """

    config: OlmaxConfig

    @nn.compact
    def __call__(self, x: Array, ctx: Context, decode: str | None = None) -> tuple[Array, dict]:
        cfg = self.config
        bsz, length, d = x.shape
        e, f, top_k = cfg.num_experts, cfg.expert_features, cfg.expert_top_k
        router = param_with_axes("router", fan_in_normal((0,)), (d, e), axes=("embed", "expert"))
        wi = param_with_axes("wi", fan_in_normal((1,)), (e, d, f), axes=("expert", "embed", "mlp"))
        wo = param_with_axes("wo", fan_in_normal((1,)), (e, f, d), axes=("expert", "mlp", "embed"))
        if decode == "init":
            return jnp.zeros_like(x), zero_aux()

        g = min(cfg.expert_group_size, length)
        n_groups = -(-length // g)
        pad = n_groups * g - length
        xg = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(bsz * n_groups, g, d)
        real = jnp.pad(ctx.segment_ids != 0, ((0, 0), (0, pad))).reshape(bsz * n_groups, g)
        capacity = max(1, math.ceil(cfg.capacity_factor * top_k * g / e))
        if decode == "prefill":  # dropless, like the steps (see the class docstring)
            capacity = g

        logits = jnp.einsum("gsd,de->gse", xg.astype(jnp.float32), router)  # fp32 router
        probs = jax.nn.softmax(logits, axis=-1)
        gate, choice = jax.lax.top_k(probs, top_k)  # [G,s,k]
        gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
        onehot = jax.nn.one_hot(choice, e, dtype=jnp.int32) * real[..., None, None]  # [G,s,k,e]
        # Slot of each (token, choice) in its expert's queue, in (position, choice) order.
        flat = onehot.reshape(onehot.shape[0], g * top_k, e)
        slot = (jnp.cumsum(flat, axis=1) - flat).reshape(onehot.shape)
        keep = onehot * (slot < capacity)
        dispatch_k = keep[..., None] * jax.nn.one_hot(slot, capacity, dtype=jnp.int32)  # [G,s,k,e,x]
        dispatch = jnp.sum(dispatch_k, axis=2).astype(cfg.dtype)  # [G,s,e,x]
        combine = jnp.einsum("gsk,gskex->gsex", gate.astype(cfg.dtype), dispatch_k.astype(cfg.dtype))

        xe = jnp.einsum("gsex,gsd->gexd", dispatch, xg.astype(cfg.dtype))  # [G,e,x,d]
        xe = constrain(xe, ("activation_batch", "activation_expert", "activation_capacity", "activation_embed"))
        he = activation(cfg.activation)(jnp.einsum("gexd,edf->gexf", xe, wi.astype(cfg.dtype)))
        ye = jnp.einsum("gexf,efd->gexd", he, wo.astype(cfg.dtype))
        y = jnp.einsum("gsex,gexd->gsd", combine, ye).reshape(bsz, n_groups * g, d)[:, :length]

        n_real = jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)
        realf = real[..., None].astype(jnp.float32)
        frac_routed = jnp.sum(onehot[:, :, 0] * realf, axis=(0, 1)) / n_real  # first choices per expert
        mean_prob = jnp.sum(probs * realf, axis=(0, 1)) / n_real
        load = jnp.sum(onehot, axis=(0, 1, 2)).astype(jnp.float32) / (n_real * top_k)
        aux = {
            "moe_lb_loss": e * jnp.sum(frac_routed * mean_prob),
            "moe_z_loss": jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * real) / n_real,
            "moe_dropped": jax.lax.stop_gradient(1.0 - jnp.sum(keep) / (n_real * top_k)),
            "moe_max_load": jax.lax.stop_gradient(jnp.max(load) * e),
        }
        return y, aux
