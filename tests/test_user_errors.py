"""Bad input and damaged files, as a user meets them (issue 13): each ends in one message
naming the setting or the file and the fix, never a traceback, and nothing is silently skipped."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from olmax import checkpoints, gin_utils, optim, utils, validation
from fast_compile import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS=xla_flags(), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(binaries_compile_cache):
    """The binaries started here share compiled programs (conftest.binaries_compile_cache)."""
    ENV.update(binaries_compile_cache)
TINY_MODEL = ["--gin_file=gin/quickstart.gin", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=2",
              "--gin.network.OlmaxConfig.depth=2", "--gin.network.OlmaxConfig.features=32",
              "--gin.network.OlmaxConfig.conv_features=32"]


def run(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def assert_one_line_error(proc, binary, message):
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last_line(proc) == f"{binary}: error: {message}"


# ------------------------------------------------------------------ values, where they enter

def test_integers_reject_strings_floats_and_bools_naming_the_setting():
    with pytest.raises(ValueError, match=r"^BATCH_SIZE \(b\) = 'four' is not a whole number; set an integer >= 1, "
                                         r"e.g. --gin.BATCH_SIZE=16.$"):
        validation.integer("four", "b", minimum=1, macro="BATCH_SIZE")
    with pytest.raises(ValueError, match=r"= 10.0 is not a whole number \(a float.*e.g. --gin.TRAIN_STEPS=10.$"):
        validation.integer(1e1, "t", minimum=1, macro="TRAIN_STEPS")
    with pytest.raises(ValueError, match="True is not a whole number"):
        validation.integer(True, "t")
    with pytest.raises(ValueError, match=r"-5 must be >= 1"):
        validation.integer(-5, "t", minimum=1)
    assert validation.integer(7, "t", minimum=1) == 7 and validation.integer(None, "t", allow_none=True) is None


def test_numbers_reject_strings_and_non_finite_values():
    lr = "optim.create_optimizer.learning_rate"
    with pytest.raises(ValueError, match=r"= 'nan' is not a number; set a finite number > 0"):
        optim.create_optimizer(learning_rate="nan")
    with pytest.raises(ValueError, match=r"= nan is not finite"):
        optim.create_optimizer(learning_rate=math.nan)
    with pytest.raises(ValueError, match=rf"^{lr} = 0 is out of range; set a finite number > 0"):
        optim.create_optimizer(learning_rate=0)
    with pytest.raises(ValueError, match=r"TRAIN_STEPS \(optim.create_optimizer.total_steps\) = 10.0"):
        optim.create_optimizer(total_steps=10.0)
    with pytest.raises(ValueError, match=r"infer.infer.top_p = 1.5 is out of range; set a finite number > 0 and <= 1"):
        validation.check_infer_args(num_samples=1, max_examples=None, prompt_length=8, max_decode_length=8,
                                    temperature=1.0, top_k=0, top_p=1.5)
    with pytest.raises(ValueError, match=r"^--num_samples=0: give at least 1"):
        validation.check_infer_args(num_samples=0, max_examples=None, prompt_length=8, max_decode_length=8,
                                    temperature=1.0, top_k=0, top_p=1.0)


def test_configs_check_their_fields():
    with pytest.raises(ValueError, match=r"BATCH_SIZE \(utils.DatasetConfig.batch_size\) = 'four'"):
        utils.DatasetConfig("olmax_stdlib", {"targets": 8}, batch_size="four")
    with pytest.raises(ValueError, match=r"TASK_FEATURE_LENGTHS.* = 256 is not a mapping of feature lengths"):
        utils.DatasetConfig("olmax_stdlib", 256, batch_size=2)
    with pytest.raises(ValueError, match=r"task_feature_lengths\['targets'\] = 0 must be >= 1"):
        utils.DatasetConfig("olmax_stdlib", {"targets": 0}, batch_size=2)
    with pytest.raises(ValueError, match=r"utils.SaveCheckpointConfig.period = 0 must be >= 1"):
        utils.SaveCheckpointConfig(period=0)
    with pytest.raises(ValueError, match=r"utils.RestoreCheckpointConfig.mode = 'newest' is not one of"):
        utils.RestoreCheckpointConfig(mode="newest")


def test_model_dir_that_is_a_file_or_cannot_be_written(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"^MODEL_DIR = '.*/f' is a file, not a directory; choose another MODEL_DIR.$"):
        validation.prepare_model_dir(str(tmp_path / "f"))
    with pytest.raises(ValueError, match=r"cannot be written \(.*\); choose a directory you can write to.$"):
        validation.prepare_model_dir(str(tmp_path / "f" / "sub"))  # under a file
    assert validation.prepare_model_dir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
    assert os.listdir(tmp_path / "new" / "run") == []  # the write probe is removed
    assert validation.prepare_model_dir("gs://bucket/run") == "gs://bucket/run"  # left to the storage layer


# ------------------------------------------------------------------ gin files

def test_unclosed_bracket_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'gin/quickstart.gin'\n\ntrain.train.eval_steps = (3\n")
    outer = tmp_path / "outer.gin"
    outer.write_text(f"include '{bad}'\n")
    for given in (bad, outer):
        with pytest.raises(gin_utils.GinConfigError) as e:
            gin_utils.parse([str(given)], [])
        assert str(e.value) == (f"Gin configuration error in {bad}, line 3: '(' is never closed "
                                "(gin reads to the end of the file looking for it).")
    bad.write_text("train.train.eval_steps = (3\nTRAIN_STEPS = 5\n")  # gin's own parser stops at line 2
    with pytest.raises(gin_utils.GinConfigError) as e:
        gin_utils.parse([str(bad)], [])
    assert str(e.value) == f"Gin configuration error in {bad}, line 2: Expected ',' or ')'. (at 'TRAIN_STEPS = 5')"


def test_only_olmax_own_errors_lose_their_traceback():
    def ours():
        raise ValueError("BATCH_SIZE is wrong\n  In call to configurable 'train' (<function train>)")

    try:
        ours()
    except ValueError as e:
        assert not gin_utils.raised_by_olmax(e)  # raised in this test file: not Olmax's code
        assert gin_utils.user_message(e) == "BATCH_SIZE is wrong"
    with pytest.raises(ValueError) as e:
        validation.integer("x", "n")
    assert gin_utils.raised_by_olmax(e.value)
    with pytest.raises(ValueError) as e:
        json.loads("{")  # a library's error keeps its traceback
    assert not gin_utils.raised_by_olmax(e.value)


# ------------------------------------------------------------------ the binaries

TRAIN = ["--gin_file=gin/quickstart.gin", "--gin.TRAIN_STEPS=2", "--gin.optim.create_optimizer.warmup_steps=1"]


@pytest.mark.slow
@pytest.mark.parametrize("flag, message", [
    ("--gin.BATCH_SIZE=four", "BATCH_SIZE (utils.DatasetConfig.batch_size) = 'four' is not a whole number; "
                              "set an integer >= 1, e.g. --gin.BATCH_SIZE=16."),
    ("--gin.TRAIN_STEPS=1e1", "TRAIN_STEPS (train.train.total_steps) = 10.0 is not a whole number (a float: "
                              "1e1-style numbers are floats in Gin); set an integer >= 1, e.g. --gin.TRAIN_STEPS=10."),
    ("--gin.optim.create_optimizer.learning_rate=nan", "optim.create_optimizer.learning_rate = 'nan' is not a number; "
     "set a finite number > 0, e.g. --gin.optim.create_optimizer.learning_rate=1e-3."),
    ("--gin.TRAIN_STEPS=-5", "TRAIN_STEPS (train.train.total_steps) = -5 must be >= 1; e.g. --gin.TRAIN_STEPS=1000."),
])
def test_train_rejects_mistyped_numbers_in_one_line(tmp_path, flag, message):
    proc = run("olmax.train", *TRAIN, f"--gin.MODEL_DIR={tmp_path / 'run'}",
               "--gin.optim.create_optimizer.schedule=constant", flag)
    assert_one_line_error(proc, "olmax.train", message)
    assert not os.path.exists(tmp_path / "run")  # stopped before anything was written


@pytest.mark.slow
def test_train_model_dir_errors_name_the_path(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run("olmax.train", *TRAIN, f"--gin.MODEL_DIR={tmp_path / 'file'}")
    assert_one_line_error(proc, "olmax.train", f"MODEL_DIR = '{tmp_path / 'file'}' is a file, not a directory; "
                                               "choose another MODEL_DIR.")
    if os.access("/sys", os.W_OK) or not os.path.isdir("/sys"):
        return  # a read-only directory is needed below; /sys is one on Linux, even for root
    proc = run("olmax.train", *TRAIN, "--gin.MODEL_DIR=/sys/olmax_run")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("olmax.train: error: MODEL_DIR = '/sys/olmax_run' cannot be written (")


@pytest.mark.slow
def test_gin_file_with_an_unclosed_bracket(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'gin/quickstart.gin'\ntrain.train.eval_steps = (3\n")
    proc = run("olmax.train", f"--gin_file={bad}")
    assert_one_line_error(proc, "olmax.train", f"Gin configuration error in {bad}, line 2: '(' is never closed "
                                               "(gin reads to the end of the file looking for it).")


@pytest.mark.slow
def test_infer_num_samples_zero_is_an_error():
    proc = run("olmax.infer", "--gin_file=gin/quickstart.gin", "--prompt", "def ", "--num_samples", "0")
    assert_one_line_error(proc, "olmax.infer", "--num_samples=0: give at least 1 (how many continuations of --prompt "
                                               "to print), e.g. --num_samples 3.")


# ------------------------------------------------------------------ damaged checkpoints in eval / infer

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 4 and 8."""
    model_dir = str(tmp_path_factory.mktemp("trained") / "run")
    proc = run("olmax.train", *TINY_MODEL, f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=8",
               "--gin.train.train.stats_period=4", "--gin.train.train.eval_period=0",
               "--gin.utils.SaveCheckpointConfig.period=4", "--gin.utils.SaveCheckpointConfig.keep=None",
               "--gin.optim.create_optimizer.warmup_steps=2", "--gin.train.train.peak_flops=1e11")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model_dir


def damaged_copy(model_dir, dest, steps, what="data"):
    """Copies a run and truncates the array data (or the JSON metadata) of `steps`, or (what="random")
    overwrites the middle half of each array data file with random bytes."""
    shutil.copytree(model_dir, dest)
    for step in steps:
        for root, _, files in os.walk(os.path.join(dest, str(step), "state")):
            for f in files:
                path = os.path.join(root, f)
                is_data = os.sep + "d" + os.sep in path
                if what == "random" and is_data:
                    size = os.path.getsize(path)
                    with open(path, "r+b") as fh:
                        fh.seek(size // 4)
                        fh.write(os.urandom(size // 2))
                elif what != "random" and (is_data if what == "data" else f == "_METADATA"):
                    with open(path, "r+b") as fh:
                        fh.truncate(16)
    return str(dest)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["data", "metadata", "random"])
def test_eval_and_infer_fall_back_from_an_unreadable_checkpoint(trained, tmp_path, what):
    model_dir = damaged_copy(trained, tmp_path / "run", [8], what)
    proc = run("olmax.eval", *TINY_MODEL, f"--gin.MODEL_DIR={model_dir}", "--gin.eval.evaluate.eval_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Checkpoint {model_dir}/8 is unreadable (could not be loaded: " in proc.stderr
    assert "trying step 4." in proc.stderr and "Traceback" not in proc.stderr
    assert "Exception ignored" not in proc.stderr  # issue 23: 134 lines of coroutine reports with random bytes
    (record,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert record["step"] == 4 and record["checkpoint"] == f"{model_dir}/4"
    assert os.path.isdir(os.path.join(model_dir, "8"))  # eval and infer never move a user's files
    if what != "data":  # infer restores through the same fallback as eval: once is enough
        return

    proc = run("olmax.infer", *TINY_MODEL, f"--gin.MODEL_DIR={model_dir}", "--gin.infer.infer.max_decode_length=4",
               "--prompt", "def ")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Checkpoint {model_dir}/8 is unreadable" in proc.stderr and "trying step 4." in proc.stderr
    assert proc.stdout.startswith("def ")


@pytest.mark.slow
def test_eval_and_infer_with_no_readable_checkpoint_left(trained, tmp_path):
    model_dir = damaged_copy(trained, tmp_path / "run", [4, 8])
    for mode in ("latest", "all"):
        proc = run("olmax.eval", *TINY_MODEL, f"--gin.MODEL_DIR={model_dir}", "--gin.eval.evaluate.eval_steps=1",
                   f"--gin.utils.RestoreCheckpointConfig.mode='{mode}'")
        assert f"Checkpoint {model_dir}/8 is unreadable" in proc.stderr
        assert f"Checkpoint {model_dir}/4 is unreadable" in proc.stderr
        if mode == "latest":
            assert "trying step 4." in proc.stderr and "no earlier checkpoint is left." in proc.stderr
            assert_one_line_error(proc, "olmax.eval", f"No readable checkpoint left in {model_dir}: steps 8, 4 could "
                                  "not be loaded (see the warnings above). Point CHECKPOINT_PATH at a MODEL_DIR with "
                                  "an intact checkpoint.")
        else:
            assert_one_line_error(proc, "olmax.eval", f"None of the checkpoints in {model_dir} is readable (see the "
                                  "warnings above); nothing was evaluated.")
        assert not os.path.exists(os.path.join(model_dir, "eval"))  # nothing left behind

    proc = run("olmax.infer", *TINY_MODEL, f"--gin.MODEL_DIR={model_dir}", "--prompt", "def ")
    assert_one_line_error(proc, "olmax.infer", f"No readable checkpoint left in {model_dir}: steps 8, 4 could not be "
                          "loaded (see the warnings above). Point CHECKPOINT_PATH at a MODEL_DIR with an intact "
                          "checkpoint.")
    assert proc.stdout == ""


def test_closed_event_loop_echo_is_dropped_and_nothing_else(monkeypatch):
    import threading
    import types

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(a[1]))
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(args.exc_value))
    checkpoints.hide_closed_event_loop_reports()
    echo, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
    for value in (echo, other):
        report = types.SimpleNamespace(exc_type=RuntimeError, exc_value=value)
        sys.excepthook(RuntimeError, value, None)
        threading.excepthook(report)
        sys.unraisablehook(report)
    assert seen == [other, other, other]


def test_unraisable_reports_of_abandoned_coroutines_are_dropped(monkeypatch):
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(args.object))
    checkpoints._quiet_abandoned_tasks()

    async def sibling_read():
        return None

    coroutine, other = sibling_read(), object()
    for obj in (coroutine, other):
        sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("x"), object=obj))
    coroutine.close()
    assert seen == [other]


def test_unset_required_values_are_named():
    import gin

    # (%gin.REQUIRED macros reach the configs as gin.REQUIRED; a Python caller passing it gets Gin's own error.)
    with pytest.raises(ValueError, match=r"^MIXTURE_OR_TASK_NAME \(utils.DatasetConfig.mixture_or_task_name\) is "
                                         r"required but not set; set it in a gin file or with "
                                         r"--gin.MIXTURE_OR_TASK_NAME=olmax_stdlib.$"):
        validation.required(gin.REQUIRED, "utils.DatasetConfig.mixture_or_task_name", macro="MIXTURE_OR_TASK_NAME",
                            example="olmax_stdlib")
    with pytest.raises(ValueError, match=r"^TASK_FEATURE_LENGTHS .* is required but not set"):
        validation.feature_lengths(gin.REQUIRED)
    with pytest.raises(ValueError, match=r"^MODEL_DIR is required but not set; .* --gin.MODEL_DIR=runs/my_run.$"):
        validation.prepare_model_dir(gin.REQUIRED)


def test_unprepared_tfds_dataset_is_named(tmp_path):
    from olmax_tasks import tfds_tasks, vocab

    tfds_tasks.register_tfds_text_task("test_unprepared_lm1b", "lm1b:1.1.0", vocab.byte_vocabulary(),
                                       tfds_tasks.LM1B_SPLITS, tfds_data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"^Task 'test_unprepared_lm1b' reads the TFDS dataset lm1b:1.1.0, "
                                                r"which is not prepared .* \(`tfds build lm1b --data_dir=DIR`\)"):
        utils.get_dataset(utils.DatasetConfig("test_unprepared_lm1b", {"targets": 8}, batch_size=2))
    # olmax.train meets it before it creates MODEL_DIR or initializes the model.
    from olmax import models, network, train

    model = models.DecoderOnlyLM(network.Olmax(network.OlmaxConfig(vocab_size=384, features=32, depth=1, max_length=8)))
    model_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"^Task 'test_unprepared_lm1b' reads the TFDS dataset lm1b:1.1.0"):
        train.train(model=model, model_dir=str(model_dir), total_steps=1,
                    train_dataset_cfg=utils.DatasetConfig("test_unprepared_lm1b", {"targets": 8}, batch_size=8))
    assert not model_dir.exists()


@pytest.mark.slow
def test_undefined_and_unset_macros_are_named(tmp_path):
    gin_file = tmp_path / "macro.gin"
    gin_file.write_text("include 'gin/quickstart.gin'\nTRAIN_STEPS = %NOPE\n")
    proc = run("olmax.train", f"--gin_file={gin_file}")
    assert_one_line_error(proc, "olmax.train", "Gin macro %NOPE is used but never set; set it in a gin file "
                                               "(NOPE = ...) or with --gin.NOPE=VALUE.")
    proc = run("olmax.train", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin")  # no macros set
    assert_one_line_error(proc, "olmax.train", "MIXTURE_OR_TASK_NAME (utils.DatasetConfig.mixture_or_task_name) is "
                          "required but not set; set it in a gin file or with --gin.MIXTURE_OR_TASK_NAME=olmax_stdlib.")


def test_report_errors_prints_one_line_only_for_olmax_messages(capsys, monkeypatch):
    def bad_value(argv):
        validation.integer("four", "utils.DatasetConfig.batch_size", minimum=1, macro="BATCH_SIZE")

    monkeypatch.delenv("OLMAX_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        gin_utils._report_errors(bad_value, "olmax.train", [])
    assert e.value.code == 1
    assert capsys.readouterr().err == ("olmax.train: error: BATCH_SIZE (utils.DatasetConfig.batch_size) = 'four' is "
                                       "not a whole number; set an integer >= 1, e.g. --gin.BATCH_SIZE=16.\n")
    with pytest.raises(json.JSONDecodeError):  # a library's error is not ours to summarize
        gin_utils._report_errors(lambda argv: json.loads("{"), "olmax.train", [])
    monkeypatch.setenv("OLMAX_TRACEBACK", "1")
    with pytest.raises(ValueError, match="four"):
        gin_utils._report_errors(bad_value, "olmax.train", [])


# ------------------------------------------------------------------ issue 23: no ignored flags, no silent hang

@pytest.mark.slow
def test_a_mistyped_macro_stops_the_run(tmp_path):
    proc = run("olmax.train", *TRAIN, f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.TRAIN_STEP=10")
    assert_one_line_error(proc, "olmax.train", "Gin configuration error: macro TRAIN_STEP (set in --gin.TRAIN_STEP) "
                                               "is read by no binding; did you mean TRAIN_STEPS?")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_a_model_that_cannot_fit_is_refused_before_it_is_built(tmp_path):
    proc = run("olmax.train", *TRAIN, f"--gin.MODEL_DIR={tmp_path / 'run'}",
               "--gin.network.OlmaxConfig.features=200000", "--gin.network.OlmaxConfig.depth=64", timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(r"olmax\.train: error: The model cannot fit: its parameters and optimizer state alone need "
                        r"[\d,.]+ GiB per device \(10,27\d,\d{3},\d{3},\d{3} parameters, mesh .*\) but a cpu device "
                        r"has [\d,.]+ GiB\. .*`python -m olmax\.plan .*` shows what fits\.", last_line(proc))
    assert not os.path.exists(tmp_path / "run")


def test_feature_lengths_without_targets_are_named():
    """Issue 23: a 35-line KeyError traceback."""
    with pytest.raises(ValueError, match=r"^TASK_FEATURE_LENGTHS \(utils.DatasetConfig.task_feature_lengths\) = "
                                         r"\{'inputs': 32\} has no 'targets' length, which every task needs; set e.g. "
                                         r"--gin.TASK_FEATURE_LENGTHS=\"\{'targets': 256\}\""):
        utils.DatasetConfig("olmax_stdlib", {"inputs": 32}, batch_size=2)


def test_output_dirs_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("")
    fix = "set --gin.EVAL_OUTPUT_DIR to a directory"
    with pytest.raises(ValueError, match=rf"^EVAL_OUTPUT_DIR = '.*/file' is a file, not a directory; {fix}.$"):
        validation.check_output_dir(str(tmp_path / "file"), "EVAL_OUTPUT_DIR", fix)
    with pytest.raises(ValueError, match=r"^EVAL_OUTPUT_DIR = '.*/file/eval' cannot be created: .*/file is a file"):
        validation.check_output_dir(str(tmp_path / "file" / "eval"), "EVAL_OUTPUT_DIR", fix)
    assert validation.check_output_dir(str(tmp_path / "a" / "b"), "EVAL_OUTPUT_DIR", fix) == str(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()  # checked, not created


@pytest.fixture
def read_only(tmp_path):
    """A read-only view (bind mount) of a directory; root cannot write there either."""
    source, view = tmp_path / "source", tmp_path / "read_only"
    source.mkdir()
    view.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a read-only directory for root needs a read-only bind mount, which only root can make")
    for args in (["--bind", str(source), str(view)], ["-o", "remount,bind,ro", str(view)]):
        proc = subprocess.run(["mount", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            subprocess.run(["umount", str(view)], capture_output=True)
            pytest.skip(f"cannot make a read-only bind mount here: {proc.stderr.strip()}")
    yield source, view
    subprocess.run(["umount", str(view)], check=True)


@pytest.mark.slow
def test_eval_of_a_read_only_model_dir_or_into_a_file(trained, tmp_path, read_only):
    """Issue 23: an OSError traceback (read-only MODEL_DIR), a FileExistsError one (EVAL_OUTPUT_DIR a file)."""
    source, view = read_only
    shutil.copytree(trained, source / "run")
    model_dir = view / "run"
    proc = run("olmax.eval", *TINY_MODEL, f"--gin.MODEL_DIR={model_dir}", "--gin.eval.evaluate.eval_steps=1")
    assert_one_line_error(proc, "olmax.eval", f"EVAL_OUTPUT_DIR (unset: <checkpoint directory>/eval) = "
                          f"'{model_dir}/eval' cannot be written (no write permission or a read-only filesystem: "
                          f"{model_dir}); set --gin.EVAL_OUTPUT_DIR to a directory you can write to.")
    (tmp_path / "file").write_text("")
    proc = run("olmax.eval", *TINY_MODEL, f"--gin.MODEL_DIR={model_dir}", f"--gin.EVAL_OUTPUT_DIR={tmp_path / 'file'}")
    assert_one_line_error(proc, "olmax.eval", f"EVAL_OUTPUT_DIR = '{tmp_path / 'file'}' is a file, not a directory; "
                                              "set --gin.EVAL_OUTPUT_DIR to a directory.")


@pytest.mark.slow
def test_a_step_asked_for_by_name_is_read_or_the_binary_fails(trained, tmp_path):
    """Issue 23: CHECKPOINT_PATH=<run>/8 with step 8 unreadable evaluated step 4 and exited 0."""
    model_dir = damaged_copy(trained, tmp_path / "run", [8])
    proc = run("olmax.eval", *TINY_MODEL, f"--gin.CHECKPOINT_PATH={model_dir}/8", "--gin.eval.evaluate.eval_steps=1")
    assert f"Checkpoint {model_dir}/8 is unreadable" in proc.stderr
    assert "no other step is tried: CHECKPOINT_PATH asks for this one." in proc.stderr
    assert_one_line_error(proc, "olmax.eval", f"No readable checkpoint left in {model_dir}: step 8 could not be loaded "
                          "(see the warnings above). Point CHECKPOINT_PATH at a MODEL_DIR with an intact checkpoint.")
    assert '"step": 4' not in proc.stdout


@pytest.mark.slow
def test_infer_prompt_that_is_not_utf8_and_a_missing_model_dir_named_as_such(tmp_path):
    """Issue 23: a UnicodeEncodeError traceback; a MODEL_DIR called CHECKPOINT_PATH."""
    proc = subprocess.run([sys.executable, "-m", "olmax.infer", *TINY_MODEL, f"--gin.MODEL_DIR={tmp_path}",
                           "--prompt", b"caf\xe9 \xff"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "olmax.infer", "--prompt is not UTF-8 text (a byte that is not UTF-8 at character 3); "
                                               "give the prompt in UTF-8, e.g. convert it with iconv -t utf-8.")
    proc = run("olmax.infer", *TINY_MODEL, f"--gin.MODEL_DIR={tmp_path / 'nope'}", "--prompt", "def ")
    assert_one_line_error(proc, "olmax.infer", f"MODEL_DIR='{tmp_path / 'nope'}' does not exist; point it at a "
                                               "trained run's directory, or set CHECKPOINT_PATH.")


def test_echoes_of_a_failed_read_are_silenced_before_the_first_read(tmp_path, monkeypatch):
    """A failed read's siblings can be reported while the read is still raising (CI saw
    asyncio's "Task exception was never retrieved" traceback before the warning): the
    filter must be in place when the first read starts, not after it failed."""
    import asyncio

    monkeypatch.setattr(asyncio.log.logger, "filters", [])
    ckpt = checkpoints.Checkpointer(str(tmp_path), None, {})
    installed_at_read = []

    def failing_read(step, abstract_state, partial=False):
        installed_at_read.append(any(isinstance(f, checkpoints._AbandonedTasks) for f in asyncio.log.logger.filters))
        raise ValueError("OUT_OF_RANGE: truncated")

    monkeypatch.setattr(ckpt, "restore", failing_read)
    assert ckpt.restore_first_readable([8, 4], {}) is None
    assert installed_at_read == [True, True]
