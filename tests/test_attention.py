"""The attention baseline's kernels (olmax/attention.py): the blockwise (flash-style) kernel
computes the materialized reference's outputs and gradients, is causal and segment-exact,
and its step memory grows linearly in the row length."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmax import attention, network


def _inputs(b=2, t=37, h=3, c=8, seed=0, dtype=jnp.float32):
    rng = np.random.RandomState(seed)
    q, k, v, w = (jnp.asarray(rng.randn(b, t, h, c), dtype) for _ in range(4))
    packed = np.ones((b, t), np.int32)
    packed[1, 11:] = 2
    packed[1, 30:] = 0  # padding: its own segment
    return q, k, v, w, {"unpacked": jnp.ones((b, t), jnp.int32), "packed": jnp.asarray(packed)}


@pytest.mark.parametrize("block", [8, 16, 64])  # several tiles with a ragged last one; one tile
@pytest.mark.parametrize("segments", ["unpacked", "packed"])
def test_blockwise_matches_materialized(block, segments):
    q, k, v, w, segs = _inputs()
    seg = segs[segments]

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * w), argnums=(0, 1, 2)))

    ref_out = attention.materialized_attention(q, k, v, seg)
    out = jax.jit(lambda *a: attention.blockwise_attention(*a, block=block))(q, k, v, seg)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
    (_, ref_grads), (_, grads) = loss(attention.materialized_attention)(q, k, v), loss(
        lambda *a: attention.blockwise_attention(*a, block=block))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert float(jnp.abs(r).max()) > 1e-3, name  # the reference gradient is not trivially zero
        np.testing.assert_allclose(g, r, atol=5e-6, rtol=1e-5, err_msg=f"d{name}")


def test_blockwise_bf16_close_to_fp32_reference():
    q, k, v, _, segs = _inputs(t=64)
    ref = attention.materialized_attention(q, k, v, segs["packed"])
    out = attention.blockwise_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), segs["packed"], block=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_blockwise_is_causal_and_segment_exact():
    q, k, v, _, segs = _inputs()
    seg = segs["packed"]
    base = attention.blockwise_attention(q, k, v, seg, block=8)
    for s in (0, 7, 8, 20, 36):
        k2, v2 = k.at[:, s].add(1.0), v.at[:, s].add(1.0)
        out = attention.blockwise_attention(q, k2, v2, seg, block=8)
        np.testing.assert_array_equal(out[:, :s], base[:, :s])  # nothing before s sees s
        seen = np.abs(np.asarray(out - base)).max(axis=(2, 3)) > 0  # [b, t]
        same = np.asarray(seg) == np.asarray(seg)[:, s:s + 1]
        # at and after s: exactly the positions of s's own segment see it
        np.testing.assert_array_equal(seen[:, s:], same[:, s:])


def test_auto_is_blockwise_off_gpu_and_cudnn_refuses_packed_rows():
    q, k, v, _, segs = _inputs()
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(
            attention.causal_attention(q, k, v, segs["packed"], block=8, packed=False),
            attention.blockwise_attention(q, k, v, segs["packed"], block=8))
    with pytest.raises(ValueError, match="no segment mask.*'blockwise'"):
        attention.causal_attention(q, k, v, segs["packed"], implementation="cudnn", packed=True)
    with pytest.raises(ValueError, match="attention_impl='flash' is not one of"):
        network.OlmaxConfig(mixer="attention", attention_impl="flash")


def _grad_temp_bytes(fn, length, h=4, c=32):
    sds = jax.ShapeDtypeStruct((1, length, h, c), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)
    grad = jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s) ** 2), argnums=(0, 1, 2))
    return jax.jit(grad).lower(sds, sds, sds, seg).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly():
    blockwise = {n: _grad_temp_bytes(attention.blockwise_attention, n) for n in (8192, 32768)}
    materialized = _grad_temp_bytes(attention.materialized_attention, 8192)
    print("blockwise temp bytes", blockwise, "materialized at 8192", materialized)
    assert blockwise[32768] <= 5 * blockwise[8192]  # 4x the row: at most 5x the memory
    assert 1 * 4 * 8192 * 8192 * 4 < materialized  # the reference holds [b, h, N, N] fp32 scores
    assert 20 * blockwise[8192] < materialized


def test_network_logits_and_gradients_equal_across_kernels():
    """The attention mixer in the network: blockwise (several tiles) == materialized, packed rows."""
    cfg = network.OlmaxConfig(vocab_size=64, features=32, depth=2, max_length=48, conv_features=32,
                              mixer="attention", num_heads=2, attention_block=16)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 48), 1, 64)
    seg = jnp.ones((2, 48), jnp.int32).at[1, 20:].set(2)
    pos = jnp.where(seg == 2, jnp.arange(48) - 20, jnp.arange(48))
    params = network.Olmax(cfg).init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False)["params"]

    def loss(impl):
        module = network.Olmax(dataclasses.replace(cfg, attention_impl=impl))
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(module.apply(
            {"params": p}, tokens, decoder_segment_ids=seg, decoder_positions=pos, enable_dropout=False) ** 2)))

    (l_ref, g_ref), (l_blk, g_blk) = loss("materialized")(params), loss("blockwise")(params)
    np.testing.assert_allclose(l_blk, l_ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_blk), jax.tree.leaves(g_ref)):
        scale = float(jnp.abs(b).max()) + 1e-12
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-5)
