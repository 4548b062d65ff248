"""Multi-host on one machine: two processes on 127.0.0.1 train like one process with the same devices.

The slow test runs the real binary three times (tiny model, simulated CPU devices):

  two hosts  `python -m launch.local --num_processes 2 --devices_per_process 2`: a
             data=4 mesh split over two processes joined by jax.distributed (gloo CPU
             collectives). After step 2 one process (only one, as when one host of a
             pod is preempted) gets SIGTERM; JAX's preemption service makes both stop
             at the same step S, save one checkpoint cooperatively and exit 0;
  reference  one process, 4 devices, S + 2 steps;
  resume     one process, 2 devices (another layout than the writer's), continues the
             two-host checkpoint to step S + 2.

Why the losses must agree (a real equivalence, not a coincidence of data order):
the task is a deterministic in-memory list of documents, each exactly one row
(63 bytes + EOS = the 64-token length), read with shuffle=False and pack=False. seqio
shards such a source row-wise (`ds.shard(2, i)`: process i gets rows i, i+2, ...),
and each process batches 4 of its rows, so global batch k of the two-host run is
rows 8k..8k+7 of the list, exactly the rows of batch k in the one-process run, only
in another order (process 0 contributes the even rows, process 1 the odd ones). The
loss is a token-weighted mean and the gradient a sum over the batch, both
independent of row order, so every step makes the same mathematical update; only
the floating-point reduction order differs (hence rtol 1e-5, not bitwise). The
learning-rate schedule is pinned (total_steps) so that runs of different lengths
share it. The resumed losses equal the reference's steps S+1, S+2 only if the
two-host checkpoint holds the full state (each process wrote its part) and the data
position is restored: the one-process run skips S global batches of its unsharded stream.
"""
import glob
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from olmax import multihost, partitioning
from fast_compile import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASK_MODULE = textwrap.dedent('''
    """Deterministic documents of exactly one 64-token row each (63 bytes + EOS)."""
    import numpy as np
    import seqio
    import tensorflow as tf

    import olmax_tasks

    WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


    def _texts(split, n=128, length=63):
        rng = np.random.RandomState(0 if split == "train" else 1)
        out = []
        for _ in range(n):
            s = ""
            while len(s) < length:
                s += WORDS[rng.randint(len(WORDS))] + " "
            out.append(s[:length])
        return out


    def _dataset(split, shuffle_files=False, seed=None):
        return tf.data.Dataset.from_tensor_slices({"text": _texts(split)})


    olmax_tasks.add_lm_task("olmax_multihost_test", seqio.FunctionDataSource(_dataset, splits=("train", "validation")),
                            olmax_tasks.byte_vocabulary())
''')


def _args(task_module, model_dir, steps):
    return [
        "--gin_file=gin/quickstart.gin",
        f"--gin.MODEL_DIR={model_dir}",
        f"--gin.MIXTURE_OR_TASK_MODULE={task_module}",
        "--gin.MIXTURE_OR_TASK_NAME=olmax_multihost_test",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
        "--gin.BATCH_SIZE=8",
        f"--gin.TRAIN_STEPS={steps}",
        "--gin.train/utils.DatasetConfig.shuffle=False",
        "--gin.train/utils.DatasetConfig.pack=False",
        "--gin.train.train.stats_period=1",
        "--gin.train.train.eval_period=0",
        "--gin.train.train.peak_flops=1e11",
        "--gin.utils.SaveCheckpointConfig.period=1000",
        "--gin.optim.create_optimizer.warmup_steps=1",
        "--gin.optim.create_optimizer.total_steps=100",  # one schedule for runs of every length
    ]


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu", **extra)


def _train_one_process(devices, args, timeout=400):
    proc = subprocess.run([sys.executable, "-m", "olmax.train", *args], cwd=REPO, capture_output=True, text=True,
                          env=_env(XLA_FLAGS=xla_flags(devices)), timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"olmax.train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stderr


def _two_hosts_preempted(args, timeout=400):
    """Runs two processes with launch.local; SIGTERMs process 1 once step 2 is logged. Returns the output."""
    argv = [sys.executable, "-m", "launch.local", "--num_processes", "2", "--devices_per_process", "2", "--", *args]
    proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))  # every process we started
    watchdog.start()
    lines, pids, sent = [], {}, False
    try:
        for line in proc.stdout:
            lines.append(line)
            m = re.match(r"\[launch.local\] process (\d+): pid (\d+)", line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))
            if not sent and line.startswith("[1]") and re.search(r"step 2/\d+", line):
                os.kill(pids[1], signal.SIGTERM)
                sent = True
        rc = proc.wait()
    finally:
        watchdog.cancel()
    out = "".join(lines)
    if rc != 0 or not sent:
        raise AssertionError(f"launch.local exited {rc} (SIGTERM sent: {sent}):\n{out[-8000:]}")
    return out


def _losses(model_dir):
    """{step: loss} from the TensorBoard events (float32, unlike the 4 decimals of the console line)."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util

    out = {}
    for path in glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == "loss":
                    out[event.step] = float(tensor_util.make_ndarray(value.tensor))
    return out


@pytest.mark.slow
def test_two_processes_train_like_one_stop_together_and_resume_in_one(tmp_path):
    task_module = tmp_path / "multihost_tasks.py"
    task_module.write_text(TASK_MODULE)
    timings = {}

    t = time.time()
    two_dir = str(tmp_path / "two_hosts")
    out = _two_hosts_preempted(_args(task_module, two_dir, 100))
    timings["two hosts"] = time.time() - t
    assert "Process 0 of 2" in out and "Process 1 of 2" in out and "2 local / 4 global devices" in out
    saved = {int(i): int(s) for i, s in re.findall(r"^\[(\d)\].*Saved step (\d+) after SIGTERM", out, re.M)}
    assert sorted(saved) == [0, 1] and saved[0] == saved[1], out[-4000:]  # both hosts stopped at the same step
    stop = saved[0]
    assert 2 < stop < 100
    assert sorted(int(d) for d in os.listdir(two_dir) if d.isdigit()) == [stop]
    two = _losses(two_dir)
    assert sorted(two) == list(range(1, stop + 1))
    # Only process 0 writes what exists once per run.
    assert len(glob.glob(os.path.join(two_dir, "train", "events.out.tfevents.*"))) == 1
    assert os.path.isfile(os.path.join(two_dir, "config.gin"))

    t = time.time()
    ref_dir = str(tmp_path / "reference")
    _train_one_process(4, _args(task_module, ref_dir, stop + 2))
    timings["reference"] = time.time() - t
    reference = _losses(ref_dir)
    steps = list(range(1, stop + 1))
    np.testing.assert_allclose([two[s] for s in steps], [reference[s] for s in steps], rtol=1e-5)

    t = time.time()
    err = _train_one_process(2, _args(task_module, two_dir, stop + 2))
    timings["resume"] = time.time() - t
    assert f"Restored step {stop}" in err
    resumed = _losses(two_dir)
    after = [stop + 1, stop + 2]
    np.testing.assert_allclose([resumed[s] for s in after], [reference[s] for s in after], rtol=1e-5)
    assert reference[stop + 2] < reference[1]
    print(f"stopped at step {stop}; timings (s):", {k: round(v, 1) for k, v in timings.items()})


# Fast checks of the pieces (no processes started).

def _rows(mesh_shape, process_of, batch=16):
    p = partitioning.PjitPartitioner(mesh_shape=mesh_shape)
    rows = {}
    for device, index in p.data_sharding.devices_indices_map((batch,)).items():
        rows.setdefault(process_of(device), set()).add(index[0].indices(batch)[:2])
    return rows


@pytest.mark.parametrize("mesh_shape, expected", [
    ({"data": 8, "model": 1}, [(0, 2), (1, 2)]),  # each host feeds half of every batch
    ({"data": 2, "model": 4}, [(0, 2), (1, 2)]),  # a model group inside each host
    ({"data": 1, "model": 8}, [(0, 1), (0, 1)]),  # the model axis spans both hosts: both feed the whole batch
])
def test_each_process_reads_the_rows_its_devices_hold(mesh_shape, expected):
    rows = _rows(mesh_shape, lambda d: d.id // 4)  # 8 devices as 2 hosts of 4
    assert [partitioning.shard_of_process(rows, i, 16) for i in range(2)] == expected
    assert partitioning.PjitPartitioner(mesh_shape=mesh_shape).data_shard(16) == (0, 1)  # one real process


def test_interleaved_devices_are_refused_with_the_fix():
    rows = _rows({"data": 8, "model": 1}, lambda d: d.id % 2)
    with pytest.raises(ValueError, match="not one contiguous block.*Order the mesh's devices by process"):
        partitioning.shard_of_process(rows, 0, 16)


def test_incomplete_multihost_flags_are_refused():
    with pytest.raises(ValueError, match="all three of --coordinator_address, --process_count and --process_index"):
        multihost.initialize("127.0.0.1:1234", 2, None)
    with pytest.raises(ValueError, match="must be in"):
        multihost.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="needs a port"):
        multihost.initialize("127.0.0.1", 2, 0)


def test_cluster_detection(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(k)
    assert multihost.detect_cluster() is None
    multihost.initialize()  # nothing to join: a no-op
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    assert multihost.detect_cluster() == "SLURM"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: no runtime to join
    assert multihost.detect_cluster() is None


UNEVEN_EVAL = textwrap.dedent('''
    """One process of a 2-process evaluation whose validation shards hold 3 and 2 batches."""
    import json
    import sys

    from olmax import multihost

    multihost.initialize(sys.argv[1], 2, int(sys.argv[2]))

    import seqio
    import tensorflow as tf

    from olmax import models, network, partitioning, tasks, trainer, utils

    def _dataset(split, shuffle_files=False, seed=None):  # 5 one-row documents: shards of 3 and 2 rows
        return tf.data.Dataset.from_tensor_slices({"text": [f"document number {i}" for i in range(5)]})

    tasks.add_lm_task("olmax_uneven_eval", seqio.FunctionDataSource(_dataset, splits=("validation",)),
                      tasks.byte_vocabulary())
    cfg = network.OlmaxConfig(vocab_size=384, features=16, depth=1, max_length=32, conv_features=16, mixer_block=4,
                              mixer_heads=2, num_heads=2)
    model = models.DecoderOnlyLM(network.Olmax(cfg), tasks.byte_vocabulary())
    partitioner = partitioning.PjitPartitioner()
    setup = trainer.TrainSetup(model, partitioner, (2, 32))
    data = utils.DatasetConfig("olmax_uneven_eval", {"targets": 32}, split="validation", batch_size=2, shuffle=False,
                               pack=False)
    metrics = trainer.evaluate(setup.init_state()["params"], data, partitioner, None, trainer.make_steps(setup).eval)
    print("METRICS " + json.dumps(metrics), flush=True)
''')


@pytest.mark.slow
def test_eval_with_uneven_shards_ends_on_every_process(tmp_path):
    """Two processes (loopback, gloo) evaluate a split whose shards hold 3 and 2 batches: both
    stop after the 2 batches every process has, with the same metrics, instead of process 0
    waiting forever in its third collective step."""
    from launch import local

    script = tmp_path / "uneven_eval.py"
    script.write_text(UNEVEN_EVAL)
    address = f"127.0.0.1:{local.free_port()}"
    procs = [subprocess.Popen([sys.executable, str(script), address, str(i)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                              env=dict(_env(), **local.process_env(i, 1, "cpu")))
             for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
        raise AssertionError("a process still waits after 240 s: uneven shards hang the evaluation") from None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    import json

    metrics = [json.loads(re.search(r"^METRICS (.*)$", o, re.M).group(1)) for o in outputs]
    assert metrics[0] == metrics[1]
    assert metrics[0]["tokens"] == 2 * 2 * 18  # 2 global batches of 2 rows, "document number i" + EOS
