"""Closed-form tests for olmax.optim: AGC, decay mask, schedules, full chain, gin."""

import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict
from jax.sharding import PartitionSpec as P

from olmax import optim

CLIP = 0.5


def np_agc(g, w, reduce, clip=CLIP, eps=1e-3):
    """Reference AGC in numpy: per unit, scale G_i to clip * max(|W_i|, eps) if over it."""
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    g_norm = np.sqrt(np.sum(g * g, axis=reduce, keepdims=True))
    w_norm = np.maximum(np.sqrt(np.sum(w * w, axis=reduce, keepdims=True)), eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        over = g_norm / w_norm > clip
        factor = np.where(over, clip * w_norm / g_norm, 1.0)
    return g * factor, over


def agc(grads, params, axes=None, clip=CLIP, eps=1e-3):
    tx = optim.adaptive_grad_clip(clip, eps, axes=axes)
    out, _ = tx.update(grads, tx.init(params), params)
    return out


def scaled_grad(w, ratios, unit_axis):
    """G = W * ratio_i along unit_axis, so ||G_i|| / ||W_i|| == ratio_i exactly."""
    shape = [1] * w.ndim
    shape[unit_axis] = len(ratios)
    return w * np.asarray(ratios, np.float32).reshape(shape)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_plain_kernel_some_units_clipped(rng):
    w = rng.normal(size=(3, 4)).astype(np.float32)
    g = scaled_grad(w, [0.1, 2.0, 0.4, 5.0], unit_axis=1)
    want, over = np_agc(g, w, (0,))
    assert over.ravel().tolist() == [False, True, False, True]
    got = agc({"k": g}, {"k": w})["k"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(
        np.linalg.norm(got[:, 1]), CLIP * np.linalg.norm(w[:, 1]), rtol=1e-5
    )
    np.testing.assert_array_equal(got[:, 0], g[:, 0])  # unclipped unit untouched


def test_scanned_kernel_is_per_layer(rng):
    w = rng.normal(size=(2, 3, 4)).astype(np.float32)
    g = w * np.array([3.0, 0.2], np.float32)[:, None, None]  # layer 0 over, layer 1 under
    axes = {"k": ("layers", "embed", "mlp")}
    got = agc({"k": g}, {"k": w}, axes)["k"]
    want, over = np_agc(g, w, (1,))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert over[0].all() and not over[1].any()
    np.testing.assert_array_equal(got[1], g[1])
    by_rank, _ = np_agc(g, w, (0, 1))  # layer axis wrongly reduced (our no-axes rank rule)
    assert np.abs(by_rank - want).max() > 0.1
    np.testing.assert_allclose(agc({"k": g}, {"k": w})["k"], by_rank, rtol=1e-5)


def test_one_d_scale_is_one_unit(rng):
    w = rng.normal(size=(5,)).astype(np.float32)
    g = 3.0 * w
    got = agc({"s": g}, {"s": w}, {"s": ("embed",)})["s"]
    np.testing.assert_allclose(got, np_agc(g, w, (0,))[0], rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got), CLIP * np.linalg.norm(w), rtol=1e-5)
    # ('layers', 'embed'): one unit per layer.
    w2 = np.stack([w, w])
    g2 = w2 * np.array([3.0, 0.1], np.float32)[:, None]
    got2 = agc({"s": g2}, {"s": w2}, {"s": ("layers", "embed")})["s"]
    np.testing.assert_allclose(got2, np_agc(g2, w2, (1,))[0], rtol=1e-5)
    np.testing.assert_array_equal(got2[1], g2[1])


def test_embedding_rows_are_units(rng):
    w = rng.normal(size=(6, 3)).astype(np.float32)
    g = scaled_grad(w, [0.1, 1.0, 0.2, 3.0, 0.3, 0.6], unit_axis=0)
    got = agc({"e": g}, {"e": w}, {"e": ("vocab", "embed")})["e"]
    want, over = np_agc(g, w, (1,))
    assert over.ravel().tolist() == [False, True, False, True, False, True]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.abs(np_agc(g, w, (0,))[0] - want).max() > 0.1  # rank rule would be per column
    # Output kernel ('embed', 'vocab'): per vocab column.
    got_t = agc({"o": g.T}, {"o": w.T}, {"o": ("embed", "vocab")})["o"]
    np.testing.assert_allclose(got_t, want.T, rtol=1e-5)


def test_moe_expert_kernel(rng):
    w = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    g = w * rng.uniform(0.0, 1.5, size=(2, 3, 1, 5)).astype(np.float32)
    got = agc({"k": g}, {"k": w}, {"k": ("layers", "expert", "embed", "mlp")})["k"]
    want, over = np_agc(g, w, (2,))
    assert over.any() and not over.all()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Router ('embed', 'expert'): one unit per expert, reduced over embed.
    r = rng.normal(size=(4, 3)).astype(np.float32)
    rg = scaled_grad(r, [2.0, 0.1, 1.0], unit_axis=1)
    got_r = agc({"r": rg}, {"r": r}, {"r": ("embed", "expert")})["r"]
    np.testing.assert_allclose(got_r, np_agc(rg, r, (0,))[0], rtol=1e-5)


def test_scalar_param():
    got = agc({"a": jnp.float32(-1.0)}, {"a": jnp.float32(0.5)}, {"a": ()})["a"]
    np.testing.assert_allclose(got, -CLIP * 0.5, rtol=1e-6)
    assert float(agc({"a": jnp.float32(0.1)}, {"a": jnp.float32(0.5)})["a"]) == pytest.approx(0.1)


def test_reduction_axes_helper():
    cases = {
        ("layers", "embed", "mlp"): (1,),
        ("vocab", "embed"): (1,),
        ("embed", "vocab"): (0,),
        ("layers", "expert", "embed", "mlp"): (2,),
        ("layers", "mix_lag", "heads"): (1,),
        ("embed",): (0,),
        ("layers", "norm"): (1,),
        ("embed", "expert"): (0,),
        ("layers", "expert"): (),
        (): (),
    }
    for names, want in cases.items():
        assert optim.agc_reduction_axes(names) == want, names
    assert optim.agc_reduction_axes(P("layers", "embed", "mlp")) == (1,)
    assert [optim.agc_reduction_axes(n) for n in range(5)] == [(), (0,), (0,), (0, 1), (0, 1, 2)]


def test_no_axes_is_rank_rule_and_matches_optax(rng):
    shapes = {"a": (2, 3, 4), "b": (3, 4), "c": (4,), "d": ()}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    wiggle = {k: np.cos(np.arange(np.prod(s))).reshape(s) for k, s in shapes.items()}
    grads = {k: np.asarray(2.0 * params[k] * wiggle[k], np.float32) for k in shapes}
    got = agc(grads, params)
    for k, red in {"a": (0, 1), "b": (0,), "c": (0,), "d": ()}.items():
        np.testing.assert_allclose(got[k], np_agc(grads[k], params[k], red)[0], rtol=1e-5)
    # optax agrees for rank 0-2 but reduces a rank-3 [layers, in, out] kernel over axis 0 only.
    theirs = optax.adaptive_grad_clip(CLIP, 1e-3)
    ref, _ = theirs.update(grads, theirs.init(params), params)
    for k in "bcd":
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5)
    np.testing.assert_allclose(ref["a"], np_agc(grads["a"], params["a"], (0,))[0], rtol=1e-5)
    assert np.abs(got["a"] - ref["a"]).max() > 0.1


def test_partition_spec_and_frozendict_axes(rng):
    w = {"k": rng.normal(size=(2, 3, 4)).astype(np.float32), "s": np.ones((2, 3), np.float32)}
    g = jax.tree.map(lambda x: 2.0 * x * rng.uniform(size=x.shape).astype(np.float32), w)
    tuples = agc(g, w, {"k": ("layers", "embed", "mlp"), "s": ("layers", "embed")})
    specs = agc(g, w, FrozenDict({"k": P("layers", "embed", "mlp"), "s": P("layers", "embed")}))
    short = agc(g, w, {"k": P("layers"), "s": P("layers")})  # trailing Nones omitted
    for other in (specs, short):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), tuples, other)
    np.testing.assert_allclose(tuples["k"], np_agc(g["k"], w["k"], (1,))[0], rtol=1e-5)
    with pytest.raises(ValueError, match="same tree structure"):
        agc(g, w, {"k": ("layers", "embed", "mlp")})
    with pytest.raises(ValueError, match="one logical name per dimension"):
        agc(g, w, {"k": ("embed", "mlp"), "s": ("embed",)})


def test_zero_grad_and_eps_floor():
    w = jnp.zeros((3, 2))
    zero = agc({"k": jnp.zeros((3, 2))}, {"k": w})["k"]
    assert not np.isnan(zero).any() and not np.any(zero)
    jac = jax.grad(lambda g: jnp.sum(agc({"k": g}, {"k": w})["k"]))(jnp.zeros((3, 2)))
    assert np.isfinite(jac).all()
    g = jnp.array([[3.0, 1e-5], [4.0, 0.0], [0.0, 0.0]])
    got = agc({"k": g}, {"k": w}, eps=1e-3)["k"]
    np.testing.assert_allclose(got, np_agc(g, w, (0,))[0], rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got[:, 0]), CLIP * 1e-3, rtol=1e-5)  # floored W
    np.testing.assert_array_equal(got[:, 1], g[:, 1])  # 1e-5 < 0.5 * 1e-3: untouched


def test_state_is_empty_and_params_required():
    tx = optim.adaptive_grad_clip(0.01)
    state = tx.init({"k": jnp.ones((2, 2))})
    assert isinstance(state, optax.EmptyState)
    with pytest.raises(ValueError, match=r"update\(grads, opt_state, params\)"):
        tx.update({"k": jnp.ones((2, 2))}, state)


def test_clip_fraction_exact(rng):
    w = {
        "k": rng.normal(size=(3, 4)).astype(np.float32),
        "b": np.ones(3, np.float32),
        "a": np.float32(2.0),
        "l": rng.normal(size=(2, 3, 2)).astype(np.float32),
    }
    g = {
        "k": scaled_grad(w["k"], [0.1, 2.0, 0.4, 5.0], 1),
        "b": 3.0 * w["b"],
        "a": np.float32(0.1),
        "l": w["l"] * np.array([2.0, 0.1], np.float32)[:, None, None],
    }
    axes = {"k": ("embed", "mlp"), "b": ("embed",), "a": (), "l": ("layers", "embed", "mlp")}
    # units: k 4 (2 clipped), b 1 (clipped), a 1 (not), l 2 layers x 2 (layer 0 clipped) -> 5 / 10
    assert float(optim.agc_clip_fraction(g, w, CLIP, axes=axes)) == pytest.approx(0.5)
    # without axes l reduces over (layers, embed): both its 2 units mix to ratio ~1.4 -> clipped.
    assert float(optim.agc_clip_fraction(g, w, CLIP)) == pytest.approx(5 / 8)
    assert float(jax.jit(optim.agc_clip_fraction, static_argnums=2)(g, w, 100.0)) == 0.0


def test_weight_decay_mask():
    axes = {
        "k": ("layers", "embed", "mlp"),
        "x": ("layers", "expert", "embed", "mlp"),
        "n": ("layers", "norm"),
        "b": ("mlp",),
        "a": (),
        "e": ("vocab", "embed"),
        "r": ("embed", "expert"),
    }
    shapes = {"k": (2, 3, 4), "x": (2, 2, 3, 4), "n": (2, 3), "b": (4,), "a": (), "e": (5, 3),
              "r": (3, 2)}
    params = {k: jnp.ones(s) for k, s in shapes.items()}
    with_axes = {"k": True, "x": True, "n": False, "b": False, "a": False, "e": True, "r": False}
    by_rank = dict(with_axes, n=True, r=True)
    assert optim.weight_decay_mask(params, axes) == with_axes
    assert optim.weight_decay_mask(params) == by_rank


@pytest.mark.parametrize(
    "name,want",
    [  # lr 1, warmup 10, total 110, end ratio 0.1: warmup midpoint, peak, decay midpoint, end
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 200: 0.1}),
        ("linear", {5: 0.5, 10: 1.0, 35: 0.775, 60: 0.55, 110: 0.1}),
        ("rsqrt", {5: 0.5, 10: 1.0, 40: 0.5, 1000: 0.1}),
        ("constant", {5: 0.5, 10: 1.0, 110: 1.0}),
    ],
)
def test_schedules_closed_form(name, want):
    sched = optim.make_schedule(name, 1.0, warmup_steps=10, total_steps=110, end_value_ratio=0.1)
    for step, value in want.items():
        assert float(sched(jnp.int32(step))) == pytest.approx(value, abs=1e-6), (name, step)
    cos = optim.make_schedule("cosine", 2.0, 10, 110)
    assert float(cos(35)) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))


def test_schedule_errors_and_no_warmup():
    with pytest.raises(ValueError, match="cosine, rsqrt, constant, linear"):
        optim.make_schedule("exp", 1.0, 10, 100)
    assert float(optim.make_schedule("rsqrt", 1.0, 0, 100)(4)) == pytest.approx(0.5)
    assert float(optim.make_schedule("cosine", 1.0, 0, 100)(0)) == pytest.approx(1.0)


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(caplog):
    """A 20-step rehearsal of a run with 40 warm-up steps: warm-up 2 (10%), then the cosine."""
    with caplog.at_level("WARNING"):
        sched = optim.make_schedule("cosine", 1.0, warmup_steps=40, total_steps=20, end_value_ratio=0.1)
    assert "warmup_steps=40" in caplog.text and "total_steps=20" in caplog.text
    assert float(sched(1)) == pytest.approx(0.5)  # halfway through a 2-step warm-up
    assert float(sched(2)) == pytest.approx(1.0)
    assert float(sched(20)) == pytest.approx(0.1)
    for name in ("linear", "rsqrt", "constant"):
        assert float(optim.make_schedule(name, 1.0, 40, 20)(2)) == pytest.approx(1.0)


def test_default_warmup_is_a_tenth_of_the_run_up_to_1000():
    assert [optim.default_warmup(t) for t in (5, 400, 1200, 10_000, 100_000)] == [0, 40, 120, 1000, 1000]
    sched = optim.make_schedule("cosine", 1.0, None, 1200)
    assert float(sched(60)) == pytest.approx(0.5) and float(sched(120)) == pytest.approx(1.0)
    assert float(optim.make_schedule("cosine", 1.0, None, 5)(0)) == pytest.approx(1.0)  # no warm-up


def _is_optax_state(s):
    if isinstance(s, optax.MaskedState):
        return _is_optax_state(s.inner_state)
    if type(s) is tuple:
        return all(_is_optax_state(x) for x in s)
    return type(s).__module__.startswith("optax")


def _tiny(rng):
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
    }
    grads = {"w": params["w"] * jnp.array([0.01, 3.0]), "b": jnp.array([0.3, -0.02])}
    return params, grads


def test_create_optimizer_adamw_step_closed_form(rng):
    params, grads = _tiny(rng)
    lr, wd, eps, clip = 0.1, 0.1, 0.1, 0.5
    tx = optim.create_optimizer(
        learning_rate=lr, schedule="constant", warmup_steps=0, eps=eps, weight_decay=wd,
        clipping=clip,
    )
    state = tx.init(params)
    assert _is_optax_state(state)
    upd, _ = jax.jit(tx.update)(grads, state, params)
    for k, decay in (("w", True), ("b", False)):
        gc = np_agc(grads[k], params[k], (0,), clip=clip)[0]
        # First Adam step: mu_hat = g, nu_hat = g^2 after bias correction.
        want = -lr * (gc / (np.abs(gc) + eps) + (wd * np.asarray(params[k]) if decay else 0.0))
        np.testing.assert_allclose(upd[k], want, rtol=1e-5, atol=1e-7)
    b_decayed = -lr * (grads["b"] / (np.abs(grads["b"]) + eps) + wd * params["b"])
    assert np.abs(upd["b"] - b_decayed).max() > 1e-3  # the 1-d param really got no decay


def test_create_optimizer_adafactor_and_lion(rng):
    params, grads = _tiny(rng)
    for name in ("adafactor", "lion"):
        tx = optim.create_optimizer(
            learning_rate=0.1, schedule="constant", warmup_steps=0, optimizer=name,
            clipping=None, weight_decay=0.0,
        )
        state = tx.init(params)
        assert _is_optax_state(state)
        upd, _ = tx.update(grads, state, params)
        for k in params:
            assert np.isfinite(upd[k]).all()
            np.testing.assert_array_equal(np.sign(upd[k]), -np.sign(grads[k]))
        if name == "lion":  # first step: sign((1 - b1) g)
            np.testing.assert_allclose(upd["w"], -0.1 * np.sign(grads["w"]))
    with pytest.raises(ValueError, match="adamw, adafactor, lion"):
        optim.create_optimizer(optimizer="sgd")


def test_exclude_output_layer_from_agc(rng):
    params = {
        "logits": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "mlp": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
    }
    grads = jax.tree.map(lambda x: 10.0 * x, params)  # every unit over the threshold
    axes = {"logits": ("embed", "vocab"), "mlp": ("layers", "embed", "mlp")}
    masked = optax.masked(
        optim.adaptive_grad_clip(CLIP, axes=axes), lambda p: optim.agc_mask(p, exclude="logits")
    )
    out, _ = masked.update(grads, masked.init(params), params)
    np.testing.assert_array_equal(out["logits"], grads["logits"])
    want_mlp = np_agc(grads["mlp"], params["mlp"], (1,))[0]
    np.testing.assert_allclose(out["mlp"], want_mlp, rtol=1e-5)
    assert np.abs(agc(grads, params, axes)["logits"] - grads["logits"]).max() > 1.0
    # Same through create_optimizer; first Adam step with a large eps keeps |g| visible.
    tx = optim.create_optimizer(
        learning_rate=1.0, schedule="constant", warmup_steps=0, eps=1.0, weight_decay=0.0,
        clipping=CLIP, axes=axes, exclude_from_agc=("logits",),
    )
    state = tx.init(params)
    assert isinstance(state[0], optax.MaskedState) and _is_optax_state(state)
    upd, _ = tx.update(grads, state, params)
    for k, gc in (("logits", np.asarray(grads["logits"])), ("mlp", want_mlp)):
        np.testing.assert_allclose(upd[k], -gc / (np.abs(gc) + 1.0), rtol=1e-5, atol=1e-7)


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("binding", ["olmax.optim.create_optimizer", "optim.create_optimizer"])
def test_gin_binds_learning_rate(clean_gin, binding):
    gin.parse_config(f'{binding}.learning_rate = 0.5\n{binding}.schedule = "constant"')
    tx = optim.create_optimizer(warmup_steps=0, clipping=None, weight_decay=0.0, eps=0.0)
    g = {"x": jnp.array([2.0, -3.0])}
    upd, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(upd["x"], [-0.5, 0.5], rtol=1e-6)
