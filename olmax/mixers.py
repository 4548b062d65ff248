"""Olmax's token mixers, the one branch of a layer that moves information along the
sequence (`OlmaxConfig.mixer`), all on the grid [n_blocks, K] (t = n K + k, K = mixer_block)
or, for the baseline, over every position:

  recall     RecallMixer, the default: one normalized read by content, gated and decayed
             quadratic-kernel weights (linear attention, read from per-block states) over
             every past position plus exact softmax weights over the last K: recalls by
             content at O(N^1.5) (axial_recall).
  axial      AxialMixer, the seed's MLP-Mixer: two learned causal lag filters, along the
             block axis then the offset axis, with an activation between; input-independent.
  attention  Attention, causal multi-head softmax attention with rotary positions: the O(N^2)
             time, O(N) memory baseline (fused / blockwise kernels in olmax/attention.py).

They follow the block contract of olmax/layers.py (x [b, t, d], Context, decode mode) and
its einsum letters. Their decode caches:
  recall     the last K keys and values [b, K, h, c] and the recall state [b, h, F, c]
             with its normalizer [b, h, F] (fp32), decayed as it goes: constant size;
  axial      the input history `inputs` [b, ceil(L/K) K, d] (stage 1 reads the
             positions t, t-K, t-2K, ...: O(L/K d)) and the last K-1 values of
             act(u) `mixed` [b, K-1, d] (stage 2's window: O(K d));
  attention  `keys` and `values` [b, L, heads, head_dim], rotary applied at their
             positions.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from olmax.attention import causal_attention
from olmax.config import MAX_FAR_BLOCK, OlmaxConfig
from olmax.layers import (Array, Context, activation, cache_variable, constrain, data_shards, fan_in_normal,
                          last_positions, matmul, pad_to, param_with_axes, per_data_shard, shift_right, slide,
                          write_position, zero_aux)


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
        k, h = cfg.block_size, cfg.mixer_heads
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

    Training and prefill run the kernel `attention_impl` picks (olmax/attention.py): fused
    cuDNN attention on a GPU, a blockwise (flash-style) online softmax elsewhere; neither
    keeps an [N, N] array. A decode step caches keys and values [b, L, heads, head_dim] (rotary applied at
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
        q, k, v = (matmul(x, proj[n]).reshape(*x.shape[:2], h, c) for n in ("wq", "wk", "wv"))
        q, k = rotary(q, ctx.positions), rotary(k, ctx.positions)
        if decode == "step":  # one query per row at t = positions[:, 0], keys from the cache
            t = ctx.positions[:, 0]
            k = cached_k.value = write_position(cached_k.value, k, t)  # [b,s,h,c]
            v = cached_v.value = write_position(cached_v.value, v, t)
            mask = (jnp.arange(k.shape[1])[None, :] <= t[:, None])[:, None, :]  # [b,1,s]
            logits = jnp.einsum("bhc,bshc->bhs", q[:, 0], k).astype(jnp.float32) / math.sqrt(c)
            probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1).astype(cfg.dtype)
            out = jnp.einsum("bhs,bshc->bhc", probs, v)[:, None]
        else:
            if decode == "prefill":
                cached_k.value = pad_to(k, cached_k.value.shape[1], "attention")
                cached_v.value = pad_to(v, cached_v.value.shape[1], "attention")
            out = causal_attention(q, k, v, ctx.segment_ids, implementation=cfg.attention_impl,
                                   block=cfg.attention_block, packed=ctx.packed)
        return matmul(out.reshape(x.shape), wo), zero_aux()


# --------------------------------------------------------------- axial recall mixer


def recall_kernel(s: Array) -> Array:
    """The recall mixer's far weight of a pair with s = ql . kl / sqrt(r): s^2 / 2 >= 0, the
    second-order term of exp(s)'s Taylor series. No constant or linear term: a key that is
    orthogonal to the query adds nothing. (The full `1 + s + s^2/2` makes each of the N older
    tokens add >= 1/2, a mass a key must stand out of that grows with N: with it, 32 pairs in
    1024 tokens were learned by step ~1300 of benchmarks.recall, with s^2/2 by ~1000 and
    ~1200 in two runs.)"""
    return 0.5 * s * s


def quadratic_features(x: Array) -> Array:
    """phi(x) with phi(q) . phi(k) = recall_kernel(q . k / sqrt(r)) = (q . k)^2 / (2 r).

    x: [..., r] -> [..., F], F = r (r + 1) / 2, fp32: each pair i <= j once (row by row: x_0 x_0,
    x_0 x_1, .., x_1 x_1, ..), x_i^2 / sqrt(2 r) on the diagonal, x_i x_j / sqrt(r) above it.
    Built from r slices rather than a gather by index pairs: ~1.5x faster forward and backward
    on CPU (a gather's gradient is a scatter-add), and no gather for an accelerator.
    """
    x = x.astype(jnp.float32)
    r = x.shape[-1]
    scale = np.full(r, 1.0 / math.sqrt(r), np.float32)
    scale[0] = 1.0 / math.sqrt(2.0 * r)
    return jnp.concatenate([x[..., i:i + 1] * (x[..., i:] * scale[: r - i]) for i in range(r)], axis=-1)


def feature_size(r: int) -> int:
    """F, the number of kernel features of r recall features."""
    return r * (r + 1) // 2


def axial_recall(q: Array, k: Array, v: Array, ql: Array, kl: Array, gate: Array, seg: Array, block: int, *,
                 log_decay: Array | None = None, far_block: int | None = None, chunk: int = 512) -> Array:
    """The recall mixer's token mixing over the grid [n_blocks, K] (t = n*K + k), for every head.

    q, k, v: [b, t, h, c] (q, k with rotary), ql, kl: [b, t, h, r] (recall features),
    gate: [b, t, h] write gates in (0, 1), log_decay: [b, t, h] log a_t <= 0 of the recall
    state's decay (None: no decay; values below -MAX_FORGET_RATE are read as -MAX_FORGET_RATE),
    seg: [b, t] segment ids (contiguous segments, as packing makes them) -> [b, t, h, c].

    Output t is one normalized read sum_s w_ts v_s / sum_s w_ts over s <= t, same segment,
    with w_ts the sum of two weights:
      recall  g_s a_{s+1} ... a_t phi(ql_t) . phi(kl_s) (g_s: the write gate, a_u: the decay
              of position u; phi . phi = s^2/2, `recall_kernel`, linear attention) at every
              lag, on a coarser grid of far blocks of B = a multiple of K positions (about
              `far_block`; None: the whole row up to MAX_FAR_BLOCK positions, else FAR_BLOCK):
              the own far block's positions s <= t pairwise (one [B, B] matmul),
              earlier far blocks through per-block states sum_s g_s (a_{s+1} .. a_end)
              phi(kl_s) v_s^T [F, c], each carried to the next block times that block's decay;
      window  + exp(q_t . k_s / sqrt(c)) for the last K positions (lags 0..K-1): exact
              softmax weights on the offset axis, from block n and block n-1.
    One denominator for both, so a query that matches nothing near reads mostly from far
    and the other way round; the gate lets a token (a filler, say) stay out of the memory,
    and the decay lets the memory forget, so that the far read is a sum over the last
    ~1 / (1 - a) written tokens rather than over all N (without it a matching key's share of
    the read falls like 1 / N; see RecallMixer for the per-head spectrum).
    The recall weight covers the window's lags too: with it at lags >= K only, a key less
    than K positions back could be found by the window's q . k alone, a second lookup that
    the rare short-lag examples train slowly (at 32x1024, step 1500 of benchmarks.recall:
    0.19 accuracy on answers whose key was < K back, 0.98 on the others).
    Cost per row O(N (K c + B (r + c) + h F c) + (N / B)^2 h F c), F = feature_size(r); a row
    that is one far block has no state: its recall part is one [N, N] kernel matrix. Per token,
    B (r + c) pairwise multiply-adds buy fewer, larger matmuls and fewer [F, c] states than far
    blocks of K would: measured on a 2-core CPU (Olmax tiny, 8192 tokens a step, forward and
    backward), one far block trains 1.2x faster than blocks of K = 16 at 256 tokens and 1.1x
    faster at 512; far blocks of 128 1.1x faster than blocks of K = 64 at 1024. Internally heads
    lead ([b, h, n, K, ...]) so every contraction is a batched matmul.

    Memory: rows longer than `chunk` tokens run as a scan over chunks of about chunk / B far blocks
    that passes one running recall state ([b, h, F, c] and its normalizer [b, h, F]) from chunk to chunk, each chunk
    rematerialized in the backward pass: the step holds one chunk's window scores and
    kernel features, not the whole row's (O(N (c + r) + chunk K h) instead of O(N K h + N h F)).
    """
    if log_decay is None:
        log_decay = jnp.zeros(gate.shape, jnp.float32)
    return chunked_recall(lambda *a: a, (q, k, v, ql, kl, gate, log_decay), seg, block, far_block=far_block,
                          chunk=chunk)


def chunked_recall(prepare: Callable[..., tuple], inputs: tuple, seg: Array, block: int, *,
                   far_block: int | None = None, chunk: int = 512) -> Array:
    """`axial_recall` of (q, k, v, ql, kl, gate, log_decay) = prepare(*inputs), with `prepare`
    run on each chunk of the row inside the scan over chunks, never on the whole row.

    inputs: arrays [b, t, ...] (the mixer's x and positions); prepare maps those of positions
    t0..t1 to those positions' q, k, v, ql, kl [b, t', h, *], gate and log_decay [b, t', h].
    A row longer than `chunk` then holds no whole-row projection: a chunk's q, k, v, recall
    features and gates are made, used and (in the backward) made again within the chunk, so
    the row keeps only `inputs` and the output. A row of one chunk runs `prepare` once, on
    the whole row.
    """
    bsz, length = seg.shape
    shapes = jax.eval_shape(prepare, *(jax.ShapeDtypeStruct((bsz, min(length, block)) + a.shape[2:], a.dtype)
                                       for a in inputs))
    h, c = shapes[0].shape[2:]
    r = shapes[3].shape[-1]
    m, per_step, steps = recall_layout(length, block, far_block, chunk)
    per_chunk = per_step * m  # K-blocks per scan step
    span = per_chunk * block  # positions per scan step
    pad = steps * span - length
    # Padding gets segment -1: distinct from every real segment and from id 0.
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    inputs = tuple(jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)) for a in inputs)

    def grid(a: Array) -> Array:  # [b, t, h, e] -> [b, h, t / K, K, e]
        a = a.reshape(bsz, -1, block, h, a.shape[-1])
        return jnp.transpose(a, (0, 3, 1, 2, 4))

    def blocks(seg_part: Array, *parts: Array) -> tuple:  # a span of the row -> `_recall_chunk`'s blocks
        q, k, v, ql, kl, gate, log_decay = prepare(*parts)
        log_decay = jnp.maximum(log_decay.astype(jnp.float32), -MAX_FORGET_RATE)
        gate, log_decay = (grid(a.astype(jnp.float32)[..., None])[..., 0] for a in (gate, log_decay))  # [b,h,n,K]
        return (*map(grid, (q, k, v, ql, kl)), gate, log_decay, seg_part.reshape(bsz, 1, -1, block))

    # What the first block finds before it: an empty recall state and a block of segment -2
    # (no real one) as its window's previous block.
    state = ((jnp.zeros((bsz, h, feature_size(r), c), jnp.float32), jnp.zeros((bsz, h, feature_size(r)), jnp.float32)),
             jnp.zeros((bsz, h, block, c), shapes[1].dtype),
             jnp.zeros((bsz, h, block, c), shapes[2].dtype), jnp.full((bsz, 1, block), -2, seg.dtype))
    if steps == 1:  # no state comes in and none goes out
        y, _ = _recall_chunk(m, blocks(seg, *inputs), state, stateless=True)
    else:  # [b, steps * span, ...] -> [steps, b, span, ...], scanned; each chunk recomputed in the backward
        split = lambda a: jnp.moveaxis(a.reshape(bsz, steps, span, *a.shape[2:]), 1, 0)  # noqa: E731

        @jax.checkpoint
        def body(st, parts):
            y, st = _recall_chunk(m, blocks(*parts), st)
            return st, y

        _, y = jax.lax.scan(body, state, tuple(map(split, (seg, *inputs))))
        y = jnp.moveaxis(y, 0, 2).reshape(bsz, h, steps * per_chunk, block, c)
    return jnp.transpose(y, (0, 2, 3, 1, 4)).reshape(bsz, -1, h, c)[:, :length]


def recall_layout(length: int, block: int, far_block: int | None = None, chunk: int = 512) -> tuple[int, int, int]:
    """How `chunked_recall` lays out a row of `length` positions: (m, K-blocks per far block; far
    blocks per scan step; scan steps). far_block None: one far block for a row that fits one scan
    step and MAX_FAR_BLOCK positions, far blocks of FAR_BLOCK otherwise."""
    if max(block, far_block or 0) > MAX_FAR_BLOCK:
        raise ValueError(f"The recall mixer's block size K={block} and far block {far_block} must be at most "
                         f"{MAX_FAR_BLOCK} positions (the decay across a far block must stay within fp32's "
                         f"range, `_own_pairs`): lower mixer_block or recall_far_block.")
    n = -(-length // block)
    if far_block is None:
        far_block = n * block if n * block <= min(MAX_FAR_BLOCK, max(chunk, block)) else FAR_BLOCK
    # Far blocks of m K-blocks and scan steps of `per_step` far blocks, each as even as the row allows
    # (a row of 600 positions at K = 16 and far blocks of up to 256: three far blocks of 208 in two
    # steps): the padding is less than one K-block per far block plus one far block per step.
    far_blocks = -(-n // max(1, min(n, far_block // block)))
    m = -(-n // far_blocks)
    steps = -(-far_blocks // max(1, chunk // (m * block)))
    return m, -(-far_blocks // steps), steps


def _recall_chunk(m: int, blocks: tuple, state: tuple, stateless: bool = False) -> tuple[Array, tuple]:
    """`axial_recall` on G consecutive blocks [b, h, G, K, ...] after the `state` of the blocks
    before them (their summed recall state and normalizer ([b,h,F,c], [b,h,F]), the last block's keys and values
    [b,h,K,c] and segments [b,1,K]) -> (y [b, h, G, K, c] in v's dtype, the state after them).
    The recall part runs on far blocks of m K-blocks (G a multiple of m); `stateless`: the blocks
    are a whole row (an empty state before them, and the state after them is not wanted)."""
    q, k, v, ql, kl, gate, log_decay, seg = blocks
    far_state, k_last, v_last, seg_last = state
    bsz, h, g, block, c = v.shape
    k_prev, v_prev, seg_prev = (jnp.concatenate([last[:, :, None], a[:, :, :-1]], axis=2)  # block n-1 at n
                                for last, a in ((k_last, k), (v_last, v), (seg_last, seg)))
    i = jnp.arange(block)
    same_own = (seg[..., :, None] == seg[..., None, :]) & (i[:, None] >= i[None, :])  # [b,1,G,k,j] lag k-j
    same_prev = seg[..., :, None] == seg_prev[..., None, :]  # lag K+k-j
    in_window = i[:, None] < i[None, :]  # [k,j]: lag K+k-j < K
    # Window: a blocked softmax over two [K, K] tiles, its own block (j <= k; the diagonal is
    # always allowed, so it goes first) and block n-1 (j > k).
    window = softmax_tiles(q, [(k, v, same_own), (k_prev, v_prev, same_prev & in_window)])

    coarse = lambda a: a.reshape(a.shape[0], a.shape[1], g // m, m * block, *a.shape[4:])  # noqa: E731
    num, den, far_state = _far(*map(coarse, (ql, kl, v, gate, log_decay, seg)), far_state, seg_last[..., -1],
                               stateless)
    y = joint_read(*window, num.reshape(bsz, h, g, block, c), den.reshape(bsz, h, g, block))
    return y.astype(v.dtype), (far_state, k[:, :, -1], v[:, :, -1], seg[:, :, -1])


# The recall decay's fastest rate, in nats per token: a_t >= exp(-0.4) = 0.67 (a half-life of at least
# 1.7 tokens; the window reads the last K tokens exactly whatever the decay). Bounding it bounds the
# decay across a far block of B positions by 0.4 B nats, so that `_own_pairs` can split each pair's
# decay between its query and key sides, each factor within e^(+-0.1 B): e^(+-51) for B <= MAX_FAR_BLOCK,
# which leaves fp32 (to e^88) room for the features' own scale in the backward pass's products.
MAX_FORGET_RATE = 0.4
# Far blocks of rows longer than MAX_FAR_BLOCK (or than a scan step): measured fastest of 64-512 at 1k
# and 8k tokens (tiny widths, forward and backward, 2-core CPU); shorter rows are one far block.
FAR_BLOCK = 128


def forget_log_decay(z: Array) -> Array:
    """log a_t of the recall decay from its logit z (x . w_forget + b_forget): -softplus(z), softly
    bounded by MAX_FORGET_RATE (rate = M tanh(softplus(z) / M)): -softplus(z) itself while that is
    small (every rate below 0.1 within 2.1%), never below -MAX_FORGET_RATE."""
    return -MAX_FORGET_RATE * jnp.tanh(jax.nn.softplus(z) / MAX_FORGET_RATE)


# ------------------------------------------------------------------ products with a hand-written backward
# The window's and the recall part's batched products, scores "...kc,...jc->...kj" and weights times
# values "...kj,...jc->...kc", differentiated by hand. Autodiff gives one operand's gradient as a
# product that contracts the row axis of both of its operands (g^T q, w^T g), which XLA:CPU runs 2-5x
# slower than the same sums in another layout. `rows_product` computes them in a layout that runs
# fast and transposes the result (or the small operand) behind an optimization barrier, so that XLA
# does not fold the transpose back into the product. Same sums, same dtypes (mixed operands, fp32
# sums) as autodiff's. Olmax tiny's train step (2-core CPU) ran 1-2% faster with them at 256 tokens a
# row, 2-5% at 4096; the block states' sums (`_far`) use `rows_product` directly. On other platforms
# (whose matmul libraries take either layout) they are the plain products, differentiated by autodiff:
# a barrier there would only keep XLA from folding the transposes away.


# None: the hand-written backward when the program is traced for the CPU; True / False: forced by
# `products_for` (olmax.plan compiles an accelerator's step on the CPU).
_HAND_BACKWARD: contextvars.ContextVar[bool | None] = contextvars.ContextVar("olmax_hand_backward", default=None)


def _hand_backward() -> bool:
    forced = _HAND_BACKWARD.get()
    return jax.default_backend() == "cpu" if forced is None else forced


@contextlib.contextmanager
def products_for(platform: str):
    """Within it, the products are built as for `platform` ("cpu": with the hand-written backward;
    any other: autodiff's plain products), whichever backend traces them."""
    token = _HAND_BACKWARD.set(platform == "cpu")
    try:
        yield
    finally:
        _HAND_BACKWARD.reset(token)


def _batched_dot(x: Array, y: Array, x_axis: int, y_axis: int, dtype) -> Array:
    """Contract axis x_axis of x with y_axis of y (one of the last two each), batched over the
    leading axes (equal shapes): [..., free x, free y] in `dtype`."""
    batch = tuple(range(x.ndim - 2))
    return jax.lax.dot_general(x, y, (((x_axis % x.ndim,), (y_axis % y.ndim,)), (batch, batch)),
                               preferred_element_type=dtype)


def rows_product(x: Array, y: Array, dtype=jnp.float32) -> Array:
    """x^T y over the last two axes, x [..., k, m], y [..., k, n] -> [..., m, n] in `dtype`.

    Measured on XLA:CPU ([32, 4] batches): a small x (window tiles, k m <= 64^2) transposed first,
    then multiplied, runs 2x faster than the direct product; for a large x, (y^T x) [n, m] runs 1.2x
    (n = 32) to 4.7x (n = 16) faster than [m, n] (k = m = 256) and its transpose costs little."""
    k, m = x.shape[-2:]
    if not _hand_backward():
        return _batched_dot(x, y, -2, -2, dtype)
    if k * m <= 64 * 64:
        xt = jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))
        return _batched_dot(xt, y, -1, -2, dtype)
    return jnp.swapaxes(jax.lax.optimization_barrier(_batched_dot(y, x, -2, -2, dtype)), -1, -2)


def scores_product(q: Array, k: Array) -> Array:
    """q [..., k, c] . k [..., j, c] -> [..., k, j], fp32 sums (as softmax attention's q . k)."""
    return _hand_product(q, k, -1) if _hand_backward() else _batched_dot(q, k, -1, -1, jnp.float32)


def weights_product(w: Array, v: Array) -> Array:
    """w [..., k, j] times v [..., j, c] -> [..., k, c], fp32 sums."""
    return _hand_product(w, v, -2) if _hand_backward() else _batched_dot(w, v, -1, -2, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _hand_product(x: Array, y: Array, y_axis: int) -> Array:
    """x's last axis contracted with y's `y_axis` (-1: scores, -2: weights times values), fp32 sums."""
    return _batched_dot(x, y, -1, y_axis, jnp.float32)


def _hand_product_fwd(x, y, y_axis):
    return _hand_product(x, y, y_axis), (x, y)


def _hand_product_bwd(y_axis, res, g):
    x, y = res
    other = -2 if y_axis == -1 else -1  # y's axis that is not contracted
    dx = _batched_dot(g, y, -1, other, jnp.float32).astype(x.dtype)  # scores: g k; weights: g v^T
    dy = rows_product(g, x) if y_axis == -1 else rows_product(x, g)  # scores: g^T q [j, c]; weights: w^T g [j, c]
    return dx, dy.astype(y.dtype)


_hand_product.defvjp(_hand_product_fwd, _hand_product_bwd)


def _own_pairs(ql, kl, v, gate, A, seg):
    """`_far`'s pairs within each far block: ql, kl [..., B, r], v [..., B, c], gate and A (the
    cumulative log decay from the block's start) [..., B], seg [b, 1, ..., B] -> num [..., B, c],
    den [..., B] of the weights g_s (ql_t . kl_s)^2 / (2 r) e^(A_t - A_s) over s <= t, same segment."""
    r = ql.shape[-1]
    i = jnp.arange(ql.shape[-2])
    own = (seg[..., :, None] == seg[..., None, :]) & (i[:, None] >= i[None, :])  # [b,1,..,t,s]: s <= t
    # (ql_t . kl_s)^2 / (2 r) e^(A_t - A_s) = (ql'_t . kl'_s)^2 with the decay split around the block's
    # half-way decay H = A_end / 2: ql' = ql e^((A_t - H) / 2) / sqrt(2 r), kl' = kl e^((H - A_s) / 2).
    # One [B, B] matmul and a square, no [B, B] exponential; every factor within e^(+-B MAX_FORGET_RATE / 4).
    half = A[..., -1:] / 2
    qd = ql.astype(jnp.float32) * (jnp.exp((A - half) / 2) / math.sqrt(2 * r))[..., None]
    kd = kl.astype(jnp.float32) * jnp.exp((half - A) / 2)[..., None]
    # Masked before the square: a pair s > t has the factors e^((A_t - A_s) / 2) >= 1, up to e^(0.2 B),
    # which may overflow; selected away first, it passes no inf (and no 0 x inf) to the gradient.
    # In the features' dtype (bf16 in a bf16 model, as q . k is), summed in fp32.
    pairs = scores_product(qd.astype(ql.dtype), kd.astype(kl.dtype))
    pairs = jnp.where(own, pairs, 0.0)
    kern = pairs * pairs
    # The write gate g_s scales the values and the normalizer's ones ([B] each), not the [B, B] weights.
    num = weights_product(kern, v.astype(jnp.float32) * gate[..., None])
    den = jnp.einsum("...kj,...j->...k", kern, gate)
    return num, den


def _far(ql, kl, v, gate, log_decay, seg, state_in, last_in, stateless=False):
    """The recall part of `axial_recall` over G far blocks [b, h, G, B, ...] of B positions: (num
    [b,h,G,B,c], den [b,h,G,B], the summed state after them) of the gated, decayed kernel over every
    lag, from the own far block pairwise and earlier far blocks through per-block states, the blocks
    before these through `state_in` (their summed state and normalizer at the end of the last of
    them; `last_in` [b,1] the segment open there). `stateless`: the blocks are a whole row (state_in
    empty, and no state wanted after them; a single far block then reads and writes none: state None).
    O(G B (B (r + c) + F c) + G^2 F c)."""
    g = v.shape[2]
    # Decay within a block: A_t = log a_0 + ... + log a_t, in [-B MAX_FORGET_RATE, 0].
    A = jnp.cumsum(log_decay, axis=-1)  # [b,h,G,B]
    if g == 1:  # without a G axis of 1, which XLA:CPU would lay out apart and copy [B, B] arrays for
        num, den = (a[:, :, None] for a in _own_pairs(*(a[:, :, 0] for a in (ql, kl, v, gate, A, seg))))
        if stateless:  # one block, the whole row: its pairs alone
            return num, den, None
    else:
        num, den = _own_pairs(ql, kl, v, gate, A, seg)
    # Each block's state holds its tokens of the segment that is open at the block's end
    # (`last`), decayed to the block's end, and so does its normalizer; a query reads the sum over
    # the earlier blocks that end in its own segment, decayed from the end of the block before it
    # to itself. Contiguous segments make those blocks one run ending
    # at the block before it, so the sums are a running sum that restarts where `last` changes
    # and otherwise carries the previous sum times the block's decay: a linear scan over the
    # blocks, the incoming state first.
    last = jnp.concatenate([last_in[..., None], seg[..., -1]], axis=-1)  # [b,1,G+1]: 0 is the state's
    write = gate * jnp.exp(A[..., -1:] - A) * (seg == last[..., 1:, None])  # [b,h,G,k]
    fk = quadratic_features(kl) * write[..., None]  # [b,h,G,k,F]
    # The blocks' states [b,h,G,F,c] and normalizers [b,h,G,F] (kept apart: a +1 value column
    # would make c + 1 = 65 lanes of every state, padded to 128 on an accelerator), after the
    # incoming ones.
    states = rows_product(fk, v.astype(jnp.float32))
    norms = jnp.sum(fk, axis=3)
    states = jnp.concatenate([state_in[0][:, :, None], states], axis=2)  # [b,h,G+1,F,c]
    norms = jnp.concatenate([state_in[1][:, :, None], norms], axis=2)  # [b,h,G+1,F]
    # runs_m = states_m + keep_m runs_{m-1}, keep_m = the block's decay where the run goes on, as one
    # matmul (Mamba-2's state passing): runs_m = sum_{m' <= m, same run} exp(C_m - C_m') states_m',
    # C the cumulative block decay. A scan's levels would each write a [G, F, c] buffer.
    same_run = (last == shift_right(last, 1, axis=2)) & (jnp.arange(last.shape[-1]) > 0)
    run = jnp.cumsum(~same_run, axis=-1)  # [b,1,G+1]: which run each block is in
    C = jnp.cumsum(jnp.pad(A[..., -1], ((0, 0), (0, 0), (1, 0))), axis=-1)  # [b,h,G+1]
    m = jnp.arange(last.shape[-1])
    passes = (m[:, None] >= m[None, :]) & (run[..., :, None] == run[..., None, :])  # [b,1,G+1,G+1]
    carry = jnp.exp(jnp.where(passes, C[..., :, None] - C[..., None, :], -jnp.inf))
    runs = jnp.einsum("bhmn,bhnfc->bhmfc", carry, states)
    run_norms = jnp.einsum("bhmn,bhnf->bhmf", carry, norms)
    # Block m reads the run up to block m-1 (index m of `runs`), if it ends in the query's segment.
    read = jnp.exp(A) * (seg == last[..., :-1, None])  # [b,h,G,k]
    fq = quadratic_features(ql) * read[..., None]  # [b,h,G,k,F]
    num = num + weights_product(fq, runs[:, :, :-1])
    den = den + jnp.einsum("bhnkf,bhnf->bhnk", fq, run_norms[:, :, :-1])
    return num, den, (runs[:, :, -1], run_norms[:, :, -1])


def softmax_tiles(q: Array, tiles: Sequence[tuple[Array, Array, Array]]) -> tuple[Array, Array]:
    """Softmax attention of the queries q [..., k, c] over key tiles, one tile at a time as a
    flash kernel does: (out [..., k, c], lse [..., k]), fp32, out the normalized read and lse the
    log-sum-exp of the allowed scores q . keys / sqrt(c), which `joint_read` combines exactly with
    the recall sums.

    tiles: (keys [..., j, c], values [..., j, c], allowed [..., k, j] broadcastable); the first
    tile must allow every query at least one key (a later one may allow none). A running max
    and sum carry across tiles, so no score matrix wider than one tile is formed and no key or
    value is copied into a concatenation. Probabilities meet the values in the values' dtype,
    summed in fp32, as softmax attention does.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    top = total = acc = None
    for keys, values, allowed in tiles:
        s = scores_product(q, keys) * scale
        s = jnp.where(allowed, s, -jnp.inf)
        # The result does not depend on the running max: no gradient through it.
        new_top = jax.lax.stop_gradient(jnp.max(s, axis=-1) if top is None else jnp.maximum(top, jnp.max(s, axis=-1)))
        p = jnp.exp(s - new_top[..., None])
        read = weights_product(p.astype(values.dtype), values)
        if top is None:
            total, acc = jnp.sum(p, axis=-1), read
        else:
            rescale = jnp.exp(top - new_top)
            total, acc = rescale * total + jnp.sum(p, axis=-1), rescale[..., None] * acc + read
        top = new_top
    return acc / total[..., None], top + jnp.log(total)


def joint_read(out: Array, lse: Array, num: Array, den: Array) -> Array:
    """(sum_j exp(s_j) v_j + num) / (sum_j exp(s_j) + den): the window's softmax read (out [..., c]
    and its log-sum-exp lse [...], `softmax_tiles`) and the recall's kernel sums (num [..., c],
    den [...] >= 0) under one denominator, fp32. That is a mix of the two normalized reads,
    out and num / den, weighted exp(lse) : den, each scaled by exp(-M), M = max(lse, log den)
    (the log-sum-exp trick, extended to the kernel sums), so neither weight overflows; a query
    with no recall weight (den = 0, or below 1e-30) reads plain softmax.
    """
    has_far = den > _TINY_SUM
    log_den = jnp.where(has_far, jnp.log(jnp.where(has_far, den, 1.0)), -jnp.inf)
    top = jax.lax.stop_gradient(jnp.maximum(lse, log_den))  # the result does not depend on it
    near, far = jnp.exp(lse - top), jnp.exp(log_den - top)  # in [0, 1], one of them 1
    mean_far = _mean(num, jnp.where(has_far, den, 1.0))
    return (near[..., None] * out + far[..., None] * mean_far) / (near + far)[..., None]


# Kernel sums below this are read as empty: their weight is < 1e-30 of one window term unless
# every window logit is below -69. Keeps the denominators of `_mean`'s derivative normal.
_TINY_SUM = 1e-30


@jax.custom_jvp
def _mean(num: Array, den: Array) -> Array:
    """num / den[..., None] with the derivative (dnum - mean dden) / den: autodiff's
    -num dden / den^2 squares den, which underflows to 0 in fp32 below ~1e-19 and made the
    gradient -inf where a far sum was tiny (a closed write gate, a key orthogonal to the query)."""
    return num / den[..., None]


@_mean.defjvp
def _mean_jvp(primals, tangents):
    (num, den), (dnum, dden) = primals, tangents
    mean = num / den[..., None]
    return mean, (dnum - mean * dden[..., None]) / den[..., None]


def forget_init(block: int, max_length: int):
    """b_forget's init: the heads' decay spectrum, as half-lives in tokens. Head 0 never forgets
    (half-life ~3e8 tokens; softplus' slope there, ~2e-9, keeps it so unless w_forget learns
    otherwise); the others' half-lives spread geometrically from max_length down to 2 K, so some
    heads remember the whole row and some little more than the window. A head whose decay is
    a at every token has half-life ln 2 / -log a: b = the logit z with -forget_log_decay(z) = ln 2 /
    half-life (every half-life here is >= 2 tokens, a rate below MAX_FORGET_RATE)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        (h,) = shape
        half_lives = np.geomspace(max_length, min(2 * block, max_length), max(h - 1, 1))[: h - 1]
        rates = np.log(2.0) / half_lives
        softplus = MAX_FORGET_RATE * np.arctanh(rates / MAX_FORGET_RATE)  # undoes forget_log_decay's bound
        bias = np.concatenate([[-20.0], np.log(np.expm1(softplus))])
        return jnp.asarray(bias, dtype)

    return init


class RecallMixer(nn.Module):
    """Axial recall mixer: content-addressed token mixing at O(N^1.5), Olmax's default mixer.

    The fixed lag filters of the AxialMixer cannot look a value up by its key. This mixer
    keeps the same grid but mixes by content (see `axial_recall`): one normalized read of
    the values, with quadratic-kernel (linear attention) weights over the whole past, read
    from per-block states (the block axis), plus exact softmax weights over a sliding window
    of K positions (the offset axis). A write gate g_s = sigmoid(x_s . w + b) per head
    scales what each token adds to those states, so tokens that carry nothing to recall
    stay out of the long-range read, and a forget rate per head and token,
    a_t = exp(forget_log_decay(x_t . w_f + b_f)) (-softplus, at most MAX_FORGET_RATE nats a
    token), decays the state before each write (GLA's and
    Mamba-2's data-dependent decay, on the quadratic-kernel state): without it every written
    token keeps its weight forever, so a matching key's share of the far read and the window's
    share of the whole read fall like 1 / N as rows grow; with it they depend on the ~1 / (1 - a)
    most recent writes, which the model chooses. `forget_init` spreads the heads' initial
    half-lives from never (head 0: a memory of the whole row, diluted only by what the gate
    lets in) to 2 K. Heads `num_heads`, recall features `recall_features` per head. Strictly
    causal, full causal receptive field in one layer (every past pair has weight
    g_s a_{s+1} .. a_t s^2 / 2 > 0 unless its recall key is orthogonal to the query), packed
    segments mixed as if alone.

    A decode step keeps the last K keys and values [b, K, h, c] and the recall state
    [b, h, F, c] with its normalizer [b, h, F] (fp32): both decay by a_t, then the new
    position enters them, as compensated sums (their rounding errors kept beside them in the
    compute dtype, `compensated_decay_add`), so a long decode does not drift from the forward.
    O(K c + F c) per head and token.
    """

    config: OlmaxConfig

    @nn.compact
    def __call__(self, x: Array, ctx: Context, decode: str | None = None) -> tuple[Array, dict]:
        cfg = self.config
        bsz, length, d = x.shape
        h, r, block = cfg.num_heads, cfg.recall_features, cfg.block_size
        c = d // h
        init = fan_in_normal((0,))
        # Every projection is [embed, heads, per-head width]: a 'model' mesh axis splits all of them
        # by head, and their concatenation (one matmul) and split run on each device's heads alone.
        names = {"wq": c, "wk": c, "wv": c, "wq_recall": r, "wk_recall": r, "w_write_gate": 1, "w_forget": 1}
        # w_forget starts at zero: every head decays at its spectrum's rate until it learns otherwise.
        w = [param_with_axes(n, nn.initializers.zeros if n == "w_forget" else init, (d, h, e),
                             axes=("embed", "heads", "kv")) for n, e in names.items()]
        gate_bias = param_with_axes("b_write_gate", nn.initializers.zeros, (h,), axes=("heads",))
        forget_bias = param_with_axes("b_forget", forget_init(block, cfg.max_length), (h,), axes=("heads",))
        wo = param_with_axes("wo", init, (d, d), axes=("heads", "embed")).astype(cfg.dtype)
        if decode is not None:
            by_head = ("activation_batch", None, "activation_heads", None)  # [b, K, h, c]
            window = {n: cache_variable(self, decode, n, (bsz, block, h, c), cfg.dtype, by_head)
                      for n in ("keys", "values")}
            feats = feature_size(r)
            state_axes = ("activation_batch", "activation_heads", None, None)
            state = cache_variable(self, decode, "state", (bsz, h, feats, c), jnp.float32, state_axes)
            norm = cache_variable(self, decode, "norm", (bsz, h, feats), jnp.float32, state_axes[:3])
            # What fp32 rounding took from them: their compensations (see `compensated_decay_add`).
            errs = (cache_variable(self, decode, "state_err", (bsz, h, feats, c), cfg.dtype, state_axes),
                    cache_variable(self, decode, "norm_err", (bsz, h, feats), cfg.dtype, state_axes[:3]))
            if decode == "init":
                return jnp.zeros_like(x), zero_aux()
        kernel = jnp.concatenate(w, axis=2).astype(cfg.dtype)
        splits = list(itertools.accumulate(names.values()))[:-1]
        # The projection runs inside the scan over chunks. cfg.reduce_chunk_grads_once: one copy of its
        # weights per data-parallel shard, so that their gradient is all-reduced once a step, not once
        # a chunk (`per_data_shard`).
        parts = data_shards(bsz) if cfg.reduce_chunk_grads_once else 1
        kernel = per_data_shard(kernel, parts, ("embed", "heads", "kv"))
        biases = per_data_shard(jnp.stack([gate_bias, forget_bias], axis=-1), parts, ("heads", None))  # [(g,) h, 2]

        def project(x: Array, positions: Array) -> tuple:
            """x [b,t,d] -> q, k, v, ql, kl [b,t,h,*], gate, log_decay [b,t,h]: one matmul for all."""
            proj = matmul(x, kernel, parts)  # [b,t,d] -> [b,t,h,3c + 2r + 2]
            proj = constrain(proj, ("activation_batch", "activation_length", "activation_heads", None))
            q, k, v, ql, kl, gf = jnp.split(proj, splits[:-1], axis=-1)
            # Each shard's rows with its copy of the biases (one group, the biases, when parts == 1).
            groups = gf.astype(jnp.float32).reshape(parts, -1, *gf.shape[1:])  # [g, b/g, t, h, 2]
            gf = (groups + biases.reshape(parts, 1, 1, *biases.shape[-2:])).reshape(gf.shape)
            gate = jax.nn.sigmoid(gf[..., 0])  # [b,t,h]
            log_decay = forget_log_decay(gf[..., 1])  # [b,t,h], in (-MAX_FORGET_RATE, 0]
            return rotary(q, positions), rotary(k, positions), v, ql, kl, gate, log_decay

        if decode is None:  # training and eval: projected chunk by chunk inside the scan over the row
            y = chunked_recall(project, (x, ctx.positions), ctx.segment_ids, block, far_block=cfg.recall_far_block,
                               chunk=cfg.recall_chunk)
            return matmul(y.reshape(bsz, -1, d), wo), zero_aux()
        q, k, v, ql, kl, gate, log_decay = project(x, ctx.positions)
        if decode == "step":
            y = recall_step(window, state, norm, errs, q, k, v, ql, kl, gate, log_decay, ctx.positions[:, 0])
        else:
            y = axial_recall(q, k, v, ql, kl, gate, ctx.segment_ids, block, log_decay=log_decay,
                             far_block=cfg.recall_far_block, chunk=cfg.recall_chunk)
            if decode == "prefill":
                lengths = ctx.prefill_lengths
                for name, a in (("keys", k), ("values", v)):
                    window[name].value = last_positions(a.astype(cfg.dtype), lengths, block)
                prompt = (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.float32)[..., None]  # [b,t,1]
                # Position s enters the state decayed by a_{s+1} ... a_{L-1} (L: the prompt's length):
                # a reversed cumulative sum, exclusive, so that recent positions keep their precision.
                after = jnp.cumsum((log_decay * prompt)[:, ::-1], axis=1)[:, ::-1]
                after = jnp.pad(after[:, 1:], ((0, 0), (0, 1), (0, 0)))  # [b,t,h]
                fk = quadratic_features(kl) * (gate * prompt * jnp.exp(after))[..., None]  # [b,t,h,F]
                state.value = jnp.einsum("bthf,bthc->bhfc", fk, v.astype(jnp.float32))
                norm.value = jnp.sum(fk, axis=1)
                for err in errs:  # a blocked sum (matmul): nothing to carry
                    err.value = jnp.zeros_like(err.value)
        return matmul(y.reshape(bsz, -1, d), wo), zero_aux()


def compensated_decay_add(total: Array, err: Array, decay_m1: Array, x: Array) -> tuple[Array, Array]:
    """(total, err) <- a (total + err) + x, a = 1 + decay_m1, as Kahan's compensated sum: `total`
    fp32, `err` (any float dtype) what its rounding has lost so far.

    A decode step adds one token to the recall state and its normalizer, one fp32 sum per token,
    where the full forward sums a block at a time in matmuls. Plain, the steps would drift from
    the forward twice over, both growing with the number of steps n: each add rounds (~n eps),
    and a head that (nearly) never forgets (forget_init's head 0: 1 - a ~ 2e-9) would not decay
    at all, since a rounds to 1.0 in fp32 where the forward's cumulative log-decay does not
    (2e-4 of the state after 1e5 tokens). Here the decay enters as decay_m1 total, added like
    the token, and `err` carries both roundings into the next step: the error stays at a few
    eps whatever n (tests/test_decoding.py measures 1e5 steps against a float64 sum). `err`
    kept in the compute dtype still recovers all but ~2^-8 of what was lost in bf16."""
    y = x + decay_m1 * total + (1.0 + decay_m1) * err.astype(jnp.float32)
    new = total + y
    return new, (y - (new - total)).astype(err.dtype)


def recall_step(window: dict, state: nn.Variable, norm: nn.Variable, errs: tuple, q, k, v, ql, kl, gate,
                log_decay, t: Array) -> Array:
    """One position t [b] per row of the recall mixer from its cache; q, k, v, ql, kl [b, 1, h, *],
    gate, log_decay [b, 1, h] -> [b, 1, h, c]. The window holds positions t-K..t-1 before the step,
    t-K+1..t after; the recall state every position < t (decayed to t-1) before, <= t after.
    errs: the state's and the normalizer's compensations (`compensated_decay_add`)."""
    keys, values = (slide(window[n], a.astype(window[n].value.dtype)) for n, a in (("keys", k), ("values", v)))
    block = keys.shape[1] - 1
    decay_m1 = jnp.expm1(log_decay[:, 0])  # [b,h]: a - 1, exact where a itself would round to 1
    entering = quadratic_features(kl[:, 0]) * gate[:, 0, :, None]  # [b,h,F]
    state_err, norm_err = errs
    state.value, state_err.value = compensated_decay_add(
        state.value, state_err.value, decay_m1[..., None, None],
        jnp.einsum("bhf,bhc->bhfc", entering, v[:, 0].astype(jnp.float32)))
    norm.value, norm_err.value = compensated_decay_add(norm.value, norm_err.value, decay_m1[..., None], entering)
    keys, values = (jnp.swapaxes(a[:, 1:], 1, 2) for a in (keys, values))  # [b,h,K,c]: positions t-K+1 .. t
    valid = t[:, None] - block + 1 + jnp.arange(block)[None, :] >= 0  # [b,j]; t itself always
    out, lse = softmax_tiles(q[:, 0, :, None], [(keys, values, valid[:, None, None])])  # [b,h,1,c], [b,h,1]
    fq = quadratic_features(ql[:, 0])  # [b,h,F]
    num = jnp.einsum("bhf,bhfc->bhc", fq, state.value)
    den = jnp.einsum("bhf,bhf->bh", fq, norm.value)
    y = joint_read(out[:, :, 0], lse[:, :, 0], num, den)
    return y.astype(values.dtype)[:, None]


MIXERS = {"recall": RecallMixer, "axial": AxialMixer, "attention": Attention}
