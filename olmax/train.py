r"""Train an Olmax model: `python -m olmax.train --gin_file=... [--gin.KEY=VALUE ...]`.

    python -m olmax.train --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'runs/quickstart'"

The Gin surface mirrors T5X's `train()`: a model, dataset configs, a checkpoint
config, a partitioner, MODEL_DIR and step counts (see gin/runs/pretrain.gin).
What it does, in order: build the mesh; initialize (or restore the latest
checkpoint in MODEL_DIR, else CHECKPOINT_PATH) the train state directly into its
shardings; stream this process's shard of the data, skipping what the restored
step already consumed; run the jitted, donated train step; every `stats_period`
steps log a console line and TensorBoard scalars; every `eval_period` steps
evaluate on the validation split; save every checkpoint `period` and at the end.
SIGTERM (preemption) finishes the current step, saves, and exits 0.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import gin
import jax
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from olmax import gin_utils, models, multihost, optim, partitioning, perf, trainer, utils


class _Log:
    """Train metrics: kept on device until a log step, then one console line and TensorBoard scalars."""

    def __init__(self, model_dir: str, setup: trainer.TrainSetup, length: int, total_steps: int, start: int,
                 peak_flops: float | None):
        is_main = multihost.is_main_process()
        self.writer = metric_writers.create_default_writer(model_dir, just_logging=not is_main, collection="train")
        self.eval_writer = metric_writers.create_default_writer(model_dir, just_logging=not is_main,
                                                                collection="training_eval")
        self.tx, self.total_steps, self.start = setup.tx, total_steps, start
        self.flops_per_token = perf.train_flops_per_token(setup.model.config, length)
        peak, source = perf.peak_flops_per_device(peak_flops)
        n_devices = len(setup.partitioner.mesh.devices.flat)
        self.total_peak = peak if jax.devices()[0].platform == "cpu" else peak * n_devices  # CPU "devices" share cores
        logging.info("MFU reference: %.3g FLOP/s (%s); %.3g model FLOPs per token", self.total_peak, source,
                     self.flops_per_token)
        self.pending: list[dict] = []
        self.last: dict = {}
        self.t_start = self.t_last = time.time()

    def write(self, step: int) -> None:
        fetched, self.pending = jax.device_get(self.pending), []
        now = time.time()
        tokens = sum(float(m["tokens"]) for m in fetched)
        summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k not in ("tokens", "skipped")}
        summary["skipped_steps"] = float(sum(m["skipped"] for m in fetched))
        summary["tokens_per_second"] = tps = tokens / max(now - self.t_last, 1e-9)
        summary["mfu"] = self.flops_per_token * tps / self.total_peak
        lr = trainer.learning_rate(self.tx, step)
        if lr is not None:
            summary["learning_rate"] = lr
        self.writer.write_scalars(step, summary)
        eta = (self.total_steps - step) * (now - self.t_start) / max(step - self.start, 1)
        bits = (f"bits/byte {summary['bits_per_byte']:.3f}" if "bits_per_byte" in summary
                else f"bits/token {summary['bits_per_token']:.3f}")
        logging.info("step %d/%d  loss %.4f  %s  tokens/s %.0f  MFU %.1f%%  ETA %s", step, self.total_steps,
                     summary["loss"], bits, tps, 100 * summary["mfu"], trainer.fmt_seconds(eta))
        self.last, self.t_last = summary, now

    def write_eval(self, step: int, metrics: dict) -> None:
        self.eval_writer.write_scalars(step, metrics)
        logging.info("eval step %d: %s", step, trainer.fmt_metrics(metrics))
        self.last = dict(self.last, **{f"eval/{k}": v for k, v in metrics.items()})

    def flush(self) -> None:
        self.writer.flush()
        self.eval_writer.flush()


class _NonFinite:
    """Counts consecutive skipped steps, reading each step's flag one step late (it is ready by then)."""

    def __init__(self, limit: int):
        self.limit, self.run, self.previous = limit, 0, None

    def check(self, step: int, skipped) -> None:
        if self.previous is not None:
            self.run = self.run + 1 if float(jax.device_get(self.previous)) else 0
        self.previous = skipped
        if self.run >= self.limit:
            raise FloatingPointError(
                f"{self.run} consecutive steps had a non-finite loss or gradient (last: step {step - 1}); "
                "those steps left parameters and optimizer state untouched and the last checkpoint is intact. "
                "Lower the learning rate or the AGC clipping threshold, or check the data."
            )


def _next_batch(data, cfg: utils.DatasetConfig, step: int, start: int) -> dict:
    try:
        return next(data)
    except StopIteration:
        what = "is empty (or smaller than one batch)" if step == start + 1 and not start else f"ran out at step {step}"
        raise ValueError(
            f"The '{cfg.split}' split of {cfg.mixture_or_task_name} {what}; "
            f"BATCH_SIZE={cfg.batch_size}. Check the data files or lower the batch size."
        ) from None


@gin.configurable
def train(
    *,
    model: models.DecoderOnlyLM,
    train_dataset_cfg: utils.DatasetConfig,
    train_eval_dataset_cfg: utils.DatasetConfig | None = None,
    infer_eval_dataset_cfg: utils.DatasetConfig | None = None,
    checkpoint_cfg: utils.CheckpointConfig = utils.CheckpointConfig(),
    partitioner: partitioning.PjitPartitioner | None = None,
    model_dir: str,
    total_steps: int,
    eval_steps: int = 10,
    eval_period: int = 1000,
    stats_period: int = 100,
    random_seed: int = 0,
    optimizer: Callable[..., optax.GradientTransformation] = optim.create_optimizer,
    microbatches: int = 1,
    profile_steps: tuple[int, int] | None = None,
    max_consecutive_nonfinite: int = 10,
    peak_flops: float | None = None,
) -> tuple[int, dict]:
    """Trains `model` for `total_steps` and returns (last step, last logged metrics).

    Args mirror T5X's train(); additions: `optimizer` (a factory taking `axes=`),
    `microbatches` (gradient accumulation), `profile_steps` ((first step, count):
    a profiler trace under MODEL_DIR/profile, open it in TensorBoard's profile tab),
    `max_consecutive_nonfinite` (stop after this many skipped steps in a row),
    `peak_flops` (per device, for MFU; default: datasheet or a measured matmul).
    `infer_eval_dataset_cfg` is accepted for T5X compatibility: run olmax.eval for
    inference metrics.
    """
    del infer_eval_dataset_cfg
    partitioner = partitioner or partitioning.PjitPartitioner()
    trainer.check_batch(train_dataset_cfg.batch_size, partitioner, microbatches)
    utils.check_lengths(train_dataset_cfg, model.config.max_length)
    length = train_dataset_cfg.task_feature_lengths["targets"]
    if "://" not in model_dir:
        os.makedirs(model_dir, exist_ok=True)
    if multihost.is_main_process():
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.config_str())

    setup = trainer.TrainSetup(model, partitioner, (train_dataset_cfg.batch_size, length), optimizer, random_seed)
    logging.info("Model: %d parameters; mesh %s", models.param_count(setup.param_shapes), dict(partitioner.mesh.shape))
    ckpt = setup.checkpointer(model_dir, checkpoint_cfg.save if checkpoint_cfg else None)
    state = trainer.restore_or_init(setup, ckpt, checkpoint_cfg.restore if checkpoint_cfg else None)
    start = int(jax.device_get(state["step"]))
    steps = trainer.make_steps(setup, microbatches, random_seed)
    log = _Log(model_dir, setup, length, total_steps, start, peak_flops)
    data = utils.batches(utils.get_dataset(train_dataset_cfg, partitioner.data_parallel_size, skip_batches=start,
                                           shard=partitioner.data_shard(train_dataset_cfg.batch_size)))
    nonfinite = _NonFinite(max_consecutive_nonfinite)
    step = start
    try:
        with trainer.Preemption() as preemption:
            for step in range(start + 1, total_steps + 1):
                if profile_steps and step == profile_steps[0]:
                    jax.profiler.start_trace(os.path.join(model_dir, "profile"))
                batch = partitioner.global_batch(_next_batch(data, train_dataset_cfg, step, start))
                with partitioner.activate():
                    state, metrics = steps.train(state, batch)
                log.pending.append(metrics)
                if profile_steps and step == profile_steps[0] + profile_steps[1] - 1:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                preemption.check(step)
                nonfinite.check(step, metrics["skipped"])
                last = step == total_steps or preemption.requested
                if step % stats_period == 0 or last:
                    log.write(step)
                if train_eval_dataset_cfg is not None and eval_period and (step % eval_period == 0 or step == total_steps):
                    log.write_eval(step, trainer.evaluate(state["params"], train_eval_dataset_cfg, partitioner,
                                                          eval_steps, steps.eval))
                if ckpt.should_save(step) or last:
                    ckpt.save(step, state)
                if preemption.requested:
                    logging.warning("Saved step %d after SIGTERM; rerun the same command to resume.", step)
                    break
    finally:
        ckpt.close()
        log.flush()
    return step, log.last


def console_main():
    gin_utils.run_binary(train, run_file="runs/pretrain.gin")


if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy, so Gin binds one `train`.
    from olmax import train as _train

    _train.console_main()
