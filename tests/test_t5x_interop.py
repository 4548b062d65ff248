"""Upstream T5X runs Olmax: T5X's own train.py, eval.py and infer.py in subprocesses.

Runs when OLMAX_T5X_DIR names a T5X source tree (.ci/run sets it to ../shared/peers/t5x
when that exists; `t5x-run` beside it is used when present, else `python
$OLMAX_T5X_DIR/t5x/<binary>.py`), and skips with the reason otherwise. The subprocesses
get the checkout (and tests/, for the prefix-LM task of t5x_interop_tasks.py) first on
PYTHONPATH, as a T5X user running from a checkout has it.

One T5X-trained checkpoint (4 steps, gin/t5x/olmax_decoder_only.gin as written:
reversible stack, bfloat16 compute) is shared by the tests, which check equivalences:
T5X's scores == olmax.infer's on it; T5X's greedy predictions == olmax.infer's (both
computing in float32); T5X's beam search with one beam follows its greedy path; T5X
eval's seqio metrics == the same metrics of those predictions and scores; olmax.eval
reads it; an Olmax-trained checkpoint exported with olmax.t5x_checkpoints scores the
same in T5X; T5X resumes it with 2-way model parallelism; the MoE model class adds the
MoE losses to T5X's loss.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
T5X_DIR = os.environ.get("OLMAX_T5X_DIR")
LENGTHS = "{'inputs': 48, 'targets': 48}"
F32 = "--gin.utils.RestoreCheckpointConfig.dtype='float32'"  # T5X's infer.gin restores bfloat16
# Greedy decoding compared across two programs (T5X's decode loop, olmax.decoding) computes in
# float32: in bfloat16 the two programs' logits differ in the last bits, and where two tokens'
# logits are that close (often, in a model trained 4 steps) the argmax flips between them.
COMPUTE32 = "--gin.network.OlmaxConfig.dtype='float32'"
GREEDY = "--gin.decoding.temperature_sample.temperature=0.0"
BEAM = "--gin.models.DecoderOnlyModel.decode_fn=@decoding.beam_search"
T5X_GIN = "gin/t5x/olmax_decoder_only.gin"  # relative to the checkout, where every command runs
T5X_MOE_GIN = "gin/t5x/olmax_moe.gin"
MODEL_GIN = "gin/models/tiny.gin"  # Olmax's model file of the same network

if not T5X_DIR or not os.path.isfile(os.path.join(T5X_DIR, "t5x", "train.py")):
    pytest.skip(
        f"T5X source not found (OLMAX_T5X_DIR={T5X_DIR!r}); set OLMAX_T5X_DIR to a T5X checkout "
        "(one with t5x/train.py) to run upstream T5X's binaries on Olmax.",
        allow_module_level=True,
    )

import t5x_interop_tasks  # noqa: E402  (after the skip: it imports tensorflow)

TASK = t5x_interop_tasks.TASK


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHON"] = sys.executable  # for t5x-run
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _runner() -> str | None:
    runner = os.path.join(os.path.dirname(os.path.abspath(T5X_DIR)), "t5x-run")
    return runner if os.path.isfile(runner) else None


def _t5x_env(devices: int = 1) -> dict:
    """The environment of `python $OLMAX_T5X_DIR/t5x/<binary>.py`: T5X (and t5x-run's import stubs) on the path."""
    env = _env(devices)
    stubs = os.path.join(os.path.dirname(os.path.abspath(T5X_DIR)), "stubs")
    env["PYTHONPATH"] = os.pathsep.join([T5X_DIR] + ([stubs] if os.path.isdir(stubs) else []) + [env["PYTHONPATH"]])
    return env


def t5x(binary: str, *flags: str, devices: int = 1) -> str:
    """Runs T5X's `binary` (train, eval, infer) from the checkout; returns its log."""
    flags = (f"--gin_search_paths={T5X_DIR},olmax", *flags)  # gin/t5x/... is under olmax/ of the checkout
    if _runner():
        return _run([_runner(), binary, *flags], _env(devices))
    return _run([sys.executable, os.path.join(T5X_DIR, "t5x", f"{binary}.py"), *flags], _t5x_env(devices))


def olmax(binary: str, *flags: str) -> str:
    """Runs `python -m olmax.<binary>` from the checkout; returns its log."""
    return _run([sys.executable, "-m", f"olmax.{binary}", *flags], _env())


def _run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-6000:]}"
    return log


def t5x_train(model_dir: str, steps: int, *flags: str, gin_file: str = T5X_GIN, length: int = 128,
              devices: int = 1) -> str:
    return t5x(
        "train", f"--gin_file={gin_file}", "--gin_file=t5x/configs/runs/pretrain.gin",
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='olmax_stdlib'",
        "--gin.MIXTURE_OR_TASK_MODULE='olmax_tasks'", f"--gin.TASK_FEATURE_LENGTHS={{'targets': {length}}}",
        f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=4", "--gin.USE_CACHED_TASKS=False",
        "--gin.RANDOM_SEED=0", *flags, devices=devices,  # pretrain.gin seeds from the clock: a failure would not rerun
    )


def t5x_infer(checkpoint: str, output_dir: str, *flags: str, devices: int = 1) -> list[dict]:
    """T5X's infer.py on the prefix-LM task; returns its jsonl rows."""
    t5x(
        "infer", f"--gin_file={T5X_GIN}", "--gin_file=t5x/configs/runs/infer.gin",
        f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.INFER_OUTPUT_DIR='{output_dir}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", "--gin.MIXTURE_OR_TASK_MODULE='t5x_interop_tasks'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.utils.DatasetConfig.batch_size=8", *flags, devices=devices,
    )
    (path,) = glob.glob(os.path.join(output_dir, f"{TASK}-*.jsonl-00000-of-00001"))
    return _jsonl(path)


def olmax_infer(checkpoint: str, output_dir: str, mode: str, *flags: str) -> list[dict]:
    """olmax.infer on the same task, with the network config of gin/t5x/olmax_decoder_only.gin
    (bfloat16 compute unless `flags` bind another dtype)."""
    olmax(
        "infer", f"--gin_file={MODEL_GIN}", "--gin.network.OlmaxConfig.dtype='bfloat16'",
        f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.INFER_OUTPUT_DIR='{output_dir}'", f"--gin.INFER_MODE='{mode}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", "--gin.MIXTURE_OR_TASK_MODULE='t5x_interop_tasks'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.utils.DatasetConfig.split='test'", *flags,
    )
    (path,) = glob.glob(os.path.join(output_dir, f"{TASK}-{mode}-*.jsonl"))
    return _jsonl(path)


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _scores(rows: list[dict]) -> np.ndarray:
    return np.array([row["score"] for row in rows])


# ---------------------------------------------------------------------------- fixtures


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
    out = _run([sys.executable, "-c", probe], _env())
    tasks_init = os.path.join(REPO, "olmax", "tasks", "__init__.py")  # olmax_tasks is olmax.tasks, from the checkout
    assert f"OLMAX_AT {os.path.join(REPO, 'olmax', '__init__.py')} {tasks_init}" in out, out[-2000:]
    info = open(os.path.join(run["model_dir"], "model-info.txt")).read()
    assert "Variable decoder/layers/mixer_1/mixer/wq_recall" in info and "Total number of parameters: 1743008" in info


def test_t5x_scores_equal_olmax_infer_scores(run, t5x_scores):
    ours = olmax_infer(run["checkpoint"], str(run["root"] / "olmax_score"), "score")
    assert len(t5x_scores) == len(ours) == t5x_interop_tasks.NUM_EXAMPLES
    assert np.all(_scores(t5x_scores) < -10)  # a real log-likelihood of ~35 target bytes, not a stub
    np.testing.assert_allclose(_scores(ours), _scores(t5x_scores), rtol=1e-4)


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
    (metrics,) = _jsonl(os.path.join(out, "inference_eval", f"{TASK}-metrics.jsonl"))
    targets = [r["inputs"]["targets_pretokenized"] for r in t5x_greedy]
    predictions = [r["prediction"] for r in t5x_greedy]
    assert metrics["step"] == 4
    assert metrics["exact_match"] == t5x_interop_tasks.exact_match(targets, predictions)["exact_match"]
    assert metrics["char_match"] == pytest.approx(t5x_interop_tasks.char_match(targets, predictions)["char_match"])
    assert metrics["log_likelihood"] == pytest.approx(np.mean(_scores(t5x_scores)), rel=1e-4)


def test_olmax_eval_reads_the_t5x_checkpoint(run, t5x_scores):
    out = str(run["root"] / "olmax_eval")
    log = olmax(
        "eval", f"--gin_file={MODEL_GIN}", "--gin.network.OlmaxConfig.dtype='bfloat16'",
        f"--gin.CHECKPOINT_PATH='{run['model_dir']}'", f"--gin.EVAL_OUTPUT_DIR='{out}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", "--gin.MIXTURE_OR_TASK_MODULE='t5x_interop_tasks'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.utils.DatasetConfig.split='test'", "--gin.BATCH_SIZE=8",
    )
    (record,) = _jsonl(os.path.join(out, "metrics.jsonl"))
    assert record["checkpoint"] == run["checkpoint"], log[-2000:]
    # Token-weighted cross-entropy over the targets = -(sum of T5X's sequence scores) / tokens.
    expected = -np.sum(_scores(t5x_scores)) / record["tokens"]
    assert record["cross_entropy"] == pytest.approx(expected, rel=1e-4)
    assert record[f"{TASK}/log_likelihood"] == pytest.approx(np.mean(_scores(t5x_scores)), rel=1e-4)


def test_olmax_checkpoint_scores_the_same_in_t5x(run):
    model_dir, exported = str(run["root"] / "olmax_model"), str(run["root"] / "exported")
    olmax(
        "train", f"--gin_file={MODEL_GIN}", "--gin.network.OlmaxConfig.dtype='bfloat16'",
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='olmax_stdlib'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4",
        "--gin.train.train.eval_steps=1", "--gin.optim.create_optimizer.warmup_steps=1",
    )
    out = olmax("t5x_checkpoints", f"--checkpoint={model_dir}/2", f"--output={exported}")
    assert os.path.join(exported, "checkpoint_2") in out
    theirs = t5x_infer(os.path.join(exported, "checkpoint_2"), str(run["root"] / "t5x_exported"),
                       "--gin.infer.mode='score'", F32)
    ours = olmax_infer(os.path.join(model_dir, "2"), str(run["root"] / "olmax_own"), "score")
    np.testing.assert_allclose(_scores(theirs), _scores(ours), rtol=1e-4)


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
    np.testing.assert_allclose(_scores(bf16), _scores(t5x_scores), rtol=3e-2)
    # temperature_sample as the gin file binds it (0.8, top-k 40), on the same mesh.
    sampled = t5x_infer(run["checkpoint"], str(run["root"] / "t5x_sampled_bf16"), partitions, devices=4)
    assert len(sampled) == t5x_interop_tasks.NUM_EXAMPLES and sum(len(r["prediction"]) for r in sampled) > 50


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


def test_moe_model_class_adds_the_moe_losses(run):
    out = _run([sys.executable, "-c", MOE_CHECK], _t5x_env())
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
    log = t5x_train(str(run["root"] / "moe"), 2, gin_file=T5X_MOE_GIN, length=64)
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
    out = _run([sys.executable, "-c", BEAM_CHECK], _t5x_env())
    result = json.loads(out.split("BEAM_CHECK ", 1)[1].splitlines()[0])
    assert result["shape"] == [2, 3, 32] and result["one_beam_is_greedy"]
    assert len(result["checked"]) >= 2, result
    for beam_score, full_forward in result["checked"]:
        assert beam_score == pytest.approx(full_forward, rel=1e-4)
