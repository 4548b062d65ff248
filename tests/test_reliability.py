"""Reliability: preemption, exact resume after a crash, non-finite steps, corrupt checkpoints, bad input."""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from olmax import checkpoints, mixers, models, network, optim, partitioning, trainer, utils
from fast_compile import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--gin_file=gin/quickstart.gin",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
    "--gin.BATCH_SIZE=2",
    "--gin.train.train.stats_period=1",
    "--gin.train.train.eval_period=0",
    "--gin.utils.SaveCheckpointConfig.period=4",
    "--gin.utils.SaveCheckpointConfig.keep=None",
    "--gin.optim.create_optimizer.warmup_steps=2",
    "--gin.network.OlmaxConfig.depth=2",
    "--gin.network.OlmaxConfig.features=32",
    "--gin.network.OlmaxConfig.conv_features=32",
    "--gin.train.train.peak_flops=1e11",  # MFU's reference given: no 3 s matmul measurement at each start
]
ENV = dict(os.environ, XLA_FLAGS=xla_flags(), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(binaries_compile_cache):
    """The binaries started here share compiled programs (conftest.binaries_compile_cache)."""
    ENV.update(binaries_compile_cache)


def start(model_dir, steps, *extra):
    return subprocess.Popen([sys.executable, "-m", "olmax.train", *TINY, f"--gin.MODEL_DIR={model_dir}",
                             f"--gin.TRAIN_STEPS={steps}", *extra], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_line(proc, needle, timeout=240):
    """Reads the child's output until `needle` appears; returns what was read."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)[-3000:]}")


def saved_params(model_dir, step):
    path = os.path.join(model_dir, str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


def assert_bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("straight"))
    code, out = finish(start(model_dir, 12))
    assert code == 0, out[-3000:]
    return model_dir


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    """Preempted (SIGTERM) at step 5, killed (SIGKILL) at a random later step, resumed:
    the final parameters equal, bit for bit, those of a run never interrupted."""
    model_dir = str(tmp_path / "interrupted")
    proc = start(model_dir, 12)
    wait_for_line(proc, "step 5/12")
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0 and "SIGTERM" in out, out[-3000:]
    stopped = max(int(d) for d in os.listdir(model_dir) if d.isdigit())
    assert 5 <= stopped < 12  # saved where SIGTERM arrived, off the save period

    kill_at = random.Random(os.getpid()).randint(min(stopped + 1, 11), 11)
    proc = start(model_dir, 12)
    out = wait_for_line(proc, f"step {kill_at}/12")
    assert f"Restored step {stopped}" in out
    proc.kill()
    proc.wait()
    # Saves are async: only finalized step directories count (orbax renames a
    # `<step>.orbax-checkpoint-tmp` directory into place when it is complete).
    complete = max(int(d) for d in os.listdir(model_dir) if d.isdigit())
    code, out = finish(start(model_dir, 12))
    assert code == 0 and f"Restored step {complete}" in out, out[-3000:]
    assert_bitwise_equal(saved_params(model_dir, 12), saved_params(uninterrupted, 12))


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    model_dir = str(tmp_path / "corrupt")
    shutil.copytree(uninterrupted, model_dir)
    for step in (12,):
        shutil.rmtree(os.path.join(model_dir, str(step)))  # as if never written
    # Truncate every data file of step 8 (the process died while writing them).
    for root, _, files in os.walk(os.path.join(model_dir, "8", "state")):
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as fh:
                    fh.truncate(16)
    code, out = finish(start(model_dir, 12))
    assert code == 0, out[-3000:]
    assert "could not be loaded" in out and "Restored step 4" in out
    assert os.path.isdir(os.path.join(model_dir, "8.corrupt"))  # kept, not deleted
    assert_bitwise_equal(saved_params(model_dir, 12), saved_params(uninterrupted, 12))


@pytest.mark.slow
def test_checkpoint_of_another_shape_is_refused(uninterrupted, tmp_path):
    model_dir = str(tmp_path / "other")
    shutil.copytree(uninterrupted, model_dir)
    code, out = finish(start(model_dir, 14, "--gin.network.OlmaxConfig.features=64"))
    assert code != 0
    assert "does not match the model" in out and "[2, 5, 32, 32] in the checkpoint and [2, 5, 64, 32] in the model" in out


@pytest.mark.slow
def test_checkpoint_of_another_block_size_is_refused(uninterrupted, tmp_path):
    """The recall mixer's parameters do not depend on K, so only the recorded config can tell a run
    restored with a longer max_length (K 16 -> 32 here) from the model it was trained as."""
    model_dir = str(tmp_path / "longer")
    shutil.copytree(uninterrupted, model_dir)
    code, out = finish(start(model_dir, 14, "--gin.network.OlmaxConfig.max_length=512"))
    assert code != 0
    assert "mixer block size K 16 -> 32 (max_length 256 -> 512" in out, out[-3000:]
    assert "network.OlmaxConfig.mixer_block = 16" in out


def test_function_changes_name_each_field_and_its_binding():
    saved = {k: str(v) for k, v in vars(network.OlmaxConfig(max_length=256)).items()}
    now = lambda **kw: {k: str(v) for k, v in vars(network.OlmaxConfig(**kw)).items()}  # noqa: E731
    assert checkpoints.function_changes(saved, now(max_length=256)) == []
    assert checkpoints.function_changes(saved, now(max_length=500)) == []  # same K (16)
    assert checkpoints.function_changes(saved, now(max_length=2048, mixer_block=16)) == []  # K kept
    assert checkpoints.function_changes(saved, now(max_length=256, recall_chunk=64, dtype="bfloat16")) == []
    (k,) = checkpoints.function_changes(saved, now(max_length=1024))
    assert k.startswith("mixer block size K 16 -> 64") and "mixer_block = 16" in k
    (act,) = checkpoints.function_changes(saved, now(max_length=256, activation="relu"))
    assert act == "activation gelu -> relu (network.OlmaxConfig.activation)"
    # Attention has no block: its max_length may change freely.
    att = {k: str(v) for k, v in vars(network.OlmaxConfig(max_length=256, mixer="attention")).items()}
    assert checkpoints.function_changes(att, dict(att, max_length="4096")) == []
    assert checkpoints.function_changes({}, now(max_length=256)) == []  # nothing recorded: nothing to compare


def test_checkpoints_before_the_forget_bound_restore_with_a_warning():
    """A recall checkpoint recorded before the decay's bound existed restores with a warning naming
    it; one with another bound is a change (refused); attention and config-less metas say nothing."""
    config = {k: str(v) for k, v in vars(network.OlmaxConfig(max_length=256)).items()}
    now = {"config": config, "recall_forget_bound": mixers.MAX_FORGET_RATE}
    assert checkpoints.forget_bound_change(dict(now), now) == (None, None)
    warning, change = checkpoints.forget_bound_change({"config": config}, now)
    assert change is None and "before the recall decay's forget rate was bounded (0.4 nats a token)" in warning
    warning, change = checkpoints.forget_bound_change(dict(now, recall_forget_bound=0.5), now)
    assert warning is None and change.startswith("recall decay's forget-rate bound 0.5 -> 0.4")
    attention = {"config": dict(config, mixer="attention"), "recall_forget_bound": mixers.MAX_FORGET_RATE}
    assert checkpoints.forget_bound_change({"config": attention["config"]}, attention) == (None, None)
    assert checkpoints.forget_bound_change({}, now) == (None, None)


@pytest.mark.slow
def test_repeated_nonfinite_steps_stop_the_run(tmp_path):
    code, out = finish(start(str(tmp_path / "nan"), 12, "--gin.optim.create_optimizer.learning_rate=1e30",
                             "--gin.optim.create_optimizer.clipping=None", "--gin.train.train.max_consecutive_nonfinite=3"))
    assert code != 0 and "consecutive steps had a non-finite loss" in out


CFG = network.OlmaxConfig(vocab_size=64, features=16, depth=2, max_length=16, conv_features=16, conv_kernel=3,
                          mixer_block=4, mixer_heads=2, num_heads=2)


def test_nonfinite_gradient_skips_the_step():
    model = models.DecoderOnlyLM(network.Olmax(CFG))
    partitioner = partitioning.PjitPartitioner(devices=jax.devices()[:1])
    setup = trainer.TrainSetup(model, partitioner, (2, 16), lambda axes: optim.create_optimizer(axes=axes, warmup_steps=1))
    state = setup.init_state()
    step = jax.jit(trainer.make_train_step(model, setup.tx, 1, 0, None))
    tokens = np.arange(34).reshape(2, 17) % 60 + 1
    good = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": np.ones((2, 16), np.float32)}
    bad = dict(good, decoder_loss_weights=good["decoder_loss_weights"].copy())
    bad["decoder_loss_weights"][0, 3] = np.nan  # one poisoned weight: NaN loss and gradients
    before = jax.device_get(state)
    after, metrics = step(state, bad)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(after)
    assert int(after["step"]) == int(before["step"]) + 1  # the batch is consumed
    assert_bitwise_equal(after["params"], before["params"])
    assert_bitwise_equal(after["opt_state"], before["opt_state"])
    after2, metrics = step(jax.device_put(after), good)
    assert float(metrics["skipped"]) == 0.0
    # A finite step does update the optimizer state (the first step's learning rate is 0 in warmup).
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(after2)["opt_state"], before["opt_state"])
    assert any(jax.tree.leaves(changed))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="exceeds the model's max_length=16"):
        utils.check_lengths(utils.DatasetConfig("olmax_stdlib", {"targets": 17}, batch_size=2), CFG.max_length)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        utils.get_dataset(utils.DatasetConfig("olmax_stdlib", {"targets": 8}, batch_size=12), data_parallel_size=8)
    with pytest.raises(ValueError, match="olmax_stdlib"):  # unknown names list the registered ones
        utils.get_dataset(utils.DatasetConfig("olmax_stdlb", {"targets": 8}, batch_size=2))
    import olmax_tasks

    olmax_tasks.register_text_files_task("missing_files_task", train_patterns=["/nonexistent/dir/*.txt"])
    with pytest.raises(FileNotFoundError, match="/nonexistent/dir/\\*.txt"):
        ds = utils.get_dataset(utils.DatasetConfig("missing_files_task", {"targets": 8}, batch_size=2))
        next(iter(ds))


def test_empty_split_is_reported(tmp_path):
    import olmax_tasks

    (tmp_path / "a.txt").write_text("tiny")
    olmax_tasks.register_text_files_task("tiny_task", train_patterns=[str(tmp_path / "a.txt")],
                                         validation_patterns=[str(tmp_path / "a.txt")])
    model = models.DecoderOnlyLM(network.Olmax(CFG))
    partitioner = partitioning.PjitPartitioner(devices=jax.devices()[:1])
    params = trainer.TrainSetup(model, partitioner, (64, 16)).init_state()["params"]
    with pytest.raises(ValueError, match="empty or smaller than one batch"):
        trainer.evaluate(params, utils.DatasetConfig("tiny_task", {"targets": 16}, split="validation", batch_size=64),
                         partitioner, None, trainer.make_steps(trainer.TrainSetup(model, partitioner, (64, 16))).eval)


def test_nothing_unpickles():
    """No code path loads pickles (checkpoints are tensorstore + JSON; data is tf.data)."""
    import re

    loader = re.compile(r"import (cloud)?pickle|from (cloud)?pickle|pickle\.loads?\(|allow_pickle=True|import dill|torch\.load")
    for package in ("olmax", "olmax_tasks", "launch", "benchmarks"):
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(root, f)).read()
                    assert not loader.search(text), os.path.join(root, f)


# What used to lose work (issue 13): each reproduced through the binary.

BROKEN_VALIDATION = '''
"""Train documents that never run out; validation data that breaks at its third document."""
import seqio
import tensorflow as tf

from olmax import tasks


def _dataset(split, shuffle_files=False, seed=None):
    if split == "train":
        return tf.data.Dataset.from_tensor_slices({"text": [f"training document {i}" for i in range(64)]})

    def broken():
        yield {"text": "first validation document"}
        yield {"text": "second validation document"}
        raise ValueError("broken validation data")

    return tf.data.Dataset.from_generator(broken, output_signature={"text": tf.TensorSpec((), tf.string)})


tasks.add_lm_task("olmax_broken_validation", seqio.FunctionDataSource(_dataset, splits=("train", "validation")),
                  tasks.byte_vocabulary())
'''


@pytest.mark.slow
def test_a_validation_split_smaller_than_a_batch_is_found_before_step_1(tmp_path):
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    (tmp_path / "val.txt").write_text("tiny")
    code, out = finish(start(str(tmp_path / "run"), 20, "--gin.MIXTURE_OR_TASK_NAME=text_files",
                             f"--gin.olmax_tasks.text_files.train_patterns={tmp_path / 'train.txt'}",
                             f"--gin.olmax_tasks.text_files.validation_patterns={tmp_path / 'val.txt'}",
                             "--gin.train.train.eval_period=10", "--gin.BATCH_SIZE=4"))
    assert code != 0
    assert "'validation' split of text_files gives no full batch" in out and "validation_patterns" in out
    assert "eval_period=0" in out and "step 1/20" not in out  # found before any step ran


@pytest.mark.slow
def test_a_failing_eval_keeps_the_checkpoint_of_its_step(tmp_path):
    module = tmp_path / "broken_tasks.py"
    module.write_text(BROKEN_VALIDATION)
    model_dir = tmp_path / "run"
    code, out = finish(start(str(model_dir), 8, f"--gin.MIXTURE_OR_TASK_MODULE={module}",
                             "--gin.MIXTURE_OR_TASK_NAME=olmax_broken_validation", "--gin.train.train.eval_period=4",
                             "--gin.train.train.eval_steps=3", "--gin.train_eval/utils.DatasetConfig.pack=False"))
    assert code != 0 and "broken validation data" in out and "step 4/8" in out
    assert os.path.isdir(model_dir / "4")  # saved before the eval that failed


def ctrl_c_at_step_3(model_dir):
    """A 500-step run that gets SIGINT (what Ctrl-C sends) once step 3 is logged."""
    proc = start(model_dir, 500)
    wait_for_line(proc, "step 3/500")
    proc.send_signal(signal.SIGINT)
    return proc


@pytest.mark.slow
def test_first_ctrl_c_saves_and_exits_like_sigterm(tmp_path):
    model_dir = str(tmp_path / "interrupted")
    code, out = finish(ctrl_c_at_step_3(model_dir))
    assert code == 0, out[-3000:]
    assert "Ctrl-C: finishing this step" in out and "KeyboardInterrupt" not in out
    stopped = int(re.search(r"Saved step (\d+) after Ctrl-C", out).group(1))
    assert 3 <= stopped < 500 and os.path.isdir(os.path.join(model_dir, str(stopped))), out[-3000:]


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(tmp_path):
    proc = ctrl_c_at_step_3(str(tmp_path / "aborted"))
    wait_for_line(proc, "press Ctrl-C again")
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc)
    assert code == 130 and "Saved step" not in out, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]  # was 54 lines of it
    last = out.strip().splitlines()[-1]
    # The second press may land while the first press's save is being written: that save completes.
    assert re.fullmatch(r"olmax\.train: stopped at step \d+ (without saving|after its save had started) "
                        r"\(second Ctrl-C\); (the last checkpoint is "
                        r"step \d+|no checkpoint was saved)\. Rerun the same command to resume from it\.", last), last


PRESSES = """
import os, signal
from olmax import trainer
with trainer.Preemption() as p:
    os.kill(os.getpid(), signal.SIGINT)
    assert p.requested and not p.aborted
    p.stop_if_aborted()
    os.kill(os.getpid(), signal.SIGINT)  # the handler itself must not raise (native code may be polling)
    assert p.aborted
    try:
        p.stop_if_aborted()
        raise SystemExit(3)
    except KeyboardInterrupt as e:
        print("raised:", e, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    print("still running", flush=True)
"""


def test_ctrl_c_presses_save_then_stop_then_exit_without_raising_in_the_handler():
    """First: a save is requested; second: stop_if_aborted raises, the handler does not;
    third: the process exits at once with status 130."""
    proc = subprocess.run([sys.executable, "-c", PRESSES], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["raised: second Ctrl-C"], proc.stdout
    assert "Third Ctrl-C: exiting now" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_each_start_keeps_its_config_and_a_changed_schedule_is_reported(tmp_path):
    model_dir = tmp_path / "run"
    code, out = finish(start(str(model_dir), 4))
    assert code == 0, out[-3000:]
    code, out = finish(start(str(model_dir), 8))
    assert code == 0 and "Restored step 4" in out, out[-3000:]
    assert "Resuming at step 4 with another schedule" in out and "TRAIN_STEPS 4 -> 8" in out
    assert "TRAIN_STEPS = 4" in (model_dir / "config_start_0.gin").read_text()
    assert "TRAIN_STEPS = 8" in (model_dir / "config_start_4.gin").read_text()
    assert (model_dir / "config.gin").read_text() == (model_dir / "config_start_4.gin").read_text()
    code, out = finish(start(str(model_dir), 8))  # same schedule again: nothing to report
    assert code == 0 and "another schedule" not in out


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for config and events, not for a checkpoint of the quickstart model."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a full disk needs a small tmpfs, which only root can mount here")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_once_with_one_message(small_disk):
    model_dir = small_disk / "run"
    proc = subprocess.Popen([sys.executable, "-m", "olmax.train", "--gin_file=gin/quickstart.gin",
                             f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=400",
                             "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=2",
                             "--gin.train.train.eval_period=0", "--gin.train.train.stats_period=1",
                             "--gin.utils.SaveCheckpointConfig.period=3", "--gin.train.train.peak_flops=1e11"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    code, out = finish(proc)
    assert code != 0
    steps = [int(s) for s in re.findall(r"step (\d+)/400", out)]
    assert steps and max(steps) <= 9  # stopped at the next save or two, not after 400 steps
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
    (message,) = [line for line in out.splitlines() if line.startswith("olmax.train: ")]
    assert "Saving a checkpoint" in message and "the disk is full" in message and "rerun the same command" in message
    assert not [d for d in os.listdir(model_dir) if d.isdigit()]  # the half-written save is never a checkpoint


@pytest.mark.slow
def test_a_second_trainer_in_one_model_dir_is_refused_and_kill_9_does_not_block_the_resume(tmp_path):
    """Issue 23: two trainers started into one MODEL_DIR both ran to the end, the second's
    checkpoints replacing the first's. Now the second stops with one line naming the first;
    after the first is killed with SIGKILL the next run takes its lease over and resumes."""
    model_dir = str(tmp_path / "run")
    first = start(model_dir, 100000, "--gin.utils.SaveCheckpointConfig.period=20",
                  "--gin.utils.SaveCheckpointConfig.keep=2", "--gin.train.train.stats_period=20")
    try:
        wait_for_line(first, "step 20/100000")
        code, out = finish(start(model_dir, 40, "--gin.RANDOM_SEED=1"))
        assert code == 1 and "Traceback" not in out, out[-3000:]
        assert out.strip().splitlines()[-1].startswith(
            f"olmax.train: error: MODEL_DIR {model_dir} is in use by another trainer (")
        assert f"pid {first.pid}, started " in out and "take over with --force" in out
        assert first.poll() is None  # the first trainer goes on
    finally:
        first.kill()
        first.wait()
    saved = max(int(d) for d in os.listdir(model_dir) if d.isdigit())
    code, out = finish(start(model_dir, saved + 2))
    assert code == 0, out[-3000:]
    assert f"(its process {first.pid} is gone)" in out and f"Restored step {saved}" in out
    # One console line per logged step: CLU's long copy of every metric goes to TensorBoard only.
    assert out.count(f"step {saved + 2}/{saved + 2}") == 1 and "logging_writer" not in out, out[-3000:]
    assert not os.path.exists(os.path.join(model_dir, "lease.json"))  # released at the end


@pytest.mark.slow
def test_a_resume_past_train_steps_records_nothing(uninterrupted, tmp_path):
    """Issue 23: 'nothing to train' used to write config_start_<step>.gin and log a schedule change,
    so the next resume reported a change that never trained a step."""
    model_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, model_dir)
    before = sorted(os.listdir(model_dir))
    code, out = finish(start(str(model_dir), 4))
    assert code == 0 and "already holds step 12 >= TRAIN_STEPS=4: nothing to train" in out, out[-3000:]
    assert "another schedule" not in out
    assert sorted(os.listdir(model_dir)) == before  # no config_start_12.gin, no new events, no lease left


@pytest.mark.slow
def test_a_missing_checkpoint_path_leaves_no_model_dir(tmp_path):
    code, out = finish(start(str(tmp_path / "run"), 4, f"--gin.CHECKPOINT_PATH={tmp_path / 'nope'}"))
    assert code == 1 and "Traceback" not in out
    assert out.strip().splitlines()[-1] == (
        f"olmax.train: error: CHECKPOINT_PATH='{tmp_path / 'nope'}' does not exist; point it at a MODEL_DIR or a "
        "MODEL_DIR/<step> with a checkpoint, or leave it unset to start from scratch.")
    assert not os.path.exists(tmp_path / "run")
