"""The planner: AOT-compiled train step on 8 simulated devices, figures that add up, and the refusal."""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from olmax import models, network, optim, partitioning, plan, trainer
from fast_compile import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = network.OlmaxConfig(vocab_size=128, features=64, depth=2, max_length=64, conv_features=128, conv_kernel=3,
                          mixer_block=8, mixer_heads=4, num_heads=4)


def _optimizer(axes):
    return optim.create_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, axes=axes)


def _plan(mesh_shape, batch=8, length=64, cfg=CFG, **kw):
    partitioner = partitioning.PjitPartitioner(mesh_shape=mesh_shape)
    return plan.plan(models.DecoderOnlyLM(network.Olmax(cfg)), partitioner, batch, length, _optimizer, **kw)


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
    # No memory bandwidth given: compute-bound, XLA's FLOPs at `utilization` of peak.
    assert p.bound == "compute" and p.memory_seconds == 0
    analytic = p.hardware_flops_per_token * p.tokens_per_step / p.devices
    assert p.step_seconds == pytest.approx(max(p.compiled_flops, analytic) / (p.peak_flops * p.utilization))
    # XLA's FLOPs of the whole step (every layer, the recomputed forward) near the analytic count.
    assert 0.7 * analytic < p.compiled_flops < 1.5 * analytic and p.compiled_bytes > 0


def test_roofline_takes_the_slower_side(sharded):
    slow_memory = dataclasses.replace(sharded, memory_bandwidth=1e6)
    assert slow_memory.bound == "memory" and slow_memory.step_seconds == slow_memory.memory_seconds
    assert slow_memory.memory_seconds == pytest.approx(sharded.compiled_bytes / (1e6 * sharded.utilization))
    assert slow_memory.expected_mfu < sharded.expected_mfu
    fast_memory = dataclasses.replace(sharded, memory_bandwidth=1e30)
    assert fast_memory.bound == "compute" and fast_memory.step_seconds == sharded.step_seconds


def test_compiled_cost_counts_every_layer():
    """XLA counts a loop body once; compiled_cost's depth-1/depth-2 extrapolation equals the cost
    of the step with all its layers unrolled, and exceeds the scanned program's count."""
    cfg = dataclasses.replace(CFG, depth=3)
    partitioner = partitioning.PjitPartitioner(mesh_shape={"data": 1, "model": 1}, devices=jax.devices()[:1])
    model = models.DecoderOnlyLM(network.Olmax(cfg))
    flops, accessed = plan.compiled_cost(model, partitioner, 2, 64, _optimizer)
    unrolled = models.DecoderOnlyLM(network.Olmax(dataclasses.replace(cfg, scan_layers=False)))
    exact = plan.xla_cost(plan.compile_step(unrolled, partitioner, 2, 64, _optimizer, 1)[3])
    assert flops == pytest.approx(exact[0], rel=0.01) and accessed == pytest.approx(exact[1], rel=0.05)
    scanned = plan.xla_cost(plan.compile_step(model, partitioner, 2, 64, _optimizer, 1)[3])
    assert scanned[0] < 0.8 * flops


def test_collectives_per_step_count_every_loop_iteration():
    """A gradient summed over the batch-sharded rows in each step of a scan of 4 inside a scan
    of 3: one all-reduce as written, 12 per call."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    x = jax.ShapeDtypeStruct((8, 4, 16), np.float32, sharding=jax.sharding.NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((16, 16), np.float32, sharding=jax.sharding.NamedSharding(mesh, P()))

    def step(w, x):
        def outer(total, rows):
            def inner(total, row):
                return total + jnp.einsum("bi,bj->ij", row, row @ w), None
            return jax.lax.scan(inner, total, jnp.moveaxis(rows, 1, 0))[0], None
        return jax.lax.scan(outer, jnp.zeros((16, 16)), jnp.stack([x, x, x]))[0]

    text = jax.jit(step, out_shardings=jax.sharding.NamedSharding(mesh, P())).lower(w, x).compile().as_text()
    assert plan.collectives(text) == {"all-reduce": (1, 16 * 16 * 4)}
    assert plan.collectives(text, per_step=True) == {"all-reduce": (12, 12 * 16 * 16 * 4)}


def test_collectives_with_and_without_chunk_loops(sharded):
    """No row here is longer than a chunk: the scanned step's collectives, its layer loop counted
    by its trip count, move what the unrolled depth-1/depth-2 extrapolation moves. In chunks of
    16 positions the CPU program reduces the chunked weights' gradients once per chunk (more
    bytes per step), and the extrapolation, one chunk per row, is the unchunked step's. With
    reduce_chunk_grads_once those weights have one copy per data shard (layers.per_data_shard)
    and data parallel alone moves the same bytes per step chunked or not; with a `model` axis the
    chunks then add only tensor-parallel all-reduces of activations, for the conv chunks'
    overlapping positions (each chunk recomputes the 2 (kernel - 1) before it)."""
    moved = lambda ops: ops["all-reduce"][1]  # noqa: E731
    assert moved(sharded.collectives_per_step) == moved(sharded.collectives_unchunked) > 0
    assert sharded.collectives_per_step["all-gather"] == sharded.collectives["all-gather"]  # outside every loop
    chunks = dataclasses.replace(CFG, recall_chunk=16, conv_chunk=16)
    chunked = _plan({"data": 4, "model": 2}, cfg=chunks)
    assert moved(chunked.collectives_unchunked) == moved(sharded.collectives_unchunked)
    assert moved(chunked.collectives_per_step) > 1.4 * moved(sharded.collectives_per_step)
    report = plan.report(chunked)
    assert "collectives per step" in report and "each layer's once" in report

    once = dataclasses.replace(chunks, reduce_chunk_grads_once=True)  # one compile each below (no cost)
    data_only = _plan({"data": 8, "model": 1}, cfg=once, cost=False)
    data_only_unchunked = _plan({"data": 8, "model": 1}, cost=False)
    assert moved(data_only.collectives_per_step) == moved(data_only_unchunked.collectives_per_step) > 0
    tensor = _plan({"data": 4, "model": 2}, cfg=once, cost=False)
    assert moved(sharded.collectives_per_step) < moved(tensor.collectives_per_step)
    assert moved(tensor.collectives_per_step) < 1.2 * moved(sharded.collectives_per_step)


def test_a_mesh_that_cannot_split_a_parameter_is_named():
    partitioner = partitioning.PjitPartitioner(mesh_shape={"data": 1, "model": 3}, devices=jax.devices()[:3])
    with pytest.raises(ValueError, match=r"cannot split parameter decoder/.*'mlp' dimension, 128, is not divisible by 3"
                                         r"\. Use a model axis that divides 128 \(e\.g\. 2 or 4"):
        trainer.TrainSetup(models.DecoderOnlyLM(network.Olmax(CFG)), partitioner, (3, 64))


def test_parameter_bytes_follow_the_sharding(sharded):
    replicated = _plan({"data": 8, "model": 1}, cost=False)
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
    env = dict(os.environ, XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "olmax.plan", "--gin_file=gin/models/tiny.gin", "--mesh", "data=2,model=2",
                           "--batch_size", "4", "--length", "64", "--device_memory_gb", "0.001"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data=2, model=2 (4 devices)" in proc.stdout and "total needed" in proc.stdout
    assert "Does not fit" in proc.stderr and "--mesh data=1,model=4" in proc.stderr
    assert np.isfinite(float(proc.stdout.split("expected MFU")[1].split("%")[0]))


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "data=100000"], "asks for 100,000 simulated devices; the planner simulates at most 8,192"),
    (["--device_memory_gb=-1"], "--device_memory_gb=-1.0 must be positive"),
])
def test_command_line_errors_before_any_device(flags, message):
    env = dict(os.environ, XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "olmax.plan", "--gin_file=gin/models/tiny.gin", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_recall_widths_on_tpu_tiles():
    """F = r (r + 1) / 2 = 136 at 16 recall features spills past one 128-lane tile; the report
    names the padding and the recall_features whose F fits (15: 120). Other mixers: nothing."""
    cfg = dataclasses.replace(CFG, features=512, num_heads=8, mixer_heads=8, mixer_block=64, recall_features=16,
                              max_length=4096)
    tiles = plan.tile_use(cfg)  # far blocks of 128 in rows of 4096
    assert tiles == {"F": (136, 256), "c": (64, 128), "K": (64, 128), "B": (128, 128)}
    assert plan._tile_advice(tiles) == ("F 136 -> 256 (53%), c 64 -> 128 (50%), K 64 -> 128 (50%), B 128 (100%); "
                                        "recall_features=15 gives F=120 (a model change: retrain, re-measure recall)")
    fits = plan.tile_use(dataclasses.replace(cfg, recall_features=15, features=1024, max_length=320))
    assert fits == {"F": (120, 128), "c": (128, 128), "K": (64, 128), "B": (320, 384)}  # a row of 320: one far block
    assert "recall_features=" not in plan._tile_advice(fits)
    assert plan.tile_use(dataclasses.replace(cfg, mixer="attention")) == {}
