"""Every gin file parses and binds; model files state their true parameter count."""
import glob
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from olmax import axes, eval as eval_lib, gin_utils, infer, models, network, optim, train  # noqa: F401
from olmax import tasks  # noqa: F401  (registers gin configurables)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACROS = ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'olmax_stdlib'", "TASK_FEATURE_LENGTHS = {'targets': 64}",
          "TRAIN_STEPS = 10"]


@gin.configurable
def probe(model=gin.REQUIRED):
    return model


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _parse(files, bindings=()):
    gin_utils.parse(list(files), list(bindings) + ["probe.model = %MODEL"], [REPO])


@pytest.mark.parametrize("model_file", sorted(glob.glob(os.path.join(REPO, "olmax/gin/models/*.gin"))))
def test_model_files_bind_and_state_their_size(model_file):
    _parse(["gin/runs/pretrain.gin", os.path.relpath(model_file, os.path.join(REPO, "olmax"))], MACROS)
    model = probe()
    assert isinstance(model, models.DecoderOnlyLM)
    shapes = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 16)}))
    count = models.param_count(shapes["params"])
    header = open(model_file).readline()
    stated = float(re.search(r"([\d.]+)M parameters", header).group(1))
    assert abs(count / 1e6 - stated) < 0.05, (header, count)
    # The run file's train() bindings are complete: only MODEL-dependent args left to gin.
    assert gin.query_parameter("train.train.total_steps") is not None


@pytest.mark.parametrize("run_file", ["runs/pretrain.gin", "runs/eval.gin", "runs/infer.gin"])
def test_run_files_bind_with_the_quickstart(run_file):
    gin_utils.parse(["gin/quickstart.gin"], ["probe.model = %MODEL"], [REPO], run_file=run_file)
    assert isinstance(probe(), models.DecoderOnlyLM)
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "olmax_stdlib"
    assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"targets": 256}


def test_gin_typo_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("from __gin__ import dynamic_registration\nfrom olmax import network\n\nnetwork.OlmaxConfig.featurs = 3\n")
    with pytest.raises(gin_utils.GinConfigError, match=r"(?s)bad\.gin.*line 4"):
        gin_utils.parse([str(bad)], [], [REPO])
    with pytest.raises(FileNotFoundError, match="nope.gin"):
        gin_utils.parse(["gin/nope.gin"], [], [REPO])


def test_unquoted_string_flags():
    args = gin_utils.rewrite_gin_args(["prog", "--gin.MODEL_DIR=runs/x", "--gin.TRAIN_STEPS=5", "--gin.X='a'",
                                       "--gin.M=@f()", "--gin.L=[1, 2]", "--gin_file=y.gin"])
    assert args == ["prog", "--gin_bindings=MODEL_DIR = 'runs/x'", "--gin_bindings=TRAIN_STEPS = 5",
                    "--gin_bindings=X = 'a'", "--gin_bindings=M = @f()", "--gin_bindings=L = [1, 2]", "--gin_file=y.gin"]


def test_t5x_file_references_exist_and_axes_drive_agc():
    """Without T5X (tests/test_t5x_interop.py runs its binaries when its source is there),
    check what can be: every Olmax name the gin/t5x files bind exists, and the AGC they
    configure gets the same axes as our trainer."""
    text = "".join(open(p).read() for p in glob.glob(os.path.join(REPO, "olmax/gin/t5x/*.gin")))
    modules = {"network": network, "optim": optim, "axes": axes, "tasks": tasks}
    for mod, name in re.findall(r"\b(network|optim|axes|tasks)\.(\w+)", text):
        assert hasattr(modules[mod], name), f"{mod}.{name}"
    cfg = network.OlmaxConfig(vocab_size=64, features=16, depth=2, max_length=16, conv_features=16, mixer_block=4,
                              mixer_heads=2, num_heads=2)
    specs = axes.param_axes(cfg)
    module = network.Olmax(cfg)
    variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32), enable_dropout=False)
    assert specs == axes.logical_axes(variables)
    params = variables["params"]
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    tx = optim.adaptive_grad_clip(0.05, axes=specs)
    clipped, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(clipped))
    assert isinstance(tx.init(params), optax.EmptyState)


def test_a_macro_nothing_reads_is_an_error_naming_the_nearest(tmp_path):
    """Issue 23: `--gin.TRAIN_STEP=10` (no S) bound a macro nobody reads and trained for 400 steps."""
    with pytest.raises(gin_utils.GinConfigError) as e:
        gin_utils.parse(["gin/quickstart.gin"], ["TRAIN_STEP = 10"], [REPO], run_file="runs/pretrain.gin")
    assert str(e.value) == ("Gin configuration error: macro TRAIN_STEP (set in --gin.TRAIN_STEP) is read by no "
                            "binding; did you mean TRAIN_STEPS?")
    mine = tmp_path / "mine.gin"
    mine.write_text("include 'gin/quickstart.gin'\nbatch_size = 8\nMY_UNUSED_SETTING = 3\n")
    gin.clear_config()
    with pytest.raises(gin_utils.GinConfigError) as e:
        gin_utils.parse([str(mine)], [], [REPO], run_file="runs/pretrain.gin")
    assert str(e.value) == (f"Gin configuration error: macro MY_UNUSED_SETTING (set in {mine}) is read by no binding; "
                            "no binding uses it: remove it or fix its name; macro batch_size (set in "
                            f"{mine}) is read by no binding; did you mean BATCH_SIZE?")


def test_macros_that_are_read_pass_even_when_another_binary_reads_them(tmp_path):
    mine = tmp_path / "mine.gin"
    # EVAL_OUTPUT_DIR is read by olmax.eval's run file only; MY_LR by a binding of this file.
    mine.write_text("include 'gin/quickstart.gin'\nEVAL_OUTPUT_DIR = '/tmp/e'\nMY_LR = 1e-3\n"
                    "optim.create_optimizer.learning_rate = %MY_LR\n")
    gin_utils.parse([str(mine)], ["BATCH_SIZE = 4"], [REPO], run_file="runs/pretrain.gin")
    assert gin.query_parameter("optim.create_optimizer.learning_rate") is not None
