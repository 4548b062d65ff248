"""T5X's binaries and Olmax's, run from the checkout, for tests/test_t5x_interop*.py.

T5X's run when OLMAX_T5X_DIR names a T5X source tree (.ci/run sets it to ../shared/peers/t5x
when that exists; `t5x-run` beside it is used when present, else `python
$OLMAX_T5X_DIR/t5x/<binary>.py`); `require_t5x()` skips the calling test module with the
reason otherwise. The subprocesses get the checkout (and tests/, for the prefix-LM task of
t5x_interop_tasks.py) first on PYTHONPATH, as a T5X user running from a checkout has it.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fast_compile import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
TASK = "olmax_next_line"  # t5x_interop_tasks.TASK (that module imports tensorflow)
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


COMPILE_CACHE: dict = {}  # set by the test modules from conftest.binaries_compile_cache


def require_t5x() -> None:
    """Skips the calling test module (at its import) unless OLMAX_T5X_DIR names a T5X source tree."""
    if not T5X_DIR or not os.path.isfile(os.path.join(T5X_DIR, "t5x", "train.py")):
        pytest.skip(
            f"T5X source not found (OLMAX_T5X_DIR={T5X_DIR!r}); set OLMAX_T5X_DIR to a T5X checkout "
            "(one with t5x/train.py) to run upstream T5X's binaries on Olmax.",
            allow_module_level=True,
        )


def env(devices: int = 1) -> dict:
    """The subprocesses' environment: the checkout and tests/ first on PYTHONPATH, `devices` CPU devices,
    COMPILE_CACHE's JAX compilation cache."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([REPO, TESTS] + [p for p in [out.get("PYTHONPATH")] if p])
    out["PYTHON"] = sys.executable  # for t5x-run
    out["XLA_FLAGS"] = xla_flags(devices)
    out.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out.update(COMPILE_CACHE)
    return out


def runner() -> str | None:
    """`t5x-run` beside OLMAX_T5X_DIR, if there is one."""
    path = os.path.join(os.path.dirname(os.path.abspath(T5X_DIR)), "t5x-run")
    return path if os.path.isfile(path) else None


def t5x_env(devices: int = 1) -> dict:
    """The environment of `python $OLMAX_T5X_DIR/t5x/<binary>.py`: T5X (and t5x-run's import stubs) on the path."""
    out = env(devices)
    stubs = os.path.join(os.path.dirname(os.path.abspath(T5X_DIR)), "stubs")
    out["PYTHONPATH"] = os.pathsep.join([T5X_DIR] + ([stubs] if os.path.isdir(stubs) else []) + [out["PYTHONPATH"]])
    return out


def t5x(binary: str, *flags: str, devices: int = 1) -> str:
    """Runs T5X's `binary` (train, eval, infer) from the checkout; returns its log."""
    flags = (f"--gin_search_paths={T5X_DIR},olmax", *flags)  # gin/t5x/... is under olmax/ of the checkout
    if runner():
        return run_checked([runner(), binary, *flags], env(devices))
    return run_checked([sys.executable, os.path.join(T5X_DIR, "t5x", f"{binary}.py"), *flags], t5x_env(devices))


def olmax(binary: str, *flags: str) -> str:
    """Runs `python -m olmax.<binary>` from the checkout; returns its log."""
    return run_checked([sys.executable, "-m", f"olmax.{binary}", *flags], env())


def run_checked(cmd: list[str], environment: dict) -> str:
    """Runs `cmd` in the checkout; returns its log (stdout + stderr) and fails the test if it fails."""
    proc = subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-6000:]}"
    return log


def t5x_train(model_dir: str, steps: int, *flags: str, gin_file: str = T5X_GIN, length: int = 128,
              devices: int = 1) -> str:
    """T5X's train.py on olmax_stdlib (batch 4, seed 0); returns its log."""
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
    return jsonl(path)


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
    return jsonl(path)


def jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def scores(rows: list[dict]) -> np.ndarray:
    """The `score` of each row (T5X's and olmax.infer's score mode)."""
    return np.array([row["score"] for row in rows])
