"""Upstream T5X runs Olmax: T5X's own train.py, eval.py and infer.py in subprocesses, on one
T5X-trained checkpoint.

The binaries run as tests/t5x_interop_binaries.py says (the module skips, saying why, without
a T5X source tree in OLMAX_T5X_DIR). One T5X-trained checkpoint (4 steps,
gin/t5x/olmax_decoder_only.gin as written: reversible stack, bfloat16 compute) is shared by
the tests, which check equivalences: T5X's scores == olmax.infer's on it; T5X's greedy
predictions == olmax.infer's (both computing in float32); T5X's beam search with one beam
follows its greedy path; T5X eval's seqio metrics == the same metrics of those predictions and
scores; olmax.eval reads it; T5X resumes it with 2-way model parallelism.
tests/test_t5x_interop_models.py runs T5X on what Olmax makes without that checkpoint (an
exported Olmax checkpoint, the MoE model class, beam search with three beams).
"""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

import t5x_interop_binaries as binaries
from t5x_interop_binaries import (BEAM, COMPUTE32, F32, GREEDY, LENGTHS, MODEL_GIN, REPO, T5X_GIN, TASK, env, jsonl,
                                  olmax, olmax_infer, run_checked, scores, t5x, t5x_infer, t5x_train)

pytestmark = pytest.mark.slow

binaries.require_t5x()

import t5x_interop_tasks  # noqa: E402  (after the skip: it imports tensorflow)

assert TASK == t5x_interop_tasks.TASK


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(binaries_compile_cache):
    """The binaries started here share compiled programs (conftest.binaries_compile_cache)."""
    binaries.COMPILE_CACHE.update(binaries_compile_cache)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A T5X MODEL_DIR trained 4 steps from gin/t5x/olmax_decoder_only.gin as written."""
    root = tmp_path_factory.mktemp("t5x")
    model_dir = str(root / "model")
    log = t5x_train(model_dir, 4)
    assert os.path.isdir(os.path.join(model_dir, "checkpoint_4")), log[-3000:]
    return {"root": root, "model_dir": model_dir, "checkpoint": os.path.join(model_dir, "checkpoint_4")}


@pytest.fixture(scope="module")
def t5x_scores(run):
    return t5x_infer(run["checkpoint"], str(run["root"] / "t5x_score"), "--gin.infer.mode='score'", F32)


@pytest.fixture(scope="module")
def t5x_greedy(run):
    return t5x_infer(run["checkpoint"], str(run["root"] / "t5x_greedy"), GREEDY, F32)


# ------------------------------------------------------------------------------- tests


def test_checkout_is_what_t5x_imports(run):
    """The T5X runs import this checkout's olmax (not an installed copy) and train its network."""
    probe = "import olmax, olmax_tasks, olmax.network; print('OLMAX_AT', olmax.__file__, olmax_tasks.__file__)"
    out = run_checked([sys.executable, "-c", probe], env())
    tasks_init = os.path.join(REPO, "olmax", "tasks", "__init__.py")  # olmax_tasks is olmax.tasks, from the checkout
    assert f"OLMAX_AT {os.path.join(REPO, 'olmax', '__init__.py')} {tasks_init}" in out, out[-2000:]
    info = open(os.path.join(run["model_dir"], "model-info.txt")).read()
    assert "Variable decoder/layers/mixer_1/mixer/wq_recall" in info and "Total number of parameters: 1743008" in info


def test_t5x_scores_equal_olmax_infer_scores(run, t5x_scores):
    ours = olmax_infer(run["checkpoint"], str(run["root"] / "olmax_score"), "score")
    assert len(t5x_scores) == len(ours) == t5x_interop_tasks.NUM_EXAMPLES
    assert np.all(scores(t5x_scores) < -10)  # a real log-likelihood of ~35 target bytes, not a stub
    np.testing.assert_allclose(scores(ours), scores(t5x_scores), rtol=1e-4)


def test_t5x_greedy_and_one_beam_equal_olmax_greedy(run):
    t5x_greedy = t5x_infer(run["checkpoint"], str(run["root"] / "t5x_greedy32"), GREEDY, F32, COMPUTE32)
    beam = t5x_infer(run["checkpoint"], str(run["root"] / "t5x_beam"), BEAM, F32, COMPUTE32)
    ours = olmax_infer(run["checkpoint"], str(run["root"] / "olmax_greedy"), "predict", "--gin.infer.infer.greedy=True",
                       COMPUTE32)
    # One beam follows the greedy path; T5X's beam search also keeps the hypothesis that
    # ends with EOS where EOS was the runner-up token, and prefers a finished hypothesis to
    # an unfinished one: its output is the greedy prediction or a prefix of it.
    pairs = [(b["prediction"], g["prediction"]) for b, g in zip(beam, t5x_greedy)]
    assert all(g.startswith(b) for b, g in pairs), pairs
    assert sum(b == g for b, g in pairs) >= 1, pairs
    for theirs, mine in zip(t5x_greedy, ours):
        t, o = theirs["prediction"], mine["prediction"]
        # T5X stops at its max_decode_length (the example's length), olmax.infer at the
        # model's max_length: the shorter greedy continuation is a prefix of the longer.
        assert t and (o.startswith(t) or t.startswith(o)), (t, o)
    # Real continuations, not stubs: a decode loop that stops after one token, or returns one
    # constant, fails both. (Rows of a model trained 4 steps end wherever EOS comes first, so
    # their mean length is not a property: it was 7.9 bytes on one machine, 9 on another.)
    predictions = [g["prediction"] for g in t5x_greedy]
    assert max(map(len, predictions)) >= 8 and len(set(predictions)) > 1, predictions


def test_t5x_eval_metrics_match_predictions_and_scores(run, t5x_greedy, t5x_scores):
    out = str(run["root"] / "t5x_eval")
    t5x(
        "eval", f"--gin_file={T5X_GIN}", "--gin_file=t5x/configs/runs/eval.gin",
        f"--gin.CHECKPOINT_PATH='{run['checkpoint']}'", f"--gin.EVAL_OUTPUT_DIR='{out}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", "--gin.MIXTURE_OR_TASK_MODULE='t5x_interop_tasks'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.utils.DatasetConfig.batch_size=8", GREEDY, F32,
    )
    (metrics,) = jsonl(os.path.join(out, "inference_eval", f"{TASK}-metrics.jsonl"))
    targets = [r["inputs"]["targets_pretokenized"] for r in t5x_greedy]
    predictions = [r["prediction"] for r in t5x_greedy]
    assert metrics["step"] == 4
    assert metrics["exact_match"] == t5x_interop_tasks.exact_match(targets, predictions)["exact_match"]
    assert metrics["char_match"] == pytest.approx(t5x_interop_tasks.char_match(targets, predictions)["char_match"])
    assert metrics["log_likelihood"] == pytest.approx(np.mean(scores(t5x_scores)), rel=1e-4)


def test_olmax_eval_reads_the_t5x_checkpoint(run, t5x_scores):
    out = str(run["root"] / "olmax_eval")
    log = olmax(
        "eval", f"--gin_file={MODEL_GIN}", "--gin.network.OlmaxConfig.dtype='bfloat16'",
        f"--gin.CHECKPOINT_PATH='{run['model_dir']}'", f"--gin.EVAL_OUTPUT_DIR='{out}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", "--gin.MIXTURE_OR_TASK_MODULE='t5x_interop_tasks'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.utils.DatasetConfig.split='test'", "--gin.BATCH_SIZE=8",
    )
    (record,) = jsonl(os.path.join(out, "metrics.jsonl"))
    assert record["checkpoint"] == run["checkpoint"], log[-2000:]
    # Token-weighted cross-entropy over the targets = -(sum of T5X's sequence scores) / tokens.
    expected = -np.sum(scores(t5x_scores)) / record["tokens"]
    assert record["cross_entropy"] == pytest.approx(expected, rel=1e-4)
    assert record[f"{TASK}/log_likelihood"] == pytest.approx(np.mean(scores(t5x_scores)), rel=1e-4)


def test_t5x_resumes_with_two_way_model_parallelism(run, t5x_scores):
    """Resume 4 -> 6 steps on 4 CPU devices (data 2 x model 2); then score and sample with T5X's
    defaults (bfloat16-restored parameters) on the same mesh."""
    model_dir = str(run["root"] / "resumed")
    shutil.copytree(run["model_dir"], model_dir)
    partitions = "--gin.partitioning.PjitPartitioner.num_partitions=2"
    log = t5x_train(model_dir, 6, partitions, devices=4)
    assert "Training: step 4" in log and os.path.isdir(os.path.join(model_dir, "checkpoint_6"))
    info = open(os.path.join(model_dir, "model-info.txt")).read()
    assert "conv_0/conv/wi" in info and "partition spec (None, None, None, 'model')" in info
    bf16 = t5x_infer(run["checkpoint"], str(run["root"] / "t5x_score_bf16"), "--gin.infer.mode='score'", partitions,
                     devices=4)
    # bfloat16 parameters: close to the float32 scores, not equal.
    np.testing.assert_allclose(scores(bf16), scores(t5x_scores), rtol=3e-2)
    # temperature_sample as the gin file binds it (0.8, top-k 40), on the same mesh.
    sampled = t5x_infer(run["checkpoint"], str(run["root"] / "t5x_sampled_bf16"), partitions, devices=4)
    assert len(sampled) == t5x_interop_tasks.NUM_EXAMPLES and sum(len(r["prediction"]) for r in sampled) > 50
