"""The planner: AOT-compiled train step on 8 simulated devices, figures that add up, and the refusal."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from olmax import models, network, optim, partitioning, plan, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = network.OlmaxConfig(vocab_size=128, features=64, depth=2, max_length=64, conv_features=128, conv_kernel=3,
                          mixer_block=8, mixer_heads=4, num_heads=4)


def _optimizer(axes):
    return optim.create_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, axes=axes)


def _plan(mesh_shape, batch=8, length=64, **kw):
    partitioner = partitioning.PjitPartitioner(mesh_shape=mesh_shape)
    return plan.plan(models.DecoderOnlyLM(network.Olmax(CFG)), partitioner, batch, length, _optimizer, **kw)


@pytest.fixture(scope="module")
def sharded():
    assert jax.device_count() == 8
    return _plan({"data": 4, "model": 2}, device_memory_bytes=1 << 30)


def test_figures_are_positive_and_add_up(sharded):
    p = sharded
    assert p.devices == 8 and p.param_count > 0
    for name in ("param_bytes", "opt_state_bytes", "batch_bytes", "temp_bytes", "argument_bytes", "needed_bytes",
                 "model_flops_per_token", "hardware_flops_per_token", "step_seconds", "tokens_per_second"):
        assert getattr(p, name) > 0, name
    # The compiled step's arguments are exactly the sharded state and batch (+ the step counter).
    assert abs(p.argument_bytes - (p.param_bytes + p.opt_state_bytes + p.batch_bytes)) < 1024
    # Adam: two moments per parameter, laid out like the parameters.
    assert 2 * p.param_bytes <= p.opt_state_bytes < 2 * p.param_bytes + 1024
    assert p.needed_bytes >= p.argument_bytes + p.temp_bytes
    # The batch: 8 rows x 64 tokens x 5 int32 features, split over data=4.
    assert p.batch_bytes == 8 * 64 * 5 * 4 // 4
    # The reversible stack recomputes the layers' forward: more hardware than model FLOPs, MFU below utilization.
    assert p.hardware_flops_per_token > p.model_flops_per_token and 0 < p.expected_mfu < p.utilization
    assert p.step_seconds == pytest.approx(
        p.hardware_flops_per_token * p.tokens_per_step / p.devices / (p.peak_flops * p.utilization))


def test_parameter_bytes_follow_the_sharding(sharded):
    replicated = _plan({"data": 8, "model": 1})
    assert replicated.param_bytes == replicated.total_param_bytes == sharded.total_param_bytes
    # Leaf by leaf: a parameter split over `model` costs 1/2 per device, the rest (norm scales, ...) all of it.
    partitioner = partitioning.PjitPartitioner(mesh_shape={"data": 4, "model": 2})
    setup = trainer.TrainSetup(models.DecoderOnlyLM(network.Olmax(CFG)), partitioner, (8, 64))
    expected, split = 0, 0
    for shape, sharding in zip(jax.tree.leaves(setup.param_shapes), jax.tree.leaves(setup.param_shardings)):
        over_model = "model" in jax.tree.leaves(tuple(sharding.spec))
        split += over_model
        expected += shape.size * shape.dtype.itemsize // (2 if over_model else 1)
    assert split > 0 and sharded.param_bytes == expected
    assert sharded.total_param_bytes / 2 <= sharded.param_bytes < 0.6 * sharded.total_param_bytes
    assert sharded.opt_state_bytes < 0.6 * replicated.opt_state_bytes


def test_refuses_what_does_not_fit_and_says_what_to_change(sharded):
    plan.check_fits(sharded)  # 1 GiB is plenty
    with pytest.raises(plan.DoesNotFit) as e:
        plan.check_fits(sharded, 64 * 1024)
    msg = str(e.value)
    assert "needs" in msg and "per device" in msg and "but a device has 0.06 MiB" in msg
    assert "--mesh data=2,model=4" in msg and "microbatches" in msg and "reversible" in msg
    report = plan.report(sharded)
    assert "per device" in report and "optimizer state" in report and "expected MFU" in report


def test_parse_mesh():
    assert plan.parse_mesh("data=64,model=4") == {"data": 64, "model": 4}
    assert plan.parse_mesh("model=2") == {"data": 1, "model": 2}
    for bad in ("data=0", "pipe=2", "data=x", "data"):
        with pytest.raises(ValueError, match="expected data=D,model=M"):
            plan.parse_mesh(bad)


@pytest.mark.slow
def test_command_line_refusal_exit_code(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "olmax.plan", "--gin_file=gin/models/tiny.gin", "--mesh", "data=2,model=2",
                           "--batch_size", "4", "--length", "64", "--device_memory_gb", "0.001"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data=2, model=2 (4 devices)" in proc.stdout and "total needed" in proc.stdout
    assert "Does not fit" in proc.stderr and "--mesh data=1,model=4" in proc.stderr
    assert np.isfinite(float(proc.stdout.split("expected MFU")[1].split("%")[0]))
