"""Upstream T5X runs what Olmax makes: an Olmax-trained checkpoint exported with
olmax.t5x_checkpoints scores the same in T5X's infer.py as in olmax.infer; the MoE model class
adds the MoE losses to T5X's loss (and gin/t5x/olmax_moe.gin trains in T5X's train.py); T5X's
beam search with three beams scores each finished beam as the full forward does.

The binaries run as tests/t5x_interop_binaries.py says (the module skips, saying why, without
a T5X source tree in OLMAX_T5X_DIR). These tests need no T5X-trained checkpoint: those that do
are in tests/test_t5x_interop.py.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import t5x_interop_binaries as binaries
from t5x_interop_binaries import (F32, MODEL_GIN, T5X_MOE_GIN, olmax, olmax_infer, run_checked, scores, t5x_env,
                                  t5x_infer, t5x_train)

pytestmark = pytest.mark.slow

binaries.require_t5x()


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(binaries_compile_cache):
    """The binaries started here share compiled programs (conftest.binaries_compile_cache)."""
    binaries.COMPILE_CACHE.update(binaries_compile_cache)


def test_olmax_checkpoint_scores_the_same_in_t5x(tmp_path):
    model_dir, exported = str(tmp_path / "olmax_model"), str(tmp_path / "exported")
    olmax(
        "train", f"--gin_file={MODEL_GIN}", "--gin.network.OlmaxConfig.dtype='bfloat16'",
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='olmax_stdlib'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4",
        "--gin.train.train.eval_steps=1", "--gin.optim.create_optimizer.warmup_steps=1",
        "--gin.train.train.peak_flops=1e11",
    )
    out = olmax("t5x_checkpoints", f"--checkpoint={model_dir}/2", f"--output={exported}")
    assert os.path.join(exported, "checkpoint_2") in out
    theirs = t5x_infer(os.path.join(exported, "checkpoint_2"), str(tmp_path / "t5x_exported"),
                       "--gin.infer.mode='score'", F32)
    ours = olmax_infer(os.path.join(model_dir, "2"), str(tmp_path / "olmax_own"), "score")
    np.testing.assert_allclose(scores(theirs), scores(ours), rtol=1e-4)


MOE_CHECK = r"""
import json
import jax, numpy as np, seqio
from t5x import models
from olmax import network, t5x_models

cfg = network.OlmaxConfig(vocab_size=384, features=32, depth=2, max_length=64, conv_features=32, mixer_block=8,
                          mixer_heads=2, num_experts=4, expert_top_k=2, expert_features=32, expert_group_size=32)
out = {}
for name, config in (("moe", cfg), ("dense", network.OlmaxConfig(**{**vars(cfg), "num_experts": 0}))):
    module = network.Olmax(config)
    kw = dict(module=module, vocabulary=seqio.ByteVocabulary(), optimizer_def=None, z_loss=1e-4)
    base = models.DecoderOnlyModel(**kw)
    ours = t5x_models.OlmaxDecoderOnlyModel(moe_aux_loss=0.01, moe_z_loss=0.001, **kw)
    targets = np.random.RandomState(0).randint(3, 259, (2, 64)).astype(np.int32)
    batch = {"decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))), "decoder_target_tokens": targets,
             "decoder_loss_weights": np.ones_like(targets)}
    params = base.get_initial_variables(jax.random.PRNGKey(0), {"decoder_input_tokens": (2, 64)})["params"]
    base_loss, _ = base.loss_fn(params, batch, None)
    loss, metrics = ours.loss_fn(params, batch, None)
    _, state = module.apply({"params": params}, batch["decoder_input_tokens"], enable_dropout=False,
                            mutable=["intermediates"])
    aux = {k: float(v) for k, v in state["intermediates"]["moe_aux"][0].items()}
    out[name] = {"base": float(base_loss), "ours": float(loss), "aux": aux,
                 "metrics": {k: float(v.compute()) for k, v in metrics.items() if k.startswith("moe/")}}
print("MOE_CHECK " + json.dumps(out))
"""


def test_moe_model_class_adds_the_moe_losses(tmp_path):
    out = run_checked([sys.executable, "-c", MOE_CHECK], t5x_env())
    result = json.loads(out.split("MOE_CHECK ", 1)[1].splitlines()[0])
    moe, dense = result["moe"], result["dense"]
    branches, tokens = 2, 2 * 64  # depth x one MoE branch; weighted target tokens
    lb, z = moe["aux"]["moe_lb_loss"] / branches, moe["aux"]["moe_z_loss"] / branches
    assert lb > 0.5 and z > 0
    assert moe["ours"] - moe["base"] == pytest.approx(tokens * (0.01 * lb + 0.001 * z), rel=1e-3)
    assert moe["metrics"]["moe/lb_loss"] == pytest.approx(lb) and set(moe["metrics"]) == {
        "moe/lb_loss", "moe/z_loss", "moe/dropped", "moe/max_load"}
    assert dense["ours"] == dense["base"] and not dense["metrics"]
    # And gin/t5x/olmax_moe.gin trains in T5X, logging the MoE metrics.
    log = t5x_train(str(tmp_path / "moe"), 2, gin_file=T5X_MOE_GIN, length=64)
    assert "moe/lb_loss=" in log and "moe/dropped=" in log


BEAM_CHECK = r"""
import functools, json
import jax, numpy as np, seqio
from t5x import decoding, models
from olmax import network

# The axial mixer: at this random initialization its beams end with EOS within 32 tokens (the
# recall mixer's do not, and an unfinished beam has no score to check). What is checked is
# T5X's gather of every cache leaf along the batch axis; the recall mixer's cache goes through
# the same gather in the T5X beam search of test_t5x_greedy_and_one_beam_equal_olmax_greedy.
cfg = network.OlmaxConfig(vocab_size=384, features=32, depth=2, max_length=64, conv_features=32, mixer_block=8,
                          mixer_heads=2, mixer="axial")
kw = dict(module=network.Olmax(cfg), vocabulary=seqio.ByteVocabulary(), optimizer_def=None)
beam = models.DecoderOnlyModel(decode_fn=functools.partial(decoding.beam_search, alpha=0.0), **kw)
greedy = models.DecoderOnlyModel(decode_fn=functools.partial(decoding.temperature_sample, temperature=0.0), **kw)
length, prompts = 32, np.array([6, 9])
params = beam.get_initial_variables(jax.random.PRNGKey(0), {"decoder_input_tokens": (2, length)})["params"]
tokens = np.random.RandomState(0).randint(3, 259, (2, length)).astype(np.int32)
tokens[:, 0] = 0  # BOS
causal = (np.arange(length)[None] < prompts[:, None]).astype(np.int32)
batch = {"decoder_input_tokens": tokens * causal, "decoder_causal_attention": causal,
         "decoder_target_tokens": tokens * causal}
decodes, aux = beam.predict_batch_with_aux(params, batch, num_decodes=3, return_all_decodes=True)
one, _ = beam.predict_batch_with_aux(params, batch, num_decodes=1)
best, _ = greedy.predict_batch_with_aux(params, batch)
checked = []
for b in range(2):
    for k in range(3):
        generated, score = np.asarray(decodes)[b, k], float(np.asarray(aux["scores"])[b, k])
        ends = np.flatnonzero(generated == 1)
        if score < -1e6 or not len(ends):  # an empty beam slot, or a beam cut at the length
            continue
        full = np.concatenate([tokens[b, :prompts[b]], generated])
        weights = np.zeros(length)
        weights[prompts[b] - 1: prompts[b] + ends[0]] = 1  # the generated tokens, EOS included
        full_forward = greedy.score_batch(params, {"decoder_input_tokens": full[None, :length],
                                                   "decoder_target_tokens": full[None, 1:length + 1],
                                                   "decoder_loss_weights": weights[None]})
        checked.append((score, float(full_forward[0])))
print("BEAM_CHECK " + json.dumps({"checked": checked, "one_beam_is_greedy": bool(np.all(one == best)),
                                  "shape": list(np.shape(decodes))}))
"""


def test_t5x_beam_search_with_three_beams_scores_equal_full_forward():
    """T5X's beam search gathers every cache leaf along the batch axis each step; each finished
    beam's score (alpha=0: its log-likelihood) equals the full forward's score of that sequence."""
    out = run_checked([sys.executable, "-c", BEAM_CHECK], t5x_env())
    result = json.loads(out.split("BEAM_CHECK ", 1)[1].splitlines()[0])
    assert result["shape"] == [2, 3, 32] and result["one_beam_is_greedy"]
    assert len(result["checked"]) >= 2, result
    for beam_score, full_forward in result["checked"]:
        assert beam_score == pytest.approx(full_forward, rel=1e-4)
