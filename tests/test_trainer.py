"""olmax.trainer: what the trainer logs comes from the optimizer factory; checkpoint selection; checks."""
import os

import jax
import numpy as np
import optax
import pytest

from olmax import optim, partitioning, trainer, utils


def test_learning_rate_and_agc_come_from_the_optimizer_factory():
    tx = optim.create_optimizer(learning_rate=2e-3, schedule="cosine", warmup_steps=10, total_steps=100,
                                clipping=0.05, agc_eps=1e-2)
    reference = optim.make_schedule("cosine", 2e-3, 10, 100)
    for step in (0, 5, 10, 60, 100):
        assert trainer.learning_rate(tx, step) == pytest.approx(float(reference(step)))
    assert tx.agc == (0.05, 1e-2)
    # The clip metric uses exactly those settings: a gradient 100x its weight is clipped, one 1e-3x is not.
    params = {"w": np.ones((4, 3), np.float32)}
    clip = trainer.agc_clip_metric(tx, None)
    assert float(clip({"w": 100 * params["w"]}, params)) == 1.0
    assert float(clip({"w": 1e-3 * params["w"]}, params)) == 0.0
    assert trainer.agc_clip_metric(optim.create_optimizer(clipping=None), None) is None


def test_another_optimizer_factory_logs_nothing_instead_of_nan():
    """A factory bound in Gin that returns a plain optax transformation: no schedule to read."""
    tx = optax.adamw(1e-3)
    assert trainer.learning_rate(tx, 10) is None
    assert trainer.agc_clip_metric(tx, None) is None


def test_restore_mode_is_validated():
    with pytest.raises(ValueError, match=r"mode = 'lastest' is not one of 'latest', 'specific', 'all'"):
        utils.RestoreCheckpointConfig(mode="lastest")
    with pytest.raises(ValueError, match="needs a step"):
        utils.RestoreCheckpointConfig(mode="specific")
    assert utils.RestoreCheckpointConfig(mode="specific", step=4).step == 4


def test_checkpoint_selection(tmp_path):
    for step in (4, 8, 12):
        os.makedirs(tmp_path / str(step) / "state")
    os.makedirs(tmp_path / "16.orbax-checkpoint-tmp" / "state")  # unfinished: never selected
    path = str(tmp_path)
    assert trainer.checkpoint_steps(path, utils.RestoreCheckpointConfig()) == (path, [12])
    assert trainer.checkpoint_steps(path, utils.RestoreCheckpointConfig(mode="all")) == (path, [4, 8, 12])
    assert trainer.checkpoint_steps(path, utils.RestoreCheckpointConfig(mode="specific", step=8)) == (path, [8])
    assert trainer.checkpoint_steps(os.path.join(path, "4"), utils.RestoreCheckpointConfig()) == (path, [4])
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 5 .* it has \[4, 8, 12\]"):
        trainer.checkpoint_steps(path, utils.RestoreCheckpointConfig(mode="specific", step=5))
    with pytest.raises(ValueError, match="Set CHECKPOINT_PATH"):
        trainer.checkpoint_path(utils.RestoreCheckpointConfig(), None)


def test_batch_must_split_over_devices_and_microbatches():
    partitioner = partitioning.PjitPartitioner(mesh_shape={"data": 4, "model": 1}, devices=jax.devices()[:4])
    trainer.check_batch(16, partitioner, microbatches=4)
    with pytest.raises(ValueError, match="BATCH_SIZE=8 must split into 4 microbatches, each divisible by the "
                                         "data-parallel size 4"):
        trainer.check_batch(8, partitioner, microbatches=4)


def test_tokens_per_second_leaves_out_saves_and_evaluations(monkeypatch):
    """olmax.train's tokens/s is training time only (as T5X's timing metrics): 100 tokens
    over a 10 s interval of which 6 s were a checkpoint save and an eval -> 25 tokens/s."""
    from olmax import train

    written = {}
    log = object.__new__(train._Log)
    log.writer = type("W", (), {"write_scalars": lambda self, step, s: written.update(s)})()
    log.tx, log.total_steps, log.start, log.flops_per_token, log.total_peak = None, 10, 0, 1.0, 1.0
    log.pending = [{"tokens": np.float32(60), "loss": np.float32(1), "bits_per_token": np.float32(1),
                    "skipped": np.float32(0)}, {"tokens": np.float32(40), "loss": np.float32(3),
                                                "bits_per_token": np.float32(1), "skipped": np.float32(0)}]
    log.t_start = log.t_last = 0.0
    log.excluded = 6.0
    monkeypatch.setattr(train.time, "time", lambda: 10.0)
    log.write(2)
    assert written["tokens_per_second"] == pytest.approx(25.0)
    assert written["loss"] == pytest.approx(2.0)
    assert log.excluded == 0.0 and log.t_last == 10.0  # the next interval starts clean
