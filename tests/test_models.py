"""The LM around the network: loss in closed form, scoring, axes, and a real overfit."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from olmax import axes, models, network, optim

CFG = network.OlmaxConfig(
    vocab_size=64, features=32, depth=2, max_length=64, conv_features=32, conv_kernel=3,
    mixer_block=8, mixer_heads=2, num_heads=2, expert_features=32,
)


def test_cross_entropy_closed_form():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 3, 5).astype(np.float32)
    targets = rng.randint(0, 5, (2, 3))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce, lse = models.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(ce, -np.take_along_axis(logp, targets[..., None], -1)[..., 0], rtol=1e-6)
    np.testing.assert_allclose(lse, np.log(np.exp(logits).sum(-1)), rtol=1e-6)
    a = 0.1
    dist = np.full(logits.shape, a / 5) + (1 - a) * np.eye(5)[targets]
    smooth_ref = -(dist * logp).sum(-1) + (dist * np.log(dist)).sum(-1)  # KL(dist || p)
    smooth, _ = models.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=a)
    np.testing.assert_allclose(smooth, smooth_ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def lm():
    model = models.DecoderOnlyLM(network.Olmax(CFG), z_loss=1e-3)
    variables = jax.jit(lambda r: model.get_initial_variables(r, {"decoder_input_tokens": (2, 32)}))(jax.random.PRNGKey(0))
    return model, variables


def _batch(rng, b=2, t=32, vocab=64):
    tokens = rng.randint(1, vocab, (b, t + 1))
    weights = np.ones((b, t), np.float32)
    weights[1, 20:] = 0.0
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": weights,
    }


def test_loss_and_metrics_match_logits(lm):
    model, variables = lm
    params = variables["params"]
    batch = _batch(np.random.RandomState(0))
    loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
    logits = np.asarray(model.module.apply({"params": params}, batch["decoder_input_tokens"], enable_dropout=False), np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    ce = lse - np.take_along_axis(logits, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    w = batch["decoder_loss_weights"]
    ce_mean = (ce * w).sum() / w.sum()
    z = (lse**2 * w).sum() / w.sum()
    np.testing.assert_allclose(loss, ce_mean + 1e-3 * z, rtol=1e-5)
    np.testing.assert_allclose(metrics["bits_per_token"], ce_mean / math.log(2), rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(ce_mean), rtol=1e-5)
    acc = ((logits.argmax(-1) == batch["decoder_target_tokens"]) * w).sum() / w.sum()
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
    assert metrics["tokens"] == w.sum()
    scores = model.score_batch(params, batch)
    np.testing.assert_allclose(scores, -(ce * w).sum(-1), rtol=1e-5)


def test_moe_losses_enter_the_loss():
    cfg = dataclasses.replace(CFG, num_experts=4, capacity_factor=1.0)
    model = models.DecoderOnlyLM(network.Olmax(cfg), z_loss=0.0, moe_aux_loss=0.0, moe_z_loss=0.0)
    with_aux = models.DecoderOnlyLM(network.Olmax(cfg), z_loss=0.0, moe_aux_loss=0.5, moe_z_loss=0.25)
    params = jax.jit(lambda r: model.get_initial_variables(r, {"decoder_input_tokens": (2, 32)}))(jax.random.PRNGKey(0))["params"]
    batch = _batch(np.random.RandomState(1))
    l0, m0 = jax.jit(model.loss_fn)(params, batch, None)
    l1, m1 = jax.jit(with_aux.loss_fn)(params, batch, None)
    np.testing.assert_allclose(l1 - l0, 0.5 * m0["moe_lb_loss"] + 0.25 * m0["moe_z_loss"], rtol=1e-5)
    assert m0["moe_lb_loss"] >= 0.99  # E * sum(f * P) >= 1 with equality only when balanced
    assert 0.0 <= m0["moe_dropped"] < 1.0


def test_every_parameter_has_axes_with_rules():
    cfg = dataclasses.replace(CFG, num_experts=4, blocks=("conv", "moe", "mixer"))
    for c in (cfg, dataclasses.replace(cfg, mixer="attention", norm="layer")):
        module = network.Olmax(c)
        tok = jax.ShapeDtypeStruct((1, 16), jnp.int32)
        variables = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t, t, enable_dropout=False), tok)
        specs = axes.logical_axes(variables)
        flat_params = jax.tree_util.tree_leaves_with_path(variables["params"])
        flat_specs = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=axes.is_spec))
        assert len(flat_params) == len(flat_specs)
        rules = dict(axes.DEFAULT_RULES)
        for path, leaf in flat_params:
            spec = flat_specs[path]
            assert len(spec) == leaf.ndim, (path, spec, leaf.shape)
            for name in spec:
                assert name in axes.PARAM_AXES and name in rules, (path, name)
    assert set(axes.ACTIVATION_AXES) <= set(rules)


def test_tiny_model_overfits_one_batch(lm):
    model, variables = lm
    params = variables["params"]
    tx = optim.create_optimizer(learning_rate=3e-3, warmup_steps=5, total_steps=60, weight_decay=0.0,
                                axes=axes.logical_axes(variables))
    state = tx.init(params)
    batch = _batch(np.random.RandomState(2))

    @jax.jit
    def step(params, state):
        (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, None)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(60):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    print("overfit losses", losses[0], losses[-1])
    assert losses[-1] < 0.2 * losses[0]
