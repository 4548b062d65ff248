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
SIGTERM (preemption) or a first Ctrl-C finishes the current step, saves, and exits 0;
a second Ctrl-C stops before the next step without saving, a third exits at once. A
save that fails (a full disk) stops the run with one message. Every start keeps its Gin config as MODEL_DIR/config_start_<step>.gin.
One trainer at a time writes a MODEL_DIR (olmax.lease); `--force` takes it over.
"""
from __future__ import annotations

import os
import re
import time
from typing import Callable

import gin
import jax
import numpy as np
import optax
from absl import logging

from olmax import (checkpoints, gin_utils, lease, models, multihost, optim, partitioning, perf, trainer, utils,
                   validation)

if __name__ == "__main__":
    gin_utils.run_importable_module("olmax.train")


class _Log:
    """Train metrics: kept on device until a log step, then one console line and TensorBoard scalars.

    tokens_per_second counts the training steps' time only: what `excluded` collects
    (checkpoint saves, evaluations) is left out, as T5X's timing metrics leave it out.
    """

    def __init__(self, model_dir: str, setup: trainer.TrainSetup, length: int, total_steps: int, start: int,
                 peak_flops: float | None):
        self.writer = trainer.metric_writer(model_dir, "train")
        self.eval_writer = trainer.metric_writer(model_dir, "training_eval")
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
        self.excluded = 0.0  # seconds since t_last spent outside training steps

    def write(self, step: int) -> None:
        fetched, self.pending = jax.device_get(self.pending), []
        now = time.time()
        tokens = sum(float(m["tokens"]) for m in fetched)
        summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k not in ("tokens", "skipped")}
        summary["skipped_steps"] = float(sum(m["skipped"] for m in fetched))
        summary["tokens_per_second"] = tps = tokens / max(now - self.t_last - self.excluded, 1e-9)
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
        self.last, self.t_last, self.excluded = summary, now, 0.0

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


_SCHEDULE_KEY = re.compile(r"^(\S*(?:TRAIN_STEPS|total_steps|warmup_steps|learning_rate|schedule|end_value_ratio))"
                           r"\s*=\s*(.*)$")


def _schedule_settings(config_text: str) -> dict[str, str]:
    """{binding: value} of the Gin lines that shape the LR schedule."""
    return {m.group(1): m.group(2).strip() for m in map(_SCHEDULE_KEY.match, config_text.splitlines()) if m}


def _record_config(model_dir: str, start: int) -> None:
    """Writes config.gin (this start's, as T5X does) and keeps config_start_<step>.gin for every
    start; warns when a resumed run's schedule differs from the previous start's."""
    text = gin.config_str()
    earlier = {int(m.group(1)): name for name in os.listdir(model_dir)
               if (m := re.fullmatch(r"config_start_(\d+)\.gin", name)) and int(m.group(1)) <= start}
    previous = earlier[max(earlier)] if earlier else "config.gin"
    if start and os.path.isfile(os.path.join(model_dir, previous)):
        with open(os.path.join(model_dir, previous)) as f:
            old = _schedule_settings(f.read())
        new = _schedule_settings(text)
        changed = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if changed:
            logging.warning("Resuming at step %d with another schedule than the previous start (%s): %s. The run "
                            "continues on the new schedule from step %d; the previous settings stay in %s.",
                            start, previous, "; ".join(changed), start, os.path.join(model_dir, previous))
    for name in ("config.gin", f"config_start_{start}.gin"):
        with open(os.path.join(model_dir, name), "w") as f:
            f.write(text)


def _check_checkpoint_path(restore_cfg: utils.RestoreCheckpointConfig | None, model_dir: str) -> None:
    """A CHECKPOINT_PATH that does not exist is an error before MODEL_DIR is created (it would
    be left behind, empty), unless MODEL_DIR already holds checkpoints, which come first."""
    path = restore_cfg.path if restore_cfg is not None else None
    if not path or "://" in path or os.path.exists(path):
        return
    if os.path.isdir(model_dir) and trainer.step_dirs(model_dir):
        return
    raise FileNotFoundError(f"CHECKPOINT_PATH={path!r} does not exist; point it at a MODEL_DIR or a "
                            "MODEL_DIR/<step> with a checkpoint, or leave it unset to start from scratch.")


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
    force: bool = False,
) -> tuple[int, dict]:
    """Trains `model` for `total_steps` and returns (last step, last logged metrics).

    Args mirror T5X's train(); additions: `optimizer` (a factory taking `axes=`),
    `microbatches` (gradient accumulation), `profile_steps` ((first step, count):
    a profiler trace under MODEL_DIR/profile, open it in TensorBoard's profile tab),
    `max_consecutive_nonfinite` (stop after this many skipped steps in a row),
    `peak_flops` (per device, for MFU; default: datasheet or a measured matmul),
    `force` (take MODEL_DIR's lease over from another trainer: olmax.lease; `--force`).
    `infer_eval_dataset_cfg` is accepted for T5X compatibility: run olmax.eval for
    inference metrics.
    """
    del infer_eval_dataset_cfg
    validation.check_train_args(total_steps=total_steps, eval_steps=eval_steps, eval_period=eval_period,
                                stats_period=stats_period, microbatches=microbatches, random_seed=random_seed,
                                max_consecutive_nonfinite=max_consecutive_nonfinite)
    optimizer(axes=None)  # checks its settings (learning rate, TRAIN_STEPS, ...) before MODEL_DIR is touched
    partitioner = partitioner or partitioning.PjitPartitioner()
    trainer.check_batch(train_dataset_cfg.batch_size, partitioner, microbatches)
    utils.check_lengths(train_dataset_cfg, model.config.max_length)
    length = train_dataset_cfg.task_feature_lengths["targets"]
    # The data before MODEL_DIR is touched: a task whose data is missing (a TFDS dataset not
    # yet built, an unknown split) fails here, not after the model is initialized.
    train_ds = utils.get_dataset(train_dataset_cfg, partitioner.data_parallel_size,
                                 shard=partitioner.data_shard(train_dataset_cfg.batch_size))
    if train_eval_dataset_cfg is not None and eval_period:
        trainer.check_split(train_eval_dataset_cfg, partitioner)  # one full batch, before step 1
    _check_checkpoint_path(checkpoint_cfg.restore if checkpoint_cfg else None, model_dir)
    setup = trainer.TrainSetup(model, partitioner, (train_dataset_cfg.batch_size, length), optimizer, random_seed)
    logging.info("Model: %d parameters; mesh %s", models.param_count(setup.param_shapes), dict(partitioner.mesh.shape))
    trainer.check_memory(setup)  # abstract shapes so far: a model that cannot fit is refused before it is built
    validation.prepare_model_dir(model_dir)
    with lease.take(model_dir, force) as run_lease:
        ckpt = setup.checkpointer(model_dir, checkpoint_cfg.save if checkpoint_cfg else None)
        state = trainer.restore_or_init(setup, ckpt, checkpoint_cfg.restore if checkpoint_cfg else None)
        start = int(jax.device_get(state["step"]))
        if start >= total_steps:
            # Nothing runs, so nothing is recorded: a config_start_<step>.gin of this start would
            # make the next resume report a schedule change that never trained a step.
            ckpt.close()
            logging.warning("MODEL_DIR %s already holds step %d >= TRAIN_STEPS=%d: nothing to train. "
                            "Raise TRAIN_STEPS to continue this run.", model_dir, start, total_steps)
            return start, {}
        if multihost.is_main_process():
            _record_config(model_dir, start)
        steps = trainer.make_steps(setup, microbatches, random_seed)
        log = _Log(model_dir, setup, length, total_steps, start, peak_flops)
        data = utils.batches(train_ds.skip(start))  # a resumed run continues where its batches left off
        nonfinite = _NonFinite(max_consecutive_nonfinite)
        step = start
        try:
            with trainer.Preemption() as preemption:
                for step in range(start + 1, total_steps + 1):
                    preemption.stop_if_aborted()
                    run_lease.check()  # taken over (--force): stop before this run's saves overwrite the other's
                    if profile_steps and step == profile_steps[0]:
                        jax.profiler.start_trace(os.path.join(model_dir, "profile"))
                    batch = partitioner.global_batch(_next_batch(data, train_dataset_cfg, step, start))
                    with partitioner.activate():
                        state, metrics = steps.train(state, batch)
                    log.pending.append(metrics)
                    if profile_steps and step == profile_steps[0] + profile_steps[1] - 1:
                        jax.block_until_ready(state)
                        jax.profiler.stop_trace()
                    stop = preemption.check(step)  # read once: a signal from here on counts for the next step
                    nonfinite.check(step, metrics["skipped"])
                    ckpt.check()  # a failed background save stops the run now, not at the end
                    last = step == total_steps or stop
                    if step % stats_period == 0 or last:
                        log.write(step)
                    save = ckpt.should_save(step) or last
                    evaluate = train_eval_dataset_cfg is not None and eval_period and (
                        step % eval_period == 0 or step == total_steps)
                    if save or evaluate:
                        jax.block_until_ready(state)  # the step's own time stays in the training time
                        preemption.stop_if_aborted()
                        t0 = time.time()
                        if save:  # before eval: a failing eval never costs this checkpoint
                            run_lease.check()
                            ckpt.save(step, state)
                        if evaluate:
                            log.write_eval(step, trainer.evaluate(state["params"], train_eval_dataset_cfg,
                                                                  partitioner, eval_steps, steps.eval,
                                                                  preemption.stop_if_aborted))
                        log.excluded += time.time() - t0
                    if stop:
                        preemption.stop_if_aborted()  # a second Ctrl-C during this save still exits 130
                        logging.warning("Saved step %d after %s; rerun the same command to resume.", step,
                                        preemption.reason)
                        break
            ckpt.close()
        except checkpoints.CheckpointSaveError as e:
            ckpt.abandon()
            raise SystemExit(f"olmax.train: {e}") from None
        except KeyboardInterrupt:  # the second Ctrl-C
            ckpt.abandon()  # saves already under way complete: they are checkpoints the next run may use
            saved = ckpt.all_steps()
            last_saved = f"the last checkpoint is step {saved[-1]}" if saved else "no checkpoint was saved"
            # A second Ctrl-C that lands while the first one's save is being written lets that save finish.
            how = "after its save had started" if saved and saved[-1] == step else "without saving"
            raise KeyboardInterrupt(f"stopped at step {step} {how} (second Ctrl-C); {last_saved}. Rerun "
                                    "the same command to resume from it.") from None
        except BaseException:
            ckpt.abandon()  # the error in flight is the one to report
            raise
        finally:
            log.flush()
        return step, log.last


def console_main():
    from absl import flags

    if "force" not in flags.FLAGS:
        flags.DEFINE_bool("force", False, "Take MODEL_DIR over from the trainer its lease names (olmax.lease), "
                          "e.g. one that hangs on another host; that trainer stops at its next step.")
    gin_utils.run_binary(lambda: train(force=True) if flags.FLAGS.force else train(), run_file="runs/pretrain.gin")
