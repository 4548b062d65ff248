"""Olmax's building blocks: norms, causal convolution, axial mixer, attention, MoE.

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
  axial      the input history `inputs` [b, ceil(L/K) K, d] (stage 1 reads the
             positions t, t-K, t-2K, ...: O(L/K d)) and the last K-1 values of
             act(u) `mixed` [b, K-1, d] (stage 2's window: O(K d));
  attention  `keys` and `values` [b, L, heads, head_dim], rotary applied at their
             positions;
  moe        nothing. Decoding is dropless: a step routes its one token alone (a
             group of one, which no capacity can drop) and a prefill lifts the
             capacity, so cached decoding equals the full forward whenever the full
             forward dropped no token.
Entries at or past a row's position are never read before a step writes them.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import TYPE_CHECKING, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning

if TYPE_CHECKING:  # network.py defines the config and imports this module.
    from olmax.network import OlmaxConfig

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
    """

    segment_ids: Array
    positions: Array
    prefill_lengths: Array | None = None


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


def causal_conv(x: Array, kernel: Array, ctx: Context) -> Array:
    """Causal, segment-masked convolution.

    x: [b, t, i], kernel: [w, i, o] (tap w-1 multiplies x[t], tap 0 x[t-w+1]) -> [b, t, o].
    A lag that crosses a segment boundary is masked per (position, lag), which XLA's
    convolution cannot express, so the conv is one matmul over a w-wide window of the
    narrower side: when i <= o, the masked, shifted inputs stacked to [b, t, w, i] times
    the kernel as [w i, o]; otherwise x times the kernel as [i, w o] and the w outputs
    shifted, masked and summed. One large matmul and w copies of min(i, o) channels beat
    w matmuls with w shifted copies of x (~1.4x for the tiny model's conv block, fwd+bwd).
    """
    width = kernel.shape[0]
    same = {lag: (ctx.segment_ids == shift_right(ctx.segment_ids, lag))[..., None] for lag in range(1, width)}

    def shifted(a: Array, lag: int) -> Array:  # a[t - lag], zero across a segment start
        return shift_right(a, lag) * same[lag].astype(a.dtype) if lag else a

    if kernel.shape[1] <= kernel.shape[2]:
        window = jnp.stack([shifted(x, width - 1 - tap) for tap in range(width)], axis=2)  # [b, t, w, i]
        return jnp.einsum("btwi,wio->bto", window, kernel)
    z = jnp.einsum("bti,wio->btwo", x, kernel)  # z[:, s, tap] = x[s] @ kernel[tap]
    return sum(shifted(z[:, :, width - 1 - lag], lag) for lag in range(width))


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
        h = causal_conv(x, k_in, ctx)  # [b,t,d] -> [b,t,f]
        h = constrain(act(h), ("activation_batch", "activation_length", "activation_mlp"))
        if decode == "prefill":
            inputs.value = last_positions(x, ctx.prefill_lengths, w - 1)
            hidden.value = last_positions(h, ctx.prefill_lengths, w - 1)
        return causal_conv(h, k_out, ctx), zero_aux()  # [b,t,f] -> [b,t,d]


# ----------------------------------------------------------------------- axial mixer


def lag_matrix(lags: Array, size: int, offset: int = 0) -> Array:
    """Causal Toeplitz matrix M[i, j] = lags[i - j + offset] where 0 <= i - j + offset < len(lags).

    lags: [L, h] -> [size, size, h]. With offset=0 it is lower triangular (lag 0 on
    the diagonal); with offset=size it is the strictly-upper part that reaches back
    into the previous block.
    """
    i = jnp.arange(size)[:, None]
    j = jnp.arange(size)[None, :]
    lag = i - j + offset
    valid = (lag >= 0) & (lag < lags.shape[0])
    m = jnp.take(lags, jnp.clip(lag, 0, lags.shape[0] - 1), axis=0)  # [size, size, h]
    return jnp.where(valid[..., None], m, 0.0)


class AxialMixer(nn.Module):
    """Causal axial MLP-Mixer with a full receptive field in one layer, O(N^1.5).

    The padded sequence is viewed as a grid [n_blocks, K] (t = n*K + k). Two learned
    token-mixing contractions with a per-position nonlinearity between them:

      1. along the block axis (the grid's columns): u[t] = sum_m a[m] x[t - m*K], m < n_blocks
      2. along the offset axis, as a sliding window: y[t] = sum_l b[l] act(u)[t - l], l < K

    Every lag t - s in [0, N) is l + m*K for exactly one (l, m), so output t depends
    on every input s <= t already in one layer, and on nothing after t. Weights are
    per channel group (h) and depend on the lag only, not on absolute positions:
    the mixer is shift-equivariant, so a packed segment is mixed exactly as it would
    be alone (plus a mask on every pair that crosses a segment boundary), and a
    decode step needs only past inputs, never a recomputation.

    Cost per layer: O(N * (n_blocks + 2K) * d), i.e. O(N^1.5 d) at K = sqrt(N).
    A decode step caches the input history (stage 1 reads t, t-K, t-2K, ...) and the
    last K-1 values of act(u) (stage 2's window): O((N/K + K) d), one position's work.
    """

    config: OlmaxConfig

    @nn.compact
    def __call__(self, x: Array, ctx: Context, decode: str | None = None) -> tuple[Array, dict]:
        cfg = self.config
        bsz, length, d = x.shape
        k, h = cfg.mixer_block, cfg.mixer_heads
        max_blocks = -(-cfg.max_length // k)
        # [lags, h]: lag 0 starts near identity so a fresh layer passes local signal on.
        a = param_with_axes("block_lags", lag_init(max_blocks), (max_blocks, h), axes=("mix_lag", "heads"))
        b = param_with_axes("offset_lags", lag_init(k), (k, h), axes=("mix_lag", "heads"))
        bias = param_with_axes("bias", nn.initializers.zeros, (d,), axes=("norm",))
        a, b, bias = a.astype(cfg.dtype), b.astype(cfg.dtype), bias.astype(cfg.dtype).reshape(h, d // h)
        act = activation(cfg.activation)

        n = -(-length // k)
        if decode is not None:
            history, window = ("activation_batch", "activation_length", "activation_embed"), ("activation_batch", None)
            inputs = cache_variable(self, decode, "inputs", (bsz, n * k, d), cfg.dtype, history)
            mixed = cache_variable(self, decode, "mixed", (bsz, k - 1, d), cfg.dtype, window + ("activation_embed",))
            if decode == "init":
                return jnp.zeros_like(x), zero_aux()
            if decode == "step":
                return self.step(inputs, mixed, x, ctx.positions[:, 0], a, b, bias), zero_aux()

        pad = n * k - length
        xg = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(bsz, n, k, h, d // h)
        # Padding gets segment -1: distinct from every real segment and from id 0.
        seg = jnp.pad(ctx.segment_ids, ((0, 0), (0, pad)), constant_values=-1).reshape(bsz, n, k)

        # 1. Block axis: [b,n,k,h,c] -> [b,n,k,h,c], mixing block m into block n >= m.
        col = lag_matrix(a[:n], n)  # [n, m, h]
        same = (seg[:, :, None, :] == seg[:, None, :, :]).astype(cfg.dtype)  # [b,n,m,k]
        u = act(jnp.einsum("nmh,bnmk,bmkhc->bnkhc", col, same, xg) + bias)

        # 2. Offset axis, sliding: block n from its own offsets j <= k and from the
        #    previous block's offsets j > k (lags K-1 .. 1 reaching back across the edge).
        own = lag_matrix(b, k)  # [k, j, h]
        prev = lag_matrix(b, k, offset=k)  # [k, j, h]
        u_prev = shift_right(u, 1)  # block n-1 at n
        seg_prev = shift_right(seg, 1) + jnp.where(jnp.arange(n) == 0, -2, 0)[None, :, None]
        same_own = (seg[..., :, None] == seg[..., None, :]).astype(cfg.dtype)  # [b,n,k,j]
        same_prev = (seg[..., :, None] == seg_prev[..., None, :]).astype(cfg.dtype)
        y = jnp.einsum("kjh,bnkj,bnjhc->bnkhc", own, same_own, u) + jnp.einsum(
            "kjh,bnkj,bnjhc->bnkhc", prev, same_prev, u_prev
        )
        if decode == "prefill":
            inputs.value = pad_to(x, inputs.value.shape[1], "axial mixer")
            mixed.value = last_positions(u.reshape(bsz, n * k, d), ctx.prefill_lengths, k - 1)
        return y.reshape(bsz, n * k, d)[:, :length], zero_aux()

    def step(
        self, inputs: nn.Variable, mixed: nn.Variable, x: Array, t: Array, a: Array, b: Array, bias: Array
    ) -> Array:
        """One position t [bsz] per row: x [bsz, 1, d] -> y [bsz, 1, d], reading and updating the cache."""
        bsz, _, d = x.shape
        k, h = b.shape
        hist = inputs.value = write_position(inputs.value, x, t)  # [b, n K, d]
        n = hist.shape[1] // k
        # 1. u[t] = sum_m a[m] x[t - m K]: one column of the grid, O(n d).
        src = t[:, None] - k * jnp.arange(n)[None, :]  # [b, m]
        col = jnp.take_along_axis(hist, jnp.clip(src, 0, hist.shape[1] - 1)[..., None], axis=1)  # [b,m,d]
        col = jnp.where((src >= 0)[..., None], col, jnp.zeros((), col.dtype)).reshape(bsz, n, h, d // h)
        u = activation(self.config.activation)(jnp.einsum("mh,bmhc->bhc", a[:n], col) + bias)
        # 2. y[t] = sum_l b[l] act(u)[t - l]: the window act(u)[t-K+1 .. t], O(K d).
        window = slide(mixed, u.reshape(bsz, 1, d)).reshape(bsz, k, h, d // h)
        return jnp.einsum("jh,bjhc->bhc", b[::-1], window).reshape(bsz, 1, d)


def lag_init(num_lags: int):
    """Token-mixing filter init: lag 0 near 1, other lags small so early and late
    positions (which sum over different numbers of lags) stay on the same scale."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, dtype) / math.sqrt(num_lags)
        return w.at[0].add(1.0)

    return init


# ------------------------------------------------------------------------- attention


def rotary(x: Array, positions: Array, max_wavelength: float = 10_000.0) -> Array:
    """Rotary position embedding. x: [b, t, h, c], positions: [b, t]."""
    half = x.shape[-1] // 2
    freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None, None].astype(jnp.float32) * freq  # [b,t,1,half]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with rotary positions: the transformer baseline mixer.

    A decode step caches keys and values [b, L, heads, head_dim] (rotary applied at
    their positions) and attends over the cache: O(L d) per position.
    """

    config: OlmaxConfig

    @nn.compact
    def __call__(self, x: Array, ctx: Context, decode: str | None = None) -> tuple[Array, dict]:
        cfg = self.config
        d, h = cfg.features, cfg.num_heads
        c = d // h
        init = fan_in_normal((0,))
        proj = {
            n: param_with_axes(n, init, (d, d), axes=("embed", "heads")).astype(cfg.dtype) for n in ("wq", "wk", "wv")
        }
        wo = param_with_axes("wo", init, (d, d), axes=("heads", "embed")).astype(cfg.dtype)
        if decode is not None:
            kv_shape = (x.shape[0], x.shape[1], h, c)
            kv_axes = ("activation_batch", "activation_length", "activation_heads", None)
            cached_k = cache_variable(self, decode, "keys", kv_shape, cfg.dtype, kv_axes)
            cached_v = cache_variable(self, decode, "values", kv_shape, cfg.dtype, kv_axes)
            if decode == "init":
                return jnp.zeros_like(x), zero_aux()
        q, k, v = (jnp.einsum("btd,de->bte", x, proj[n]).reshape(*x.shape[:2], h, c) for n in ("wq", "wk", "wv"))
        q, k = rotary(q, ctx.positions), rotary(k, ctx.positions)
        if decode == "step":  # one query per row at t = positions[:, 0], keys from the cache
            t = ctx.positions[:, 0]
            k = cached_k.value = write_position(cached_k.value, k, t)  # [b,s,h,c]
            v = cached_v.value = write_position(cached_v.value, v, t)
            mask = (jnp.arange(k.shape[1])[None, :] <= t[:, None])[:, None, :]  # [b,1,s]
        else:
            if decode == "prefill":
                cached_k.value = pad_to(k, cached_k.value.shape[1], "attention")
                cached_v.value = pad_to(v, cached_v.value.shape[1], "attention")
            s = jnp.arange(x.shape[1])
            mask = (s[:, None] >= s[None, :])[None] & (ctx.segment_ids[:, :, None] == ctx.segment_ids[:, None, :])
        logits = jnp.einsum("bthc,bshc->bhts", q, k).astype(jnp.float32) / math.sqrt(c)
        logits = jnp.where(mask[:, None], logits, -1e30)
        probs = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhts,bshc->bthc", probs, v).reshape(x.shape)
        return jnp.einsum("bte,ed->btd", out, wo), zero_aux()


# --------------------------------------------------------------- axial recall mixer


def taylor_features(x: Array) -> Array:
    """phi(x) with phi(q) . phi(k) = 1 + s + s^2 / 2, s = q . k / sqrt(r): the second-order
    Taylor expansion of exp(s), positive everywhere (>= 1/2), so it can normalize.

    x: [..., r] -> [..., F], F = 1 + r + r (r + 1) / 2, fp32. The quadratic term keeps each
    pair i <= j once: x_i^2 / sqrt(2 r) on the diagonal, x_i x_j / sqrt(r) above it.
    """
    x = x.astype(jnp.float32)
    r = x.shape[-1]
    i, j = (jnp.asarray(a) for a in np.triu_indices(r))
    scale = jnp.where(i == j, 1.0 / math.sqrt(2.0 * r), 1.0 / math.sqrt(r))
    quad = x[..., i] * x[..., j] * scale
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x / r**0.25, quad], axis=-1)


def taylor_size(r: int) -> int:
    """F, the number of Taylor features of r recall features."""
    return 1 + r + r * (r + 1) // 2


def axial_recall(q: Array, k: Array, v: Array, ql: Array, kl: Array, seg: Array, block: int) -> Array:
    """The recall mixer's token mixing over the grid [n_blocks, K] (t = n*K + k), for every head.

    q, k, v: [b, t, h, c] (q, k with rotary), ql, kl: [b, t, h, r] (recall features),
    seg: [b, t] segment ids (contiguous segments, as packing makes them) -> [b, t, h, c].

    Output t is the sum of two normalized reads of the values v[s], s <= t, same segment:
      window  softmax(q_t . k_s / sqrt(c)) over the last K positions (lags 0..K-1): the
              offset axis, exact attention, computed from block n and block n-1;
      recall  phi(ql_t) . phi(kl_s) (Taylor kernel, linear attention) over every older
              position (lags >= K): block n-1's offsets j <= k pairwise, and blocks
              <= n-2 through per-block states sum_s phi(kl_s) v_s^T [F, c]: the block axis.
    Cost per row O(N K (c + r) + N h F c + n^2 h F c), F = taylor_size(r): O(N^1.5) at K = sqrt(N).
    Internally heads lead ([b, h, n, K, ...]) so every contraction is a batched matmul.
    """
    bsz, length, h, c = q.shape
    r = ql.shape[-1]
    n = -(-length // block)
    pad = n * block - length

    def grid(a: Array) -> Array:  # [b, t, h, e] -> [b, h, n, K, e]
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(bsz, n, block, h, a.shape[-1])
        return jnp.transpose(a, (0, 3, 1, 2, 4))

    q, k, v, ql, kl = map(grid, (q, k, v, ql, kl))
    # Padding gets segment -1: distinct from every real segment and from id 0.
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1).reshape(bsz, 1, n, block)
    k_prev, v_prev, kl_prev = (shift_right(a, 1, axis=2) for a in (k, v, kl))  # block n-1 at n
    seg_prev = shift_right(seg, 1, axis=2) + jnp.where(jnp.arange(n) == 0, -2, 0)[:, None]
    i = jnp.arange(block)
    same_own = (seg[..., :, None] == seg[..., None, :]) & (i[:, None] >= i[None, :])  # [b,1,n,k,j] lag k-j
    same_prev = seg[..., :, None] == seg_prev[..., None, :]  # lag K+k-j
    in_window = i[:, None] < i[None, :]  # [k,j]: lag K+k-j < K

    # Window: softmax over block n-1 (j > k) and its own block (j <= k) together, fp32.
    keys, values = jnp.concatenate([k_prev, k], axis=3), jnp.concatenate([v_prev, v], axis=3)  # [b,h,n,2K,c]
    logits = jnp.einsum("bhnkc,bhnjc->bhnkj", q, keys).astype(jnp.float32) / math.sqrt(c)
    allowed = jnp.concatenate([same_prev & in_window, same_own], axis=-1)  # the diagonal always is
    p = jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1).astype(v.dtype)
    y = jnp.einsum("bhnkj,bhnjc->bhnkc", p, values)

    # Recall from block n-1, lags >= K (j <= k), pairwise with the same kernel.
    s = jnp.einsum("bhnkr,bhnjr->bhnkj", ql, kl_prev).astype(jnp.float32) / math.sqrt(r)
    kern = (1.0 + s + 0.5 * s * s) * (same_prev & ~in_window)
    num = jnp.einsum("bhnkj,bhnjc->bhnkc", kern, v_prev.astype(jnp.float32))
    den = jnp.sum(kern, axis=-1)
    # Recall from blocks m <= n-2: each block's state holds its tokens of the segment that
    # is open at the block's end (`last`); a query reads it only if its own segment is that
    # one and already open at block n-1's end (contiguous segments make this exact).
    last = seg[..., -1]  # [b,1,n]
    fk = taylor_features(kl) * (seg == last[..., None])[..., None]  # [b,h,n,k,F]
    states = jnp.einsum("bhnkf,bhnkc->bhnfc", fk, v.astype(jnp.float32))
    norms = jnp.sum(fk, axis=3)  # [b,h,n,F]
    last_prev = seg_prev[..., -1]  # last[n-1]
    m = jnp.arange(n)
    use = (m[None, :] <= m[:, None] - 2) & (last[..., None, :] == last_prev[..., :, None])  # [b,1,n,m]
    use = use.astype(jnp.float32)
    states = jnp.einsum("bxnm,bhmfc->bhnfc", use, states)  # what block n's queries read
    norms = jnp.einsum("bxnm,bhmf->bhnf", use, norms)
    fq = taylor_features(ql) * (seg == last_prev[..., None])[..., None]  # [b,h,n,k,F]
    num += jnp.einsum("bhnkf,bhnfc->bhnkc", fq, states)
    den += jnp.einsum("bhnkf,bhnf->bhnk", fq, norms)
    y = y + (num / jnp.maximum(den, 1e-6)[..., None]).astype(y.dtype)
    return jnp.transpose(y, (0, 2, 3, 1, 4)).reshape(bsz, n * block, h, c)[:, :length]


class RecallMixer(nn.Module):
    """Axial recall mixer: content-addressed token mixing at O(N^1.5), Olmax's default mixer.

    The fixed lag filters of the AxialMixer cannot look a value up by its key. This mixer
    keeps the same grid but mixes by content (see `axial_recall`): exact softmax attention
    over a sliding window of K positions (the offset axis), and a Taylor-kernel linear
    attention over everything older, read from per-block states (the block axis). Both
    are normalized reads of the same values; heads `num_heads`, recall features
    `recall_features` per head. Strictly causal, full causal receptive field in one layer
    (the kernel is >= 1/2 for every pair), packed segments mixed as if alone.

    A decode step keeps the last K keys, values and recall keys [b, K, h, *] and the recall
    state [b, h, F, c] with its normalizer [b, h, F] (fp32): the position leaving the
    window is added to the state, the new one enters it. O(K c + F c) per head and token.
    """

    config: OlmaxConfig

    @nn.compact
    def __call__(self, x: Array, ctx: Context, decode: str | None = None) -> tuple[Array, dict]:
        cfg = self.config
        bsz, length, d = x.shape
        h, r, block = cfg.num_heads, cfg.recall_features, cfg.mixer_block
        c = d // h
        init = fan_in_normal((0,))
        names = {"wq": d, "wk": d, "wv": d, "wq_recall": h * r, "wk_recall": h * r}
        w = [param_with_axes(n, init, (d, e), axes=("embed", "heads")) for n, e in names.items()]
        wo = param_with_axes("wo", init, (d, d), axes=("heads", "embed")).astype(cfg.dtype)
        if decode is not None:
            shapes = {"keys": c, "values": c, "recall_keys": r}
            window = {n: cache_variable(self, decode, n, (bsz, block, h, e), cfg.dtype) for n, e in shapes.items()}
            feats = taylor_size(r)
            state = cache_variable(self, decode, "state", (bsz, h, feats, c), jnp.float32)
            norm = cache_variable(self, decode, "norm", (bsz, h, feats), jnp.float32)
            if decode == "init":
                return jnp.zeros_like(x), zero_aux()
        # One matmul for the five projections: [b,t,d] -> [b,t,3d + 2hr] -> q, k, v, ql, kl.
        proj = jnp.einsum("btd,de->bte", x, jnp.concatenate(w, axis=1).astype(cfg.dtype))
        splits = list(itertools.accumulate(names.values()))[:-1]
        q, k, v, ql, kl = (a.reshape(bsz, length, h, -1) for a in jnp.split(proj, splits, axis=-1))
        q, k = rotary(q, ctx.positions), rotary(k, ctx.positions)
        if decode == "step":
            y = recall_step(window, state, norm, q, k, v, ql, kl, ctx.positions[:, 0])
        else:
            y = axial_recall(q, k, v, ql, kl, ctx.segment_ids, block)
            if decode == "prefill":
                lengths = ctx.prefill_lengths
                for name, a in zip(shapes, (k, v, kl)):
                    window[name].value = last_positions(a, lengths, block)
                older = (jnp.arange(length)[None, :] <= lengths[:, None] - 1 - block).astype(jnp.float32)
                fk = taylor_features(kl) * older[..., None, None]  # [b,t,h,F]
                state.value = jnp.einsum("bthf,bthc->bhfc", fk, v.astype(jnp.float32))
                norm.value = jnp.sum(fk, axis=1)
        return jnp.einsum("bte,ed->btd", y.reshape(bsz, -1, d), wo), zero_aux()


def recall_step(window: dict, state: nn.Variable, norm: nn.Variable, q, k, v, ql, kl, t: Array) -> Array:
    """One position t [b] per row of the recall mixer from its cache; q, k, v, ql, kl [b, 1, h, *]
    -> [b, 1, h, c]. The window holds positions t-K..t-1 before the step, t-K+1..t after."""
    keys, values, rkeys = (slide(window[n], a) for n, a in (("keys", k), ("values", v), ("recall_keys", kl)))
    block = keys.shape[1] - 1
    # Position t-K leaves the window for the recall state (if it exists).
    leaving = taylor_features(rkeys[:, 0]) * (t >= block)[:, None, None]  # [b,h,F]
    state.value = state.value + jnp.einsum("bhf,bhc->bhfc", leaving, values[:, 0].astype(jnp.float32))
    norm.value = norm.value + leaving
    keys, values = keys[:, 1:], values[:, 1:]  # [b,K,h,c]: positions t-K+1 .. t
    c = q.shape[-1]
    logits = jnp.einsum("bhc,bjhc->bhj", q[:, 0], keys).astype(jnp.float32) / math.sqrt(c)
    valid = t[:, None] - block + 1 + jnp.arange(block)[None, :] >= 0  # [b,j]
    p = jax.nn.softmax(jnp.where(valid[:, None], logits, -1e30), axis=-1).astype(values.dtype)
    y = jnp.einsum("bhj,bjhc->bhc", p, values)
    fq = taylor_features(ql[:, 0])  # [b,h,F]
    num = jnp.einsum("bhf,bhfc->bhc", fq, state.value)
    den = jnp.einsum("bhf,bhf->bh", fq, norm.value)
    return (y + (num / jnp.maximum(den, 1e-6)[..., None]).astype(y.dtype))[:, None]


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


BLOCKS = {"conv": ConvBlock, "moe": MoE}
MIXERS = {"recall": RecallMixer, "axial": AxialMixer, "attention": Attention}


class Block(nn.Module):
    """One residual branch f(x): the inner block wrapped in its norms.

    placement="sandwich": post_norm(inner(pre_norm(x))); placement="pre": inner(pre_norm(x)).
    """

    config: OlmaxConfig
    kind: str

    @nn.compact
    def __call__(
        self, x: Array, ctx: Context, enable_dropout: bool = False, decode: str | None = None
    ) -> tuple[Array, dict]:
        cfg = self.config
        if decode not in DECODE_MODES:
            raise ValueError(f"decode={decode!r} is not one of {DECODE_MODES}.")
        inner = MIXERS[cfg.mixer] if self.kind == "mixer" else BLOCKS[self.kind]
        y = Norm(cfg, name="pre_norm")(x.astype(cfg.dtype))
        y, aux = inner(cfg, name=self.kind)(y, ctx, decode)
        if cfg.placement == "sandwich":
            y = Norm(cfg, name="post_norm")(y)
        y = nn.Dropout(cfg.dropout_rate, deterministic=not enable_dropout)(y)
        y = constrain(y, ("activation_batch", "activation_length", "activation_embed"))
        return y.astype(jnp.float32), aux
