"""End to end through the binaries, as a user runs them (subprocesses, tiny config, embedded corpus)."""
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fast_compile import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
    "--gin.BATCH_SIZE=4",
    "--gin.train.train.stats_period=10",
    "--gin.train.train.eval_period=20",
    "--gin.train.train.eval_steps=2",
    "--gin.utils.SaveCheckpointConfig.period=10",
    "--gin.optim.create_optimizer.warmup_steps=5",
]


CACHE = {}  # the binaries started here share compiled programs (conftest.binaries_compile_cache)


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(binaries_compile_cache):
    CACHE.update(binaries_compile_cache)


def run(module, *args, cwd=REPO, env=None, check=True):
    environment = dict(os.environ, XLA_FLAGS=xla_flags(), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", **CACHE,
                       **(env or {}))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("run") / "model")
    proc = run("olmax.train", "--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=20",
               "--gin.train.profile_steps=(3, 2)", *SMALL)
    return model_dir, proc


@pytest.mark.slow
def test_train_writes_checkpoints_events_and_config(trained):
    model_dir, proc = trained
    assert sorted(int(d) for d in os.listdir(model_dir) if d.isdigit()) == [10, 20]
    assert glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(model_dir, "training_eval", "events.out.tfevents.*"))
    assert "TASK_FEATURE_LENGTHS" in open(os.path.join(model_dir, "config.gin")).read()
    assert "step 20/20" in proc.stderr and "tokens/s" in proc.stderr and "MFU" in proc.stderr
    assert glob.glob(os.path.join(model_dir, "profile", "**", "*.xplane.pb"), recursive=True)  # TensorBoard trace


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(trained):
    model_dir, _ = trained
    proc = run("olmax.train", "--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=30", *SMALL,
               "--gin.train.train.peak_flops=1e11")  # the first run measured MFU's reference; no need again
    assert "Restored step 20" in proc.stderr
    assert "step 30/30" in proc.stderr and "step 10/30" not in proc.stderr
    assert 30 in [int(d) for d in os.listdir(model_dir) if d.isdigit()]


@pytest.mark.slow
def test_eval_and_infer(trained):
    model_dir, _ = trained
    out = os.path.join(model_dir, "eval_out")
    run("olmax.eval", "--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR={model_dir}", f"--gin.EVAL_OUTPUT_DIR={out}",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.BATCH_SIZE=4", "--gin.evaluate.eval_steps=3",
        "--gin.utils.RestoreCheckpointConfig.mode=all")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    saved = sorted(int(d) for d in os.listdir(model_dir) if d.isdigit())
    assert [r["step"] for r in records] == saved  # every checkpoint, in order
    assert all(0 < r["bits_per_byte"] < 9 and 0 < r["accuracy"] < 1 for r in records)
    assert glob.glob(os.path.join(out, "eval", "events.out.tfevents.*"))

    infer_dir = os.path.join(model_dir, "infer_out")
    run("olmax.infer", "--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR={model_dir}", f"--gin.INFER_OUTPUT_DIR={infer_dir}",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.infer.max_examples=3",
        "--gin.infer.infer.max_decode_length=8", "--gin.infer.infer.prompt_length=16")
    (path,) = glob.glob(os.path.join(infer_dir, "*predict*.jsonl"))
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 3 and all({"inputs", "prediction", "targets"} <= set(r) for r in rows)

    # Score a prefix-LM task (inputs + targets): each row names its inputs and targets apart.
    score_dir = os.path.join(model_dir, "score_out")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    run("olmax.infer", "--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR={model_dir}", f"--gin.INFER_OUTPUT_DIR={score_dir}",
        "--gin.INFER_MODE='score'", "--gin.MIXTURE_OR_TASK_NAME='olmax_next_line'",
        "--gin.MIXTURE_OR_TASK_MODULE='t5x_interop_tasks'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 48}",
        "--gin.infer.max_examples=3", env={"PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])})
    (path,) = glob.glob(os.path.join(score_dir, "*score*.jsonl"))
    rows = [json.loads(line) for line in open(path)]
    sys.path.insert(0, tests_dir)
    import t5x_interop_tasks

    pairs = t5x_interop_tasks.line_pairs()[:3]
    assert [(r["inputs"], r["targets"]) for r in rows] == [(a, b) for a, b in pairs]
    # Finite log-likelihoods of a model 20 steps from its start: between 1 and 20 nats per target byte.
    assert all(-20 * len(b) < r["score"] < -len(b) for r, (_, b) in zip(rows, pairs))

    proc = run("olmax.infer", "--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
               "--gin.infer.infer.max_decode_length=16", "--prompt", "import os")
    printed = proc.stdout.strip().splitlines()
    assert printed and printed[0].startswith("import os") and len(proc.stdout.strip()) > len("import os")


@pytest.mark.slow
def test_user_task_module_with_text_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"doc{i}.txt").write_text(f"Document {i}. " + "the quick brown fox jumps over the lazy dog. " * 40)
    module = tmp_path / "my_tasks.py"
    module.write_text(textwrap.dedent(f"""
        import olmax_tasks
        olmax_tasks.register_text_files_task("my_fox_task", train_patterns=[{str(data / '*.txt')!r}],
                                             validation_patterns=[{str(data / 'doc0.txt')!r}])
    """))
    # Run from the user's directory, not the checkout: gin files come from the package,
    # and a relative MODEL_DIR is relative to the working directory.
    proc = run("olmax.train", "--gin_file=gin/quickstart.gin", "--gin.MODEL_DIR=runs/fox", "--gin.TRAIN_STEPS=10",
               "--gin.MIXTURE_OR_TASK_MODULE=my_tasks.py", "--gin.MIXTURE_OR_TASK_NAME=my_fox_task", *SMALL,
               "--gin.train.train.peak_flops=1e11", cwd=tmp_path)
    assert "step 10/10" in proc.stderr
    assert os.path.isdir(tmp_path / "runs" / "fox" / "10")


@pytest.mark.slow
def test_bad_input_errors_from_the_command_line(tmp_path):
    proc = run("olmax.train", "--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR={tmp_path}", "--gin.MIXTURE_OR_TASK_NAME=no_such_task",
               check=False)
    assert proc.returncode != 0 and "no_such_task" in proc.stderr and "olmax_stdlib" in proc.stderr
    typo = tmp_path / "typo.gin"
    typo.write_text("include 'gin/quickstart.gin'\n\ntrain.train.totl_steps = 5\n")
    proc = run("olmax.train", f"--gin_file={typo}", check=False)
    assert proc.returncode != 0 and str(typo) in proc.stderr and "line 3" in proc.stderr
