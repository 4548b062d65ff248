"""Properties of the network: causality, receptive field, packing, reversibility, memory."""
import contextlib
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmax import layers, mixers, network, reversible

BASE = network.OlmaxConfig(
    vocab_size=64, features=32, depth=2, max_length=64, conv_features=32, conv_kernel=3,
    mixer_block=8, mixer_heads=2, num_heads=2, expert_features=32, expert_group_size=64,
    # several attention tiles and recall and conv chunks per row: the blockwise kernel's tiling
    # and the scans over chunks are exercised (with 4 recall features the far part runs blocked
    # from ~26 tokens on; at 16 a row this short would take the dense path, one chunk)
    attention_block=16, recall_chunk=16, recall_features=4, conv_chunk=16,
)
VARIANTS = {
    "recall_rev": dict(mixer="recall", reversible=True),
    "recall_remat": dict(mixer="recall", reversible=False),
    "axial_rev": dict(mixer="axial", reversible=True),
    "axial_remat": dict(mixer="axial", reversible=False),
    "attention_rev": dict(mixer="attention", reversible=True),
    "attention_remat": dict(mixer="attention", reversible=False),
    # capacity_factor = experts / top_k: every expert can take the whole group, nothing drops
    "axial_moe": dict(mixer="axial", num_experts=4, expert_top_k=2, capacity_factor=2.0),
    "layernorm_pre": dict(norm="layer", placement="pre"),
}
LENGTH = 40  # not a multiple of the mixer block (8)


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
    cfg = dataclasses.replace(BASE, **VARIANTS[request.param])
    module = network.Olmax(cfg)
    tok = jnp.ones((1, cfg.max_length), jnp.int32)
    params = jax.jit(lambda r: module.init(r, tok, tok, enable_dropout=False))(jax.random.PRNGKey(0))["params"]

    @jax.jit
    def apply_jit(params, tokens, segment_ids, positions):
        return module.apply({"params": params}, tokens, decoder_segment_ids=segment_ids,
                            decoder_positions=positions, enable_dropout=False)

    def apply(params, tokens, segment_ids=None, positions=None):
        """Every call is padded to one shape [b, 40] (one compile per variant)."""
        b, t = tokens.shape
        segment_ids = np.ones((b, t), np.int32) if segment_ids is None else segment_ids
        positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
        pad = ((0, 0), (0, LENGTH - t))
        return apply_jit(params, np.pad(tokens, pad), np.pad(segment_ids, pad), np.pad(positions, pad))[:, :t]

    return cfg, params, apply


def test_causal_by_perturbation(model):
    cfg, params, apply = model
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, cfg.vocab_size, (2, LENGTH))
    base = apply(params, tokens)
    for s in (0, 7, 8, 30, 39):
        changed = tokens.copy()
        changed[:, s] = (changed[:, s] + 1 + rng.randint(cfg.vocab_size - 2)) % (cfg.vocab_size - 1) + 1
        out = apply(params, changed)
        np.testing.assert_array_equal(np.asarray(out[:, :s]), np.asarray(base[:, :s]))
        assert np.abs(np.asarray(out[:, s:] - base[:, s:])).max() > 1e-6  # the change is seen at s


def test_packed_equals_unpacked(model):
    cfg, params, apply = model
    rng = np.random.RandomState(1)
    lengths = (13, 21)
    segs = [rng.randint(1, cfg.vocab_size, n) for n in lengths]
    row = np.zeros(40, np.int32)
    seg_ids = np.zeros(40, np.int32)
    pos = np.zeros(40, np.int32)
    start = 0
    for i, s in enumerate(segs):
        row[start:start + len(s)] = s
        seg_ids[start:start + len(s)] = i + 1
        pos[start:start + len(s)] = np.arange(len(s))
        start += len(s)
    packed = apply(params, row[None], seg_ids[None], pos[None])[0]
    start = 0
    for s in segs:
        alone = apply(params, s[None])[0]
        np.testing.assert_allclose(packed[start:start + len(s)], alone, atol=2e-5, rtol=1e-5)
        start += len(s)


def _embedding_jacobian(cfg, length):
    """|d (r . logits[t]) / d x_embedded[s]| for all t, s, as a [t, s] matrix."""
    module = network.Olmax(cfg)
    tokens = jnp.arange(length)[None] % cfg.vocab_size
    params = module.init(jax.random.PRNGKey(1), tokens, tokens, enable_dropout=False)["params"]
    r = jax.random.normal(jax.random.PRNGKey(2), (cfg.vocab_size,))

    def f(delta):  # delta: [t, d] added to the embedded inputs through the embedding table
        p = dict(params)
        emb = p["embedding"]
        p["embedding"] = emb
        x_embedding = jnp.take(emb, tokens[0], axis=0) + delta
        # Route delta into the network: an embedding table with one row per position.
        table = jnp.concatenate([x_embedding, jnp.zeros((cfg.vocab_size - length, cfg.features))])
        p["embedding"] = table
        logits = module.apply({"params": p}, jnp.arange(length)[None], enable_dropout=False)
        return logits[0] @ r  # [t]

    jac = jax.jit(jax.jacrev(f))(jnp.zeros((length, cfg.features)))  # [t, s, d]
    return np.linalg.norm(np.asarray(jac), axis=-1)


@pytest.mark.parametrize("mixer", ["recall", "axial", "attention"])
def test_full_causal_receptive_field_at_depth_2(mixer):
    # Tiny-config sizes: max_length 256, mixer block 16 (16 x 16 grid), depth 2.
    cfg = dataclasses.replace(BASE, vocab_size=256, max_length=256, mixer_block=16, depth=2, mixer=mixer)
    norms = _embedding_jacobian(cfg, cfg.max_length)
    t, s = np.indices(norms.shape)
    assert np.all(norms[s > t] == 0.0), "a logit depends on a later input"
    assert norms[s <= t].min() > 1e-7 * norms.max(), f"missing dependencies: {np.argwhere((norms <= 1e-7 * norms.max()) & (s <= t))[:10]}"


def test_reversible_gradient_equals_autodiff():
    cfg = dataclasses.replace(BASE, depth=3, num_experts=4, capacity_factor=1.0, blocks=("conv", "moe", "mixer"))
    module = network.Olmax(cfg)
    tok = jnp.ones((2, 40), jnp.int32)
    params = module.init(jax.random.PRNGKey(0), tok, tok, enable_dropout=False)["params"]
    stacked = params["decoder"]["layers"]
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 40, cfg.features))
    seg = jnp.ones((2, 40), jnp.int32).at[1, 25:].set(2)
    ctx = layers.Context(segment_ids=seg, positions=jnp.broadcast_to(jnp.arange(40), (2, 40)))
    rngs = jax.random.split(jax.random.PRNGKey(0), cfg.depth)
    fns = network.layer_fns(cfg)
    w = jax.random.normal(jax.random.PRNGKey(4), x.shape)

    def loss(p, x, custom):
        y, aux = reversible.reversible_stack(fns, p, x, ctx, rngs, layers.zero_aux(), custom_gradient=custom)
        return jnp.sum(y * w) + 3.0 * aux["moe_lb_loss"] + 0.5 * aux["moe_z_loss"]

    (l1, g1) = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, True), argnums=(0, 1)))(stacked, x)
    (l2, g2) = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, False), argnums=(0, 1)))(stacked, x)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(flat1) == len(flat2) > 10
    for a, b in zip(flat1, flat2):
        scale = np.abs(np.asarray(b)).max() + 1e-12
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=2e-5)


def test_params_as_t5x_hands_them():
    """T5X passes FrozenDict parameters (train) and restores them as bfloat16 (infer): the reversible
    stack's custom gradient keeps the FrozenDict structure, and bf16 parameters keep fp32 streams."""
    import flax

    cfg = dataclasses.replace(BASE, reversible=True, dtype=jnp.bfloat16)
    module = network.Olmax(cfg)
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, LENGTH), 2, cfg.vocab_size)
    params = module.init(jax.random.PRNGKey(0), tok, tok, enable_dropout=False)["params"]

    def loss(p):
        return jnp.mean(jnp.square(module.apply({"params": p}, tok, enable_dropout=False)))

    g_dict = jax.jit(jax.grad(loss))(params)
    g_frozen = jax.jit(jax.grad(loss))(flax.core.freeze(params))
    assert isinstance(g_frozen, flax.core.FrozenDict)
    for a, b in zip(jax.tree.leaves(g_dict), jax.tree.leaves(flax.core.unfreeze(g_frozen))):
        np.testing.assert_array_equal(a, b)

    apply = jax.jit(lambda p: module.apply({"params": p}, tok, enable_dropout=False))
    bf16 = apply(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    f32 = apply(params)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=0.1 * float(jnp.std(f32)))


def _grad_temp_bytes(cfg, batch=4, length=1024):
    module = network.Olmax(cfg)
    tok = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    shapes = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t, t, enable_dropout=False), tok)["params"]

    def loss(params, tokens):
        return jnp.mean(module.apply({"params": params}, tokens, enable_dropout=False) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(shapes, tok).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_reversible_memory_is_constant_in_depth():
    cfg = network.OlmaxConfig(vocab_size=256, features=64, conv_features=64, max_length=1024, mixer_block=32)
    rev = {d: _grad_temp_bytes(dataclasses.replace(cfg, depth=d, reversible=True)) for d in (4, 16)}
    remat = {d: _grad_temp_bytes(dataclasses.replace(cfg, depth=d, reversible=False)) for d in (4, 16)}
    print("reversible temp bytes", rev, "ratio", rev[16] / rev[4])
    print("remat temp bytes", remat, "ratio", remat[16] / remat[4])
    assert rev[16] <= 1.25 * rev[4]
    # Remat grows linearly: each extra layer stores its input, one [b, t, d] fp32 tensor.
    per_layer = (remat[16] - remat[4]) / 12
    assert 0.9 <= per_layer / (4 * 1024 * 64 * 4) <= 1.5
    assert rev[16] < remat[16]


@pytest.mark.parametrize("out", [5, 3], ids=["stacked_inputs", "shifted_outputs"])  # i <= o, i > o
def test_causal_conv_numpy_reference(out):
    rng = np.random.RandomState(0)
    b, t, d, k = 3, 19, 4, 3
    x = rng.randn(b, t, d).astype(np.float32)
    kernel = rng.randn(k, d, out).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    seg[1, 9:] = 2
    seg[2] = [1, 2, 2, 3, 4, 4, 4, 5, 5, 5, 5, 5, 6, 7, 7, 7, 7, 0, 0]  # segments of 1-5 tokens, padding
    ref = np.zeros((b, t, out), np.float32)
    for bi in range(b):
        for ti in range(t):
            for lag in range(k):
                if ti - lag >= 0 and seg[bi, ti - lag] == seg[bi, ti]:
                    ref[bi, ti] += x[bi, ti - lag] @ kernel[k - 1 - lag]
    np.testing.assert_allclose(layers.causal_conv(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(seg)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out", [24, 8], ids=["stacked_inputs", "shifted_outputs"])
def test_causal_conv_backward_moves_no_minor_axis(out):
    """The conv's matmuls are 2-D (layers.matmul), so the compiled gradient transposes nothing
    along its contiguous axis: XLA folds dY K^T and X^T dY into the dots. Written as einsums
    over [b, t, w, i], the same gradient copied the kernel and the stacked windows transposed
    (f32[24,5,16] from [5,16,24], ...), every layer of every step: 12% of the small config's step."""
    rng = np.random.RandomState(0)
    x, kernel = jnp.asarray(rng.randn(2, 32, 16), jnp.float32), jnp.asarray(rng.randn(5, 16, out), jnp.float32)
    seg = jnp.ones((2, 32), jnp.int32)
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(layers.causal_conv(x, k, seg))), argnums=(0, 1)))
    hlo = grad.lower(x, kernel).compile().as_text()
    perms = [[int(d) for d in m.split(",")] for m in re.findall(r" transpose\([^)]*\), dimensions=\{([\d,]+)\}", hlo)]
    assert all(p[-1] == len(p) - 1 for p in perms), perms
    # One segment: the same sums as w shifted, unmasked matmuls.
    ref = jax.grad(lambda x, k: jnp.sum(jnp.sin(sum(
        jnp.einsum("bti,io->bto", layers.shift_right(x, 4 - tap), k[tap]) for tap in range(5)))), argnums=(0, 1))
    for a, b in zip(grad(x, kernel), ref(x, kernel)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_matmul_is_the_einsum():
    rng = np.random.RandomState(0)
    x, k = rng.randn(2, 3, 4).astype(np.float32), rng.randn(4, 5, 6).astype(np.float32)
    np.testing.assert_allclose(layers.matmul(x, k), np.einsum("btd,dhe->bthe", x, k), rtol=1e-5, atol=1e-5)


def test_axial_mixer_matches_dense_reference():
    """The blocked O(N^1.5) computation equals the dense two-stage causal filter."""
    cfg = dataclasses.replace(BASE, features=4, mixer_heads=2, mixer_block=4, max_length=24, activation="relu")
    mixer = mixers.AxialMixer(cfg)
    rng = np.random.RandomState(0)
    t = 22
    x = rng.randn(1, t, 4).astype(np.float32)
    seg = np.ones((1, t), np.int32)
    seg[0, 10:] = 2
    ctx = layers.Context(segment_ids=jnp.asarray(seg), positions=jnp.zeros((1, t), jnp.int32))
    params = mixer.init(jax.random.PRNGKey(0), jnp.asarray(x), ctx)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * rng.randn(*p.shape).astype(np.float32), params)
    out, _ = mixer.apply({"params": params}, jnp.asarray(x), ctx)
    a, bl, bias = (np.asarray(params[n]) for n in ("block_lags", "offset_lags", "bias"))
    K, c = 4, 2
    u = np.zeros_like(x)
    for ti in range(t):
        for m in range(0, ti // K + 1):
            si = ti - m * K
            if seg[0, si] == seg[0, ti]:
                u[0, ti] += np.repeat(a[m], c) * x[0, si]
    u = np.maximum(u + bias, 0)
    ref = np.zeros_like(x)
    for ti in range(t):
        for lag in range(K):
            si = ti - lag
            if si >= 0 and seg[0, si] == seg[0, ti]:
                ref[0, ti] += np.repeat(bl[lag], c) * u[0, si]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _dense_recall(q, k, v, ql, kl, gate, seg, block, decay=None):
    """Per (t, s) pair: weight exp(q.k / sqrt(c)) over lags < block plus
    g_s a_{s+1} ... a_t s^2/2 over every lag (s = ql.kl / sqrt(r), a: the decay), one normalization."""
    b, t, h, c = q.shape
    r = ql.shape[-1]
    decay = np.ones(gate.shape) if decay is None else decay
    out = np.zeros_like(q)
    for bi, ti, hi in np.ndindex(b, t, h):
        src = [si for si in range(ti + 1) if seg[bi, si] == seg[bi, ti]]
        weights = []
        for si in src:
            s = np.float64(ql[bi, ti, hi] @ kl[bi, si, hi]) / np.sqrt(r)
            window = np.exp(np.float64(q[bi, ti, hi] @ k[bi, si, hi]) / np.sqrt(c)) if ti - si < block else 0.0
            kept = np.prod(decay[bi, si + 1:ti + 1, hi].astype(np.float64))
            weights.append(window + gate[bi, si, hi] * kept * s * s / 2)
        weights = np.array(weights)
        out[bi, ti, hi] = weights @ v[bi, src, hi] / weights.sum()
    return out


@pytest.mark.parametrize("far_block,chunk", [(4, 4096), (4, 8), (24, 4096), (8, 16)],
                         ids=["blocked", "chunked", "one_far_block", "far_blocks_of_2"])
def test_axial_recall_matches_dense_reference(far_block, chunk):
    """The blocked computation (window + pairwise + per-block states, one denominator) equals the
    O(N^2) definition, with packed segments (starting mid-block, spanning several blocks, a
    2-token one), padding id 0, and logits large enough to overflow a naive exp; `chunk` 8:
    a scan over chunks of 2 blocks whose recall state runs across chunk edges (segment 3)."""
    rng = np.random.RandomState(0)
    b, t, h, c, r, block = 3, 23, 2, 4, 3, 4
    q, k, v = (rng.randn(b, t, h, c).astype(np.float32) for _ in range(3))
    ql, kl = (rng.randn(b, t, h, r).astype(np.float32) for _ in range(2))
    gate = rng.uniform(0.05, 1.0, (b, t, h)).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    seg[1, 9:20], seg[1, 20:] = 2, 0
    seg[2, 5:7], seg[2, 7:] = 2, 3  # segment 3 spans blocks 1-5: its states run over 4 blocks
    # Decays from 0.05 (the state forgets nearly all at each token) to 1 (it never does); those
    # below the fastest rate, exp(-MAX_FORGET_RATE) = 0.61, are read as that rate.
    decay = rng.uniform(0.05, 1.0, (b, t, h)).astype(np.float32)
    decay[:, :, 0] = 1.0
    log_decay = jnp.log(jnp.asarray(decay))
    decay = np.maximum(decay, np.exp(-mixers.MAX_FORGET_RATE))
    args = (q, k, v, ql, kl, gate, seg)
    for a, log_a in ((None, None), (decay, log_decay)):
        got = mixers.axial_recall(*map(jnp.asarray, args), block, log_decay=log_a, far_block=far_block, chunk=chunk)
        np.testing.assert_allclose(got, _dense_recall(*args, block, a), rtol=1e-5, atol=1e-5)
    # Window logits of +-60 (exp overflows fp32 at 89) and kernel sums of ~1e4: still exact.
    q2, k2 = q * 8.0, k * 8.0
    args = (q2, k2, v, ql * 6.0, kl * 6.0, gate, seg)
    got = mixers.axial_recall(*map(jnp.asarray, args), block, log_decay=log_decay, far_block=far_block, chunk=chunk)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _dense_recall(*args, block, decay), rtol=1e-4, atol=1e-4)


def test_recall_far_blocks_are_one_function_at_the_fastest_decay():
    """Far blocks of 512 (the largest; each pair's decay split between its query and key sides)
    and of K give the same outputs and gradients where the decay is at its bound the whole row
    (-40 nats a token asked, MAX_FORGET_RATE read): 205 nats across a block, nothing overflows."""
    rng = np.random.RandomState(4)
    b, t, h, c, r, block = 1, 512, 2, 4, 3, 8
    args = [jnp.asarray(3 * rng.randn(b, t, h, e).astype(np.float32)) for e in (c, c, c, r, r)]
    args.append(jnp.asarray(rng.uniform(0.05, 1.0, (b, t, h)).astype(np.float32)))
    log_decay = jnp.full((b, t, h), -40.0).at[:, :, 0].set(-1e-3)  # head 0 barely forgets
    seg = jnp.ones((b, t), jnp.int32)
    w = jnp.asarray(rng.randn(b, t, h, c).astype(np.float32))

    def grads(far_block):
        def loss(*a):
            return jnp.sum(mixers.axial_recall(*a[:6], seg, block, log_decay=a[6], far_block=far_block, chunk=t) * w)
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7))))(*args, log_decay)

    (v512, g512), (v8, g8) = grads(512), grads(block)
    np.testing.assert_allclose(v512, v8, rtol=1e-4)
    for name, a, ref in zip(["q", "k", "v", "ql", "kl", "gate", "log_decay"], g512, g8):
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, ref, atol=2e-4 * float(jnp.abs(ref).max()), rtol=1e-3, err_msg=name)
    with pytest.raises(ValueError, match="recall_far_block"):
        mixers.axial_recall(*args, seg, block, log_decay=log_decay, far_block=1024)


def test_axial_recall_chunked_gradients_equal_one_step():
    """The scan over chunks (state passed across chunk edges, each chunk rematerialized) has the
    one-step computation's gradients for every input, packed segments spanning chunks."""
    rng = np.random.RandomState(2)
    b, t, h, c, r, block = 2, 45, 2, 4, 3, 4
    args = [jnp.asarray(rng.randn(b, t, h, e).astype(np.float32)) for e in (c, c, c, r, r)]
    args.append(jnp.asarray(rng.uniform(0.05, 1.0, (b, t, h)).astype(np.float32)))
    log_decay = jnp.log(jnp.asarray(rng.uniform(0.5, 1.0, (b, t, h)).astype(np.float32)))
    seg = np.ones((b, t), np.int32)
    seg[1, 6:30], seg[1, 30:] = 2, 3
    w = jnp.asarray(rng.randn(b, t, h, c).astype(np.float32))

    def grads(chunk):
        def loss(*a):
            y = mixers.axial_recall(*a[:6], jnp.asarray(seg), block, log_decay=a[6], far_block=4, chunk=chunk)
            return jnp.sum(y * w)
        return jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*args, log_decay)

    for name, a, ref in zip(["q", "k", "v", "ql", "kl", "gate", "log_decay"], grads(12), grads(4096)):
        assert float(jnp.abs(ref).max()) > 1e-3, name
        np.testing.assert_allclose(a, ref, atol=2e-5, rtol=1e-4, err_msg=name)


def test_recall_mixer_projects_chunk_by_chunk_exactly():
    """The mixer's training path projects each chunk of the row inside the scan (no whole-row
    q, k, v, recall features or gates): its output and its gradients for x and for every
    parameter equal the one-chunk computation's, packed segments spanning chunk edges."""
    rng = np.random.RandomState(3)
    cfg = dataclasses.replace(BASE, mixer="recall")
    b, t = 2, 45  # three chunks of 16 and a padded tail
    x = jnp.asarray(rng.randn(b, t, cfg.features).astype(np.float32))
    seg = np.ones((b, t), np.int32)
    seg[1, 10:37], seg[1, 37:] = 2, 3
    pos = np.concatenate([np.arange(t)[None], np.r_[np.arange(10), np.arange(27), np.arange(8)][None]])
    ctx = layers.Context(jnp.asarray(seg), jnp.asarray(pos))
    w = jnp.asarray(rng.randn(b, t, cfg.features).astype(np.float32))
    params = mixers.RecallMixer(cfg).init(jax.random.PRNGKey(0), x, ctx)["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.randn(*p.shape).astype(np.float32)), params)

    _assert_chunks_exact(lambda chunk: mixers.RecallMixer(dataclasses.replace(cfg, recall_chunk=chunk)),
                         params, x, ctx, w, 16, 4096, atol=5e-5, rtol=1e-4)


def _assert_chunks_exact(module, params, x, ctx, w, chunk, whole, atol, rtol):
    """module(chunk) applied chunk by chunk has module(whole)'s output and gradients (for x and
    every parameter) under the loss sum(y * w); no gradient is trivially zero."""
    def value_and_grads(size):
        def loss(params, x):
            y = module(size).apply({"params": params}, x, ctx)[0]
            return jnp.sum(y * w), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (_, y), grads = value_and_grads(chunk)
    (_, y_ref), grads_ref = value_and_grads(whole)
    np.testing.assert_allclose(y, y_ref, atol=atol, rtol=rtol)
    for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
        assert float(jnp.abs(ref).max()) > 1e-4, path
        np.testing.assert_allclose(g, ref, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


def test_softmax_tiles_is_one_softmax_over_all_keys():
    """The window's blocked softmax (a running max and sum across tiles) returns the read and the
    log-sum-exp of one softmax over the concatenated keys, and the same gradients, with a second
    tile that allows no key to some queries and scores of +-60 (exp overflows fp32 at 89)."""
    rng = np.random.RandomState(4)
    q, k1, k2, v1, v2 = (jnp.asarray(8.0 * rng.randn(2, 5, 3).astype(np.float32)) for _ in range(5))
    own = np.tril(np.ones((5, 5), bool))  # the diagonal: every query has a key in the first tile
    prev = np.triu(np.ones((5, 5), bool), 1)  # none for the last query
    w = jnp.asarray(rng.randn(2, 5, 3).astype(np.float32))

    def tiled(q, k1, k2, v1, v2):
        out, lse = mixers.softmax_tiles(q, [(k1, v1, own), (k2, v2, prev)])
        return jnp.sum(out * w) + jnp.sum(lse), (out, lse)

    def one(q, k1, k2, v1, v2):
        s = jnp.einsum("bkc,bjc->bkj", q, jnp.concatenate([k1, k2], 1)) / np.sqrt(3.0)
        s = jnp.where(np.concatenate([own, prev], 1), s, -jnp.inf)
        out = jax.nn.softmax(s, axis=-1) @ jnp.concatenate([v1, v2], 1)
        lse = jax.nn.logsumexp(s, axis=-1)
        return jnp.sum(out * w) + jnp.sum(lse), (out, lse)

    args = (q, k1, k2, v1, v2)
    (_, got), g_got = jax.value_and_grad(tiled, argnums=tuple(range(5)), has_aux=True)(*args)
    (_, ref), g_ref = jax.value_and_grad(one, argnums=tuple(range(5)), has_aux=True)(*args)
    assert float(jnp.max(ref[1])) > 30  # large scores: the running max matters
    for a, b in zip(got + g_got, ref + g_ref):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_joint_read_gradient_is_exact_for_tiny_far_sums():
    """A far sum of 1e-20 (a closed write gate, a key orthogonal to the query) has finite,
    exact derivatives: y = (W + num) / (P + den) with window weights P, W; a plain num / den
    squares den and gave -inf here. Below 1e-30 the far sum reads as empty."""
    # Window scores 0 and -1 (query 1 against keys 0 and -1) on values 1 and 2, in two tiles.
    tiles = [(jnp.array([[0.0]]), jnp.array([[1.0]]), True), (jnp.array([[-1.0]]), jnp.array([[2.0]]), True)]
    P, W = 1 + np.exp(-1.0), 1 + 2 * np.exp(-1.0)

    def y(den, num):
        window = mixers.softmax_tiles(jnp.array([[1.0]]), tiles)
        return mixers.joint_read(*window, num, den).sum()

    for tiny in (1e-3, 1e-20, 1e-29):
        den, num = jnp.array([tiny]), jnp.array([[3 * tiny]])
        d_den, d_num = jax.grad(y, argnums=(0, 1))(den, num)
        np.testing.assert_allclose(y(den, num), (W + 3 * tiny) / (P + tiny), rtol=1e-6)
        np.testing.assert_allclose(d_den, [-(W + 3 * tiny) / (P + tiny) ** 2], rtol=1e-5)
        np.testing.assert_allclose(d_num, [[1 / (P + tiny)]], rtol=1e-5)
    d_den, d_num = jax.grad(y, argnums=(0, 1))(jnp.array([1e-31]), jnp.array([[3e-31]]))
    assert float(d_den[0]) == 0.0 and float(d_num[0, 0]) == 0.0


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="mixer='mlp'"):
        network.OlmaxConfig(mixer="mlp")
    with pytest.raises(ValueError, match="num_experts"):
        network.OlmaxConfig(blocks=("conv", "moe"))
    module = network.Olmax(BASE)
    tok = jnp.ones((1, BASE.max_length + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_length"):
        module.init(jax.random.PRNGKey(0), tok, tok)
    with pytest.raises(ValueError, match="mixer_block=0"):
        network.OlmaxConfig(mixer_block=0)


def test_mixer_block_follows_max_length():
    """mixer_block=None takes K from max_length (network.mixer_block_for): >= 16 blocks per row,
    powers of two from 8 to 64, 64 from 1024 tokens on; an explicit mixer_block wins."""
    assert [network.mixer_block_for(n) for n in (64, 256, 512, 1024, 4096, 524288)] == [8, 16, 32, 64, 64, 64]
    assert network.OlmaxConfig(max_length=256).block_size == 16
    assert network.OlmaxConfig(max_length=32768).block_size == 64
    assert network.OlmaxConfig(max_length=32768, mixer_block=128).block_size == 128
    # The window is part of the function: a config copied to a longer max_length keeps an explicit K.
    cfg = dataclasses.replace(network.OlmaxConfig(max_length=256, mixer_block=16), max_length=4096)
    assert cfg.block_size == 16


# The hand-written backward on CPU; the plain products on a GPU, and in a TPU step that olmax.plan compiles on the CPU.
@pytest.mark.parametrize("platform", ["cpu", "gpu", "planned tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [16, 80])  # rows_product's two layouts: small x (transposed first) and large
def test_hand_differentiated_products_match_autodiff(dtype, rows, platform, monkeypatch):
    """scores_product, weights_product and rows_product: the einsums they replace, value and
    gradients, in the same dtypes (fp32 sums of bf16 operands, gradients in the operands' dtype)."""
    if platform == "gpu":
        monkeypatch.setattr(jax, "default_backend", lambda: platform)
    with mixers.products_for("tpu") if platform == "planned tpu" else contextlib.nullcontext():
        check_products_match_autodiff(dtype, rows, hand_written=platform == "cpu")


def check_products_match_autodiff(dtype, rows, hand_written):
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    a = jax.random.normal(keys[0], (2, 3, rows, 8)).astype(dtype)  # [..., k, c]
    b = jax.random.normal(keys[1], (2, 3, rows, 8)).astype(dtype)  # [..., j, c]
    w = jax.random.normal(keys[2], (2, 3, rows, rows)).astype(dtype)  # [..., k, j]
    cases = [
        (mixers.scores_product, lambda x, y: jnp.einsum("...kc,...jc->...kj", x, y, preferred_element_type=jnp.float32),
         (a, b)),
        (mixers.weights_product, lambda x, y: jnp.einsum("...kj,...jc->...kc", x, y, preferred_element_type=jnp.float32),
         (w, b)),
        (mixers.rows_product, lambda x, y: jnp.einsum("...km,...kn->...mn", x, y, preferred_element_type=jnp.float32),
         (w, b)),
    ]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    for ours, einsum, args in cases:
        cot = jax.random.normal(keys[3], einsum(*args).shape)
        got, got_vjp = jax.vjp(ours, *args)
        want, want_vjp = jax.vjp(einsum, *args)
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_allclose(got, want, **tol)
        for g, e in zip(got_vjp(cot), want_vjp(cot)):
            assert g.dtype == e.dtype == dtype
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), **tol)
        # The CPU's backward is the hand-written one (its transposes behind a barrier); elsewhere autodiff's.
        grad_jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(ours, *a)[1](cot))(*args))
        assert ("optimization_barrier" in grad_jaxpr) == hand_written


def test_quadratic_features_are_the_recall_kernel():
    """phi(q) . phi(k) = recall_kernel(q . k / sqrt(r)) = (q . k)^2 / (2 r), with F = r (r + 1) / 2
    features: the far part's states and the pairs it computes directly are the same weights."""
    rng = np.random.RandomState(5)
    q, k = rng.randn(2, 7, 5).astype(np.float32)
    phi_q, phi_k = mixers.quadratic_features(jnp.asarray(q)), mixers.quadratic_features(jnp.asarray(k))
    assert phi_q.shape == (7, mixers.feature_size(5)) == (7, 15)
    want = mixers.recall_kernel(jnp.asarray(q @ k.T) / np.sqrt(5))
    np.testing.assert_allclose(phi_q @ phi_k.T, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(want, (q @ k.T) ** 2 / 10, rtol=1e-5)


def test_forget_spectrum():
    """Head 0 never forgets (half-life > 1e8 tokens); the others' half-lives span max_length .. 2 K,
    also where 2 K is short enough that the rate's bound (MAX_FORGET_RATE) bends it."""
    for block, fastest in ((16, 32), (1, 2)):
        bias = mixers.forget_init(block, 1024)(None, (4,))
        half_life = np.log(2.0) / -np.asarray(mixers.forget_log_decay(bias), np.float64)
        assert half_life[0] > 1e8
        np.testing.assert_allclose(half_life[1:], [1024, np.sqrt(1024 * fastest), fastest], rtol=1e-3)
    # The decay never forgets faster than its bound, and follows -softplus while the rate is small.
    z = jnp.linspace(-30.0, 30.0, 61)
    assert float(mixers.forget_log_decay(z).min()) >= np.float32(-mixers.MAX_FORGET_RATE)
    small = z < -3.0
    np.testing.assert_allclose(mixers.forget_log_decay(z)[small], -jax.nn.softplus(z)[small], rtol=2e-3)
    assert np.asarray(mixers.forget_init(16, 1024)(None, (1,))).shape == (1,)


def test_conv_block_chunk_by_chunk_is_exact():
    """The conv block on a long row runs chunk by chunk (each chunk with the 2 (w - 1) positions
    before it, recomputed in the backward pass): output and gradients for x and both kernels
    equal the whole-row computation's, with packed segments crossing chunk edges, a segment
    shorter than the conv's reach and a padded tail."""
    rng = np.random.RandomState(5)
    cfg = dataclasses.replace(BASE, conv_kernel=4)
    b, t = 2, 41  # chunks of 8: five and a padded tail; reach 6
    x = jnp.asarray(rng.randn(b, t, cfg.features).astype(np.float32))
    seg = np.ones((b, t), np.int32)
    seg[1, 7:11], seg[1, 11:30], seg[1, 30:38], seg[1, 38:] = 2, 3, 4, 0
    ctx = layers.Context(jnp.asarray(seg), jnp.zeros((b, t), jnp.int32))
    w = jnp.asarray(rng.randn(b, t, cfg.features).astype(np.float32))
    params = layers.ConvBlock(cfg).init(jax.random.PRNGKey(0), x, ctx)["params"]

    _assert_chunks_exact(lambda chunk: layers.ConvBlock(dataclasses.replace(cfg, conv_chunk=chunk)),
                         params, x, ctx, w, 8, 64, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="conv_chunk=4 must be >= 2 \\(conv_kernel - 1\\) = 6"):
        dataclasses.replace(cfg, conv_chunk=4)
