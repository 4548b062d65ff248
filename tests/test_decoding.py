"""Cached decoding: prefill + steps == the full forward, sampling, and T5X's calling contract."""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmax import decoding, layers, mixers, models, network

BASE = network.OlmaxConfig(
    vocab_size=64, features=32, depth=2, max_length=64, conv_features=32, conv_kernel=3,
    mixer_block=8, mixer_heads=2, num_heads=2, expert_features=32, expert_group_size=64,
    # several attention tiles and recall and conv chunks per row: the blockwise kernel's tiling
    # and the scans over chunks are exercised (with 4 recall features the far part runs blocked
    # from ~26 tokens on; at 16 a row this short would take the dense path, one chunk)
    attention_block=16, recall_chunk=16, recall_features=4, conv_chunk=16,
)
# capacity_factor = experts / top_k: every expert can take the whole group, nothing drops.
MOE = dict(num_experts=4, expert_top_k=2, capacity_factor=2.0)
VARIANTS = {
    "recall_rev": dict(mixer="recall", reversible=True),
    "recall_remat": dict(mixer="recall", reversible=False),
    "recall_moe_rev": dict(mixer="recall", reversible=True, **MOE),
    "axial_rev": dict(mixer="axial", reversible=True),
    "axial_remat": dict(mixer="axial", reversible=False),
    "attention_rev": dict(mixer="attention", reversible=True),
    "attention_remat": dict(mixer="attention", reversible=False),
    # A capacity that drops tokens in the plain forward: decoding is dropless, so it is
    # compared with the plain forward of the same parameters at a dropless capacity.
    "axial_moe_rev": dict(mixer="axial", reversible=True, **{**MOE, "capacity_factor": 0.5}),
    "attention_moe_remat": dict(mixer="attention", reversible=False, **MOE),
}
LENGTH = 27  # cache length, not a multiple of the mixer block (8)
PREFILL = np.array([5, 13, 0])  # per-row prompt lengths; 0: decoding starts at position 0
ATOL = 1e-4


@functools.lru_cache(maxsize=None)  # parameters depend on the config only: share them between tests
def _init(cfg, batch=1, length=LENGTH):
    module = network.Olmax(cfg)
    tok = jnp.ones((batch, length), jnp.int32)
    params = jax.jit(lambda r: module.init(r, tok, tok, enable_dropout=False))(jax.random.PRNGKey(0))["params"]
    # The recall mixer's decay starts data-independent (w_forget = 0): make it depend on the
    # token, by as much as a trained one might, so that cached == full covers per-token decay.
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    for i, path in enumerate(p for p in flat if p[-1] == "w_forget"):
        flat[path] = 2.0 * jax.random.normal(jax.random.PRNGKey(i), flat[path].shape) / np.sqrt(cfg.features)
    return module, flax.traverse_util.unflatten_dict(flat)


def _tokens(cfg, batch=len(PREFILL), length=LENGTH, seed=0):
    return np.random.RandomState(seed).randint(2, cfg.vocab_size, (batch, length)).astype(np.int32)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    """(config, params, plain forward -> (logits, dropped fraction), cache creation + prefill, step), jitted."""
    cfg = dataclasses.replace(BASE, **VARIANTS[request.param])
    module, params = _init(cfg)

    def plain(cfg):
        module = network.Olmax(cfg)

        @jax.jit
        def full(params, tokens):
            logits, state = module.apply({"params": params}, tokens, enable_dropout=False, mutable=["intermediates"])
            return logits, state["intermediates"]["moe_aux"][0]["moe_dropped"]

        return full

    @jax.jit
    def prefill(params, tokens, lengths):
        cache = decoding.init_cache(module, params, tokens.shape[0], tokens.shape[1])
        return module.apply({"params": params, "cache": cache}, tokens, prefill=True, prefill_lengths=lengths,
                            enable_dropout=False, mutable=["cache"])

    @jax.jit
    def step(params, cache, token):
        return module.apply({"params": params, "cache": cache}, token, decode=True, max_decode_length=LENGTH,
                            enable_dropout=False, mutable=["cache"])

    dropless = dataclasses.replace(cfg, capacity_factor=max(cfg.capacity_factor, 2.0))
    return cfg, params, plain(cfg), plain(dropless), prefill, step


def _decode_all(step, params, cache, tokens, start):
    """Feed each row its own tokens from position start[b] on; logits per fed position."""
    b, length = tokens.shape
    got = {}
    for j in range(length - int(start.min())):
        pos = start + j
        token = tokens[np.arange(b), np.minimum(pos, length - 1)][:, None]
        logits, state = step(params, cache, token)
        cache = state["cache"]
        assert logits.shape == (b, 1, BASE.vocab_size) and logits.dtype == jnp.float32
        for r in range(b):
            if pos[r] < length:
                got[r, int(pos[r])] = np.asarray(logits[r, 0])
    return got, cache


def test_cached_decoding_equals_full_forward(variant):
    """Prefill (per-row lengths, one of them 0) + one-token steps give the full forward's logits
    at every position. MoE: decoding never drops a token, so it equals any full forward that
    dropped none (here also when the configured capacity drops tokens in the plain forward)."""
    cfg, params, full, dropless_full, prefill, step = variant
    tokens = _tokens(cfg)
    ref, dropped = dropless_full(params, tokens)
    ref = np.asarray(ref)
    assert abs(float(dropped)) < 1e-6  # the premise of equality with MoE: nothing dropped
    if cfg.num_experts and cfg.capacity_factor < 2.0:
        assert float(full(params, tokens)[1]) > 0.05  # ... which the configured capacity would drop
    prompt_logits, state = prefill(params, tokens, PREFILL)
    np.testing.assert_allclose(prompt_logits, ref, atol=ATOL, rtol=0)  # prefill's output is the full forward
    np.testing.assert_array_equal(state["cache"]["cache_index"], PREFILL)
    leaves, _ = _t5x_batch_leaves(state["cache"])
    assert leaves and all(v.shape[0] == len(PREFILL) for v in leaves.values())  # batch first
    got, cache = _decode_all(step, params, state["cache"], tokens, PREFILL)
    assert len(got) == sum(LENGTH - PREFILL)
    for (r, t), logits in got.items():
        np.testing.assert_allclose(logits, ref[r, t], atol=ATOL, rtol=0, err_msg=f"row {r} position {t}")
    np.testing.assert_array_equal(cache["cache_index"], PREFILL + LENGTH - PREFILL.min())


def _t5x_batch_leaves(cache):
    """(path, leaf) of every cache leaf, as T5X's cache_map sees them (it skips 'cache_index')."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(cache))
    leaves = {k: v for k, v in flat.items() if k[-1] != "cache_index"}
    return leaves, {k: v for k, v in flat.items() if k[-1] == "cache_index"}


def test_t5x_calling_contract():
    """Drive the module exactly as T5X's DecoderOnlyModel.predict_batch_with_aux and decoding loop do.

    (Conv, MoE and axial caches here; the attention caches' layout is checked per variant above.)
    """
    cfg = dataclasses.replace(BASE, mixer="axial", reversible=True, **MOE)
    module = network.Olmax(cfg)
    b, length = 3, LENGTH
    rng = jax.random.PRNGKey(0)
    tok = jnp.ones((b, length), jnp.int32)
    # Creating the cache through init leaves the parameters exactly as a plain init makes them.
    plain = jax.jit(lambda r: module.init(r, tok, tok, enable_dropout=False))(rng)
    with_cache = jax.jit(lambda r: module.init(r, tok, tok, decode=True, enable_dropout=False))(rng)
    assert set(with_cache) == {"params", "params_axes", "cache", "cache_axes"}
    assert jax.tree.structure(plain["params"]) == jax.tree.structure(with_cache["params"])
    for x, y in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(with_cache["params"])):
        np.testing.assert_array_equal(x, y)
    params = plain["params"]

    # T5X: cache from ones [b, max_decode_length] with decode=True; the same cache as init's.
    def create(p, x):
        return module.apply({"params": p}, x, x, enable_dropout=False, decode=True, mutable=["cache"])

    _, variables = jax.eval_shape(create, params, jnp.ones((b, length), jnp.int32))
    cache = with_cache["cache"]
    assert jax.tree.structure(variables["cache"]) == jax.tree.structure(cache)
    shape = lambda x: (x.shape, x.dtype)  # noqa: E731
    assert jax.tree.map(shape, variables["cache"]) == jax.tree.map(shape, cache)
    leaves, index = _t5x_batch_leaves(cache)
    assert len(leaves) >= 2 * cfg.depth and all(v.shape[0] == b for v in leaves.values())
    assert all(not np.any(v) for v in leaves.values())  # zero-initialized
    assert list(index) == [("cache_index",)] and index[("cache_index",)].shape == ()

    # T5X: prefill with inputs = decoder_input_tokens * decoder_causal_attention.
    tokens = _tokens(cfg, b, length, seed=3)
    tokens[:, 0] = 0  # BOS
    causal = (np.arange(length)[None, :] < (PREFILL + 1)[:, None]).astype(np.int32)
    inputs_lengths = causal.sum(1) - 1
    _, variables = jax.jit(lambda p, c, x, ca, n: module.apply(
        {"params": p, "cache": c}, decoder_input_tokens=x, decoder_target_tokens=ca, decoder_causal_attention=ca,
        mutable=["cache"], enable_dropout=False, prefill=True, prefill_lengths=n))(
            params, cache, tokens * causal, causal, inputs_lengths)
    cache = variables["cache"]
    leaves, index = _t5x_batch_leaves(cache)
    assert all(v.shape[0] == b for v in leaves.values())
    np.testing.assert_array_equal(index[("cache_index",)], inputs_lengths)  # [b], batch first too

    # T5X: num_decodes > 1 expands every cache leaf along axis 0; its beam search leaves
    # cache_index as [b, beams] (T5X's own decode attention flattens it), sampling as [b * beams].
    expand = 2
    expanded = flax.traverse_util.unflatten_dict(
        {k: jnp.repeat(v, expand, axis=0) for k, v in flax.traverse_util.flatten_dict(cache).items()})
    beams = dict(expanded, cache_index=jnp.repeat(cache["cache_index"], expand).reshape(b, expand))

    @jax.jit
    def tokens_to_logits(params, cache, flat_ids):  # T5X's _compute_logits_from_slice
        logits, new_vars = module.apply({"params": params, "cache": cache}, flat_ids, flat_ids, enable_dropout=False,
                                        decode=True, max_decode_length=length, mutable=["cache"])
        return logits, new_vars["cache"]

    ref = np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x, enable_dropout=False))(params, tokens))
    for j in range(4):
        pos = inputs_lengths + j
        flat_ids = tokens[np.arange(b), pos][:, None]
        logits, cache = tokens_to_logits(params, cache, flat_ids)
        assert logits.shape == (b, 1, cfg.vocab_size) and logits.dtype == jnp.float32
        np.testing.assert_allclose(logits[:, 0], ref[np.arange(b), pos], atol=ATOL, rtol=0)
        logits_x, expanded = tokens_to_logits(params, expanded, np.repeat(flat_ids, expand, axis=0))
        np.testing.assert_allclose(logits_x, np.repeat(logits, expand, axis=0), atol=1e-5, rtol=0)
        logits_b, beams = tokens_to_logits(params, beams, np.repeat(flat_ids, expand, axis=0))
        np.testing.assert_allclose(logits_b, logits_x, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache["cache_index"], inputs_lengths + 4)
    np.testing.assert_array_equal(beams["cache_index"], np.repeat(inputs_lengths + 4, expand).reshape(b, expand))


@pytest.mark.parametrize("mixer", ["axial", "attention", "recall"])
def test_cache_axes_partition_the_cache(mixer):
    """Every cache leaf has logical axes in `cache_axes` (the tree T5X maps over the cache), and
    under a mesh and Olmax's rules the created cache is sharded by them: batch over `data`,
    the heads of attention's and the recall mixer's caches over `model`."""
    from flax.linen import partitioning as nn_partitioning
    from jax.sharding import PartitionSpec as P

    from olmax import axes

    module = network.Olmax(dataclasses.replace(BASE, mixer=mixer, **MOE))
    b, tok = 8, jnp.ones((8, LENGTH), jnp.int32)
    variables = jax.jit(lambda r: module.init(r, tok, tok, decode=True, enable_dropout=False))(jax.random.PRNGKey(0))
    cache_axes = flax.core.unfreeze(nn_partitioning.get_axis_names(variables["cache_axes"]))
    # T5X's _compute_kv_cache: tree_map(with_sharding_constraint, cache, get_axis_names(cache_axes)).
    named = jax.tree.map(lambda leaf, spec: (leaf.shape, tuple(spec)), variables["cache"], cache_axes)
    flat = flax.traverse_util.flatten_dict(named)
    assert flat.pop(("cache_index",)) == ((), ())
    # Two leaves per conv and per axial or attention mixer (the recall mixer: its window's keys and
    # values, its state and normalizer and their two compensations), none for MoE.
    assert len(flat) == (8 if mixer == "recall" else 4) * BASE.depth
    for path, (shape, names) in flat.items():
        assert len(names) == len(shape) and names[0] == "activation_batch", path
        assert set(names) - {None} <= set(axes.ACTIVATION_AXES), path

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    params = jax.device_put(variables["params"], jax.sharding.NamedSharding(mesh, P()))
    with jax.set_mesh(mesh), nn_partitioning.axis_rules(axes.DEFAULT_RULES):  # as olmax's partitioner does
        _, state = jax.jit(lambda p: module.apply({"params": p}, tok, decode=True, enable_dropout=False,
                                                   mutable=["cache"]))(params)
    for path, leaf in flax.traverse_util.flatten_dict(state["cache"]).items():
        if path[-1] != "cache_index":
            assert leaf.shape[0] == b and leaf.sharding.spec[0] == "data", (path, leaf.sharding)
    layer = state["cache"]["decoder"]["layers_0"]
    assert layer["conv_0"]["conv"]["hidden"].sharding.spec == P("data", None, "model")  # [b, k-1, conv_features]
    if mixer != "axial":
        heads = {"attention": ("keys", P("data", None, "model")),  # [b, L, h, c]
                 "recall": ("state", P("data", "model"))}  # [b, h, F, c]
        name, spec = heads[mixer]
        (branch,) = (v for k, v in layer.items() if k.startswith("mixer_"))
        assert branch["mixer"][name].sharding.spec == spec


def _mixer_decode(mixer, params, x):
    """(full forward, one decode step per position) of a lone mixer over x [b, L, d], one segment per row."""
    b, length, _ = x.shape
    ctx = layers.Context(segment_ids=jnp.ones((b, length), jnp.int32), positions=jnp.broadcast_to(jnp.arange(length), (b, length)))
    full = mixer.apply({"params": params}, x, ctx)[0]
    cache = mixer.apply({"params": params}, x, ctx, decode="init", mutable=["cache"])[1]["cache"]

    def body(cache, xt_t):
        xt, t = xt_t
        step_ctx = layers.Context(segment_ids=jnp.ones((b, 1), jnp.int32), positions=jnp.full((b, 1), t))
        (y, _), state = mixer.apply({"params": params, "cache": cache}, xt, step_ctx, decode="step", mutable=["cache"])
        return state["cache"], y[:, 0]

    cache, ys = jax.lax.scan(body, cache, (jnp.swapaxes(x, 0, 1)[:, :, None], jnp.arange(length)))
    return full, jnp.swapaxes(ys, 0, 1), cache


@pytest.mark.parametrize("mixer_name", ["recall", "attention"])
def test_bf16_decoding_equals_the_forward_within_rounding(mixer_name):
    """In bf16, each decode step's output is the full forward's to within bf16 rounding (two
    units in the last place at the outputs' scale), and both are that close to the fp32
    forward of the same parameters: the two paths sum the same terms, in other orders. A state
    or window kept in bf16, or a sum rounded to bf16 on one path only, breaks it."""
    cfg = network.OlmaxConfig(vocab_size=64, features=64, depth=1, max_length=64, mixer=mixer_name, mixer_block=8,
                              mixer_heads=2, num_heads=2, dtype=jnp.bfloat16, recall_chunk=16, attention_block=16)
    module = mixers.MIXERS[mixer_name](cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 40, cfg.features)).astype(cfg.dtype)  # as the block's norm gives it
    ctx = layers.Context(segment_ids=jnp.ones((2, 40), jnp.int32), positions=jnp.broadcast_to(jnp.arange(40), (2, 40)))
    params = module.init(jax.random.PRNGKey(0), x, ctx)["params"]
    if "w_forget" in params:  # a decay that depends on the token
        params = dict(params, w_forget=0.3 * jax.random.normal(jax.random.PRNGKey(3), params["w_forget"].shape))
    full, dec, _ = jax.jit(functools.partial(_mixer_decode, module))(params, x)
    assert full.dtype == dec.dtype == jnp.bfloat16
    f32 = dataclasses.replace(cfg, dtype=jnp.float32)
    ref = mixers.MIXERS[mixer_name](f32).apply({"params": params}, x.astype(jnp.float32), ctx)[0]
    bound = 2 * 2.0**-8 * float(jnp.abs(ref).max())
    full, dec = np.asarray(full, np.float32), np.asarray(dec, np.float32)
    assert np.abs(full - dec).max() <= bound
    assert np.abs(full - ref).max() <= bound and np.abs(dec - ref).max() <= bound


def test_long_recall_decode_does_not_drift():
    """20,000 decode steps: the recall state and normalizer equal their float64 sums, decay
    included, to a few fp32 eps. Plain fp32 adds lost ~2e-5 of them here (~1e-4 at 1e5 steps),
    half from rounding and half from the never-forgetting head's decay (1 - a ~ 2e-9), which
    rounds to no decay at all in a plain fp32 step."""
    n, b, d = 20_000, 2, 16
    cfg = network.OlmaxConfig(vocab_size=64, features=d, depth=1, max_length=n, mixer="recall", mixer_block=8,
                              mixer_heads=2, num_heads=2, recall_features=4)
    module = mixers.RecallMixer(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (b, n, d))
    ctx = layers.Context(segment_ids=jnp.ones((b, 8), jnp.int32), positions=jnp.broadcast_to(jnp.arange(8), (b, 8)))
    params = module.init(jax.random.PRNGKey(0), x[:, :8], ctx)["params"]
    _, _, cache = jax.jit(functools.partial(_mixer_decode, module))(params, x)
    # The same sums in float64: sum_s g_s (a_{s+1} .. a_n) phi(kl_s) [v_s, 1].
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    proj = lambda w: np.einsum("btd,dhe->bthe", x, w)  # noqa: E731
    kl, v = proj(p["wk_recall"]), proj(p["wv"])
    gate = 1.0 / (1.0 + np.exp(-(proj(p["w_write_gate"])[..., 0] + p["b_write_gate"])))
    z = proj(p["w_forget"])[..., 0] + p["b_forget"]
    rate = mixers.MAX_FORGET_RATE * np.tanh(np.logaddexp(0.0, z) / mixers.MAX_FORGET_RATE)
    log_decay = -rate  # [b,t,h]
    later = np.cumsum(log_decay[:, ::-1], axis=1)[:, ::-1] - log_decay  # log a_{s+1} + .. + log a_n
    r = kl.shape[-1]
    phi = np.stack([kl[..., i] * kl[..., j] / np.sqrt(2 * r if i == j else r) for i in range(r) for j in range(i, r)], -1)
    weight = gate * np.exp(later)
    assert np.exp(later[:, 0, 0]).min() < 1 - 1e-5  # head 0's decay over the row is visible in fp32 terms
    for name, want in (("norm", np.einsum("bthf,bth->bhf", phi, weight)),
                       ("state", np.einsum("bthf,bth,bthc->bhfc", phi, weight, v))):
        err = np.abs(np.asarray(cache[name], np.float64) - want).max() / np.abs(want).max()
        assert err < 1e-6, (name, err)


def test_decode_errors_name_the_fix():
    module = network.Olmax(BASE)
    tok = jnp.ones((2, 8), jnp.int32)
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tok, tok, decode=True, enable_dropout=False))
    params, cache = variables["params"], variables["cache"]

    def apply(variables, tokens, **kw):  # shapes only: the errors come while tracing
        return jax.eval_shape(lambda v, t: module.apply(v, t, mutable=["cache"], **kw), variables, tokens)

    with pytest.raises(ValueError, match="decode=True"):
        apply({"params": params}, tok, prefill=True)
    with pytest.raises(ValueError, match=r"\[batch, 1\]"):
        apply({"params": params, "cache": cache}, tok, decode=True)
    # The recall mixer's cache has a fixed size (window + state): any prompt fits. The axial
    # mixer's and attention's grow with the length the cache was created for.
    longer = jnp.ones((2, 9), jnp.int32)
    assert apply({"params": params, "cache": cache}, longer, prefill=True)[0].shape == (2, 9, BASE.vocab_size)
    axial = network.Olmax(dataclasses.replace(BASE, mixer="axial"))
    axial_vars = jax.eval_shape(lambda: axial.init(jax.random.PRNGKey(0), tok, tok, decode=True, enable_dropout=False))
    with pytest.raises(ValueError, match="cache holds 8"):
        jax.eval_shape(lambda v, t: axial.apply(v, t, mutable=["cache"], prefill=True), axial_vars, longer)
    with pytest.raises(ValueError, match="max_length"):
        decoding.generate(module, params, tok, 8, jax.random.PRNGKey(0), max_new_tokens=BASE.max_length)
    with pytest.raises(ValueError, match="top_p"):
        decoding.Sampler(top_p=0.0)


# ---------------------------------------------------------------------------- sampling

WIDTH = 12  # prompt width = cache length = output width in the sampling tests (T5X's predict shapes)
PROMPTS = np.array([3, 9, 1])  # per-row prompt lengths (BOS included)


@pytest.fixture(scope="module")
def lm():
    cfg = BASE
    module, params = _init(cfg)
    prompt = _tokens(cfg, len(PROMPTS), WIDTH, seed=1)
    prompt[:, 0] = 0  # BOS

    def gen(**kw):
        kw = {"max_new_tokens": WIDTH, "cache_length": WIDTH, "eos_id": None, **kw}
        return decoding.generate(module, params, prompt, PROMPTS, kw.pop("rng", jax.random.PRNGKey(7)), **kw)

    greedy, scores = gen(greedy=True, return_scores=True)
    return module, params, prompt, gen, np.asarray(greedy), np.asarray(scores)


def test_greedy_cached_equals_recompute_and_respects_the_length(lm):
    module, params, prompt, gen, greedy, scores = lm
    ref, ref_scores = gen(greedy=True, recompute=True, return_scores=True)
    np.testing.assert_array_equal(greedy, ref)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    # T5X's max_decode_length: prompt + generation fill at most WIDTH + 1 positions (BOS counted).
    n_generated = WIDTH - PROMPTS + 1
    for r, n in enumerate(n_generated):
        assert np.all(greedy[r, n:] == 0)
    # The scores are the model's log-likelihood of the tokens it generated.
    seq = np.concatenate([prompt[1:2, :PROMPTS[1]], greedy[1:2, :n_generated[1]]], axis=1)
    logp = jax.nn.log_softmax(module.apply({"params": params}, seq[:, :-1], enable_dropout=False))
    want = np.take_along_axis(np.asarray(logp), seq[:, 1:, None], -1)[0, PROMPTS[1] - 1:, 0].sum()
    np.testing.assert_allclose(scores[1], want, atol=1e-4)


def test_top_k_1_equals_greedy(lm):
    *_, gen, greedy, _ = lm
    np.testing.assert_array_equal(gen(top_k=1, temperature=1.0), greedy)


def test_sampling_is_deterministic_under_a_fixed_rng(lm):
    *_, gen, greedy, _ = lm
    a = np.asarray(gen(temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(1)))
    b = np.asarray(gen(temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(1)))
    c = np.asarray(gen(temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(2)))
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c) and np.any(a != greedy)


def _first(row, token):
    hits = np.flatnonzero(row == token)
    return hits[0] if len(hits) else len(row)


def test_eos_stops_a_row_while_the_others_continue(lm):
    module, params, prompt, gen, greedy, _ = lm
    # "EOS": a token row 0 generates early, and row 2 (the longest) later or never.
    eos = next(int(t) for t in greedy[0, 1:] if _first(greedy[2], t) > _first(greedy[0], t) + 1)
    got = np.asarray(gen(greedy=True, eos_id=eos))
    for r in range(len(PROMPTS)):
        stop = _first(greedy[r], eos) + 1
        np.testing.assert_array_equal(got[r, :stop], greedy[r, :stop])
        assert np.all(got[r, stop:] == 0)
    stop0 = _first(greedy[0], eos) + 1
    assert stop0 < WIDTH and np.any(got[2, stop0:] != 0)  # row 0 stopped, row 2 went on

    # predict_batch_with_aux is the same decode, prompts from decoder_causal_attention.
    model = models.DecoderOnlyLM(module)
    batch = {"decoder_input_tokens": prompt, "decoder_causal_attention": np.arange(WIDTH)[None] < PROMPTS[:, None]}
    tokens, aux = model.predict_batch_with_aux(params, batch, jax.random.PRNGKey(7), greedy=True, eos_id=eos)
    np.testing.assert_array_equal(tokens, got)
    assert aux["scores"].shape == (len(PROMPTS),)


def test_sample_loop_eos_and_limits_with_a_stub_decoder():
    """Rows emit token r+2 until step 3 + r, where row 1 emits EOS (1); the state counts steps."""
    vocab, eos = 8, 1

    def step(tokens, state):
        i = state
        rows = jnp.arange(3)
        target = jnp.where((rows == 1) & (i == 3), eos, rows + 2)
        return jax.nn.one_hot(target, vocab) * 50.0, i + 1

    tokens, scores = decoding.sample_loop(step, jnp.int32(0), jnp.zeros(3, jnp.int32), jax.random.PRNGKey(0), 6,
                                          decoding.Sampler(), eos_id=eos, limits=jnp.array([6, 6, 2]))
    np.testing.assert_array_equal(tokens, [[2] * 6, [3, 3, 3, 1, 0, 0], [4, 4, 0, 0, 0, 0]])
    assert np.all(np.asarray(scores) > -1e-3)


def test_sample_logits_top_k_and_top_p_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)

    def support(sampler):
        draws = jax.vmap(lambda k: decoding.sample_logits(logits, k, sampler))(keys)  # [400, 2]
        return [set(np.asarray(draws[:, r]).tolist()) for r in range(2)]

    assert support(decoding.Sampler()) == [{0, 1, 2, 3}, {0, 1, 2, 3}]
    assert support(decoding.Sampler(top_k=2)) == [{0, 1}, {2, 3}]
    assert support(decoding.Sampler(top_p=0.7)) == [{0, 1}, {2, 3}]  # 0.5 < 0.7 <= 0.8
    assert support(decoding.Sampler(top_p=0.81)) == [{0, 1, 2}, {1, 2, 3}]
    assert support(decoding.Sampler(top_p=1e-6)) == [{0}, {3}]
    assert support(decoding.Sampler(temperature=0.0)) == [{0}, {3}]
