"""Causal softmax attention kernels for the attention baseline (mixers.Attention), none of
which keeps an [N, N] array in training:

  blockwise     flash-style attention in JAX on every platform: an online softmax over
                [B, B] tiles of queries x keys, tiles above the diagonal skipped, and a
                custom VJP that recomputes each tile's probabilities from the saved
                log-sum-exp, so forward and backward hold O(N B) per head, never O(N^2).
  cudnn         jax.nn.dot_product_attention(implementation="cudnn"), the fused kernel
                on NVIDIA GPUs; it has no segment mask, so rows with packed segments use
                `blockwise` there too.
  materialized  the [b, h, N, N] scores and softmax: the test reference (and what the
                baseline computed before it was made lean). O(N^2) memory.

All take q, k, v [b, t, h, c] (rotary already applied), segment_ids [b, t] (tokens attend
within equal ids only) and return [b, t, h, c] in v's dtype; scores and softmax in fp32.
Every row attends to itself at least (the diagonal), so no row is empty.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "blockwise", "cudnn", "materialized")
_MASKED = -1e30  # a finite "minus infinity": a fully masked tile keeps exp() finite


def causal_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, implementation: str = "auto",
                     block: int = 512, packed: bool = True) -> Array:
    """Causal attention within segments, by `implementation` (see the module docstring).

    "auto": cudnn on a GPU for unpacked rows (packed=False: segment_ids all equal, as the
    network passes them when the caller gave none), blockwise everywhere else.
    """
    if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" and not packed else "blockwise"
    if implementation == "cudnn":
        if packed:
            raise ValueError("attention_impl='cudnn' has no segment mask: rows with decoder_segment_ids "
                             "(packed examples) need attention_impl='auto' or 'blockwise'.")
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if implementation == "materialized":
        return materialized_attention(q, k, v, segment_ids)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, block=block)
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}.")


def _allowed(seg_q: Array, seg_k: Array, pos_q: Array, pos_k: Array) -> Array:
    """[..., tq] x [..., tk] -> [..., tq, tk]: same segment and key not after the query."""
    return (seg_q[..., :, None] == seg_k[..., None, :]) & (pos_q[..., :, None] >= pos_k[..., None, :])


def materialized_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
    """The O(N^2)-memory reference: fp32 scores [b, h, t, t], masked softmax, weighted values."""
    t = jnp.arange(q.shape[1])
    mask = _allowed(segment_ids, segment_ids, t, t)[:, None]  # [b,1,t,s]
    logits = jnp.einsum("bthc,bshc->bhts", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshc->bthc", probs, v)


def blockwise_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int = 512) -> Array:
    """Flash-style causal attention: `materialized_attention`'s result in O(N B) memory per head.

    The row is padded to n tiles of B = min(block, t) positions (padding gets segment -1, so it
    only ever meets itself); query tile i reads key tiles 0..i.
    """
    bsz, length, h, c = q.shape
    size = min(block, length)
    n = -(-length // size)
    pad = n * size - length

    def tiles(a: Array) -> Array:  # [b, t, h, c] -> [b, h, n, B, c]
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(bsz, n, size, h, c)
        return jnp.transpose(a, (0, 3, 1, 2, 4))

    seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1).reshape(bsz, 1, n, size)
    out = _flash(tiles(q), tiles(k), tiles(v), seg)
    return jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(bsz, n * size, h, c)[:, :length]


def _tile(a: Array, i: Array) -> Array:
    """Tile i of a [b, h, n, B, ...] array: [b, h, B, ...]."""
    return jax.lax.dynamic_index_in_dim(a, i, axis=2, keepdims=False)


def _scores(q_i: Array, k_j: Array, seg_i: Array, seg_j: Array, i: Array, j: Array) -> Array:
    """Masked fp32 scores of query tile i against key tile j: [b, h, B, B]."""
    size = q_i.shape[-2]
    s = jnp.einsum("bhkc,bhjc->bhkj", q_i, k_j, preferred_element_type=jnp.float32) / math.sqrt(q_i.shape[-1])
    offsets = jnp.arange(size)
    return jnp.where(_allowed(seg_i, seg_j, i * size + offsets, j * size + offsets), s, _MASKED)


def _flash_forward(q: Array, k: Array, v: Array, seg: Array) -> tuple[Array, Array]:
    """(out [b,h,n,B,c] in v's dtype, log-sum-exp [b,h,n,B] fp32), one query tile at a time."""

    def query_tile(i):
        q_i, seg_i = _tile(q, i), _tile(seg, i)

        def key_tile(j, carry):  # online softmax: rescale what was summed when the max grows
            top, total, acc = carry
            s = _scores(q_i, _tile(k, j), seg_i, _tile(seg, j), i, j)
            new_top = jnp.maximum(top, jnp.max(s, axis=-1))
            p = jnp.exp(s - new_top[..., None])
            rescale = jnp.exp(top - new_top)
            pv = jnp.einsum("bhkj,bhjc->bhkc", p.astype(v.dtype), _tile(v, j), preferred_element_type=jnp.float32)
            return new_top, total * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + pv

        shape = q_i.shape[:-1]
        init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(q_i.shape, jnp.float32))
        # Key tiles after i are masked for every query of tile i: the loop stops at the diagonal.
        top, total, acc = jax.lax.fori_loop(0, i + 1, key_tile, init)
        return (acc / total[..., None]).astype(v.dtype), top + jnp.log(total)

    out, lse = jax.lax.map(query_tile, jnp.arange(q.shape[2]))  # [n, b, h, B, ...]
    return jnp.moveaxis(out, 0, 2), jnp.moveaxis(lse, 0, 2)


@jax.custom_vjp
def _flash(q: Array, k: Array, v: Array, seg: Array) -> Array:
    return _flash_forward(q, k, v, seg)[0]


def _flash_fwd(q, k, v, seg):
    out, lse = _flash_forward(q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(residuals, d_out):
    """For each key tile j, the query tiles i >= j: p = exp(s - lse) recomputed from the saved
    log-sum-exp, dv_j += p^T dout_i, ds = p (dout_i v_j^T - rowsum(dout_i out_i)),
    dk_j += ds^T q_i / sqrt(c), dq_i += ds k_j / sqrt(c) (dq accumulated in place across j)."""
    q, k, v, seg, out, lse = residuals
    n, c = q.shape[2], q.shape[-1]
    scale = 1.0 / math.sqrt(c)
    d_out = d_out.astype(v.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b,h,n,B]

    def key_tile(dq, j):
        k_j, v_j, seg_j = _tile(k, j), _tile(v, j), _tile(seg, j)

        def query_tile(i, carry):
            dq, dk_j, dv_j = carry
            q_i, do_i = _tile(q, i), _tile(d_out, i)
            p = jnp.exp(_scores(q_i, k_j, _tile(seg, i), seg_j, i, j) - _tile(lse, i)[..., None])
            dv_j = dv_j + jnp.einsum("bhkj,bhkc->bhjc", p.astype(v.dtype), do_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhkc,bhjc->bhkj", do_i, v_j, preferred_element_type=jnp.float32)
            ds = (p * (dp - _tile(delta, i)[..., None]) * scale).astype(q.dtype)
            dk_j = dk_j + jnp.einsum("bhkj,bhkc->bhjc", ds, q_i, preferred_element_type=jnp.float32)
            dq_i = _tile(dq, i) + jnp.einsum("bhkj,bhjc->bhkc", ds, k_j, preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_index_in_dim(dq, dq_i, i, axis=2), dk_j, dv_j

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(j, n, query_tile, (dq, zeros, zeros))
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_tile, jnp.zeros(q.shape, jnp.float32), jnp.arange(n))
    dk, dv = (jnp.moveaxis(a, 0, 2) for a in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
