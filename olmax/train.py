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

import functools
import os
import signal
import time
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from olmax import axes, checkpoints, gin_utils, models, optim, partitioning, perf, utils, validation


def _tree_where(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(model: models.DecoderOnlyLM, tx: optax.GradientTransformation, microbatches: int,
                    dropout_seed: int, clip_metric: Callable | None):
    """(state, batch) -> (state, metrics). A non-finite loss or gradient leaves
    params and optimizer state untouched (the step is counted as skipped)."""
    use_dropout = model.config.dropout_rate > 0

    def grads_of(params, batch, rng):
        fn = jax.value_and_grad(model.loss_fn, has_aux=True)
        if microbatches <= 1:
            (_, metrics), grads = fn(params, batch, rng)
            return grads, metrics
        mbs = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)

        def body(acc, xs):
            mb, i = xs
            (_, m), g = fn(params, mb, None if rng is None else jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, acc, (g, m)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: fn(params, jax.tree.map(lambda x: x[0], mbs), rng)))
        zeros = (zeros[1], zeros[0][1])
        (grads, metrics), _ = jax.lax.scan(body, zeros, (mbs, jnp.arange(microbatches)))
        # Equal-size microbatches: the mean of per-microbatch means is the batch mean
        # up to the per-microbatch token counts, which packing keeps near equal.
        scale = 1.0 / microbatches
        metrics = {k: (v if k == "tokens" else v * scale) for k, v in metrics.items()}
        return jax.tree.map(lambda g: g * scale, grads), metrics

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(dropout_seed), state["step"]) if use_dropout else None
        grads, metrics = grads_of(state["params"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        metrics = dict(metrics, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32))
        if clip_metric is not None:
            metrics["agc_clip_fraction"] = clip_metric(grads, state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": _tree_where(ok, params, state["params"]),
            "opt_state": _tree_where(ok, opt_state, state["opt_state"]),
        }
        return new_state, metrics

    return step


def _agc_clip_metric(optimizer: Callable, logical_specs: Any) -> Callable | None:
    """The AGC clip fraction with the clipping the optimizer factory is bound to."""
    try:
        bound = gin.get_bindings(optimizer)
    except (ValueError, TypeError):
        bound = {}
    clipping = bound.get("clipping", _default_arg(optimizer, "clipping"))
    if not clipping:
        return None
    eps = bound.get("agc_eps", _default_arg(optimizer, "agc_eps") or 1e-3)
    return functools.partial(optim.agc_clip_fraction, clipping=clipping, eps=eps, axes=logical_specs)


def _default_arg(fn, name):
    import inspect

    try:
        p = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


class _Preemption:
    """SIGTERM -> finish the current step, checkpoint, exit cleanly.

    With several processes every host must stop at the same step (saving is
    collective): JAX's preemption service (started by jax.distributed) catches
    SIGTERM on any host and the hosts agree on a step, which `check` reports. A
    Python handler would replace the service's, so none is installed then.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multihost = jax.process_count() > 1

    def check(self, step: int) -> bool:
        if self._multihost and not self.requested:
            from jax.experimental import multihost_utils

            try:
                self.requested = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # the preemption service is disabled
                logging.warning("Multi-host preemption handling is off: %s", e)
                self._multihost = False
        return self.requested

    def __enter__(self):
        if self._multihost:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: finishing this step, saving a checkpoint and exiting.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate(model: models.DecoderOnlyLM, params: Any, cfg: utils.DatasetConfig, partitioner, steps: int | None,
             eval_fn=None) -> dict[str, float]:
    """Token-weighted mean metrics over `steps` batches (None: the whole split)."""
    ds = utils.get_dataset(dataclasses_replace(cfg, shuffle=False), partitioner.data_parallel_size, num_epochs=1,
                           shard=partitioner.data_shard(cfg.batch_size))
    if eval_fn is None:
        eval_fn = jax.jit(lambda p, b: model.loss_fn(p, b, None)[1])
    totals: dict[str, float] = {}
    weight = 0.0
    for i, batch in enumerate(utils.batches(ds)):
        if steps is not None and i >= steps:
            break
        with partitioner.activate():
            m = jax.device_get(eval_fn(params, partitioner.global_batch(batch)))
        w = float(m["tokens"])
        weight += w
        for k, v in m.items():
            if k != "tokens":
                totals[k] = totals.get(k, 0.0) + float(v) * w
    if not weight:
        raise ValueError(
            f"The '{cfg.split}' split of {cfg.mixture_or_task_name} gave no full batch of "
            f"{cfg.batch_size}; it is empty or smaller than one batch. Lower the batch size or add data."
        )
    out = {k: v / weight for k, v in totals.items()}
    out["perplexity"] = float(np.exp(out.get("nll", out["cross_entropy"])))  # from the mean, not a mean of exps
    out["tokens"] = weight
    return out


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def run_meta(model: models.DecoderOnlyLM, param_shapes: Any) -> dict:
    return {
        "vocab_size": model.config.vocab_size,
        "config": {k: str(v) for k, v in vars(model.config).items()},
        "shapes": checkpoints.tree_shapes(param_shapes),
    }


class TrainSetup:
    """Everything derived from the model, optimizer and mesh that train/eval/infer share."""

    def __init__(self, model: models.DecoderOnlyLM, partitioner: partitioning.PjitPartitioner, batch_shape: tuple,
                 optimizer: Callable | None = None, random_seed: int = 0):
        self.model, self.partitioner = model, partitioner
        init_fn = functools.partial(model.get_initial_variables, input_shapes={"decoder_input_tokens": batch_shape})
        variables = jax.eval_shape(init_fn, jax.random.PRNGKey(random_seed))
        self.logical_specs = axes.logical_axes(variables)
        self.param_shapes = variables["params"]
        self.param_shardings = partitioner.param_shardings(self.logical_specs)
        self.tx = optimizer(axes=self.logical_specs) if optimizer is not None else None
        state_shardings = {"step": partitioner.replicated, "params": self.param_shardings}
        if self.tx is not None:
            state_shardings["opt_state"] = partitioner.opt_state_shardings(self.tx, self.param_shapes, self.param_shardings)
        self.state_shardings = state_shardings
        self.random_seed = random_seed
        self._init_fn = init_fn

    def _init(self, rng) -> dict:
        params = self._init_fn(rng)["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params}
        if self.tx is not None:
            state["opt_state"] = self.tx.init(params)
        return state

    def init_state(self) -> dict:
        """A fresh train state, created directly in its shardings."""
        with self.partitioner.activate():
            return jax.jit(self._init, out_shardings=self.state_shardings)(jax.random.PRNGKey(self.random_seed))

    def abstract_state(self) -> dict:
        shapes = jax.eval_shape(self._init, jax.random.PRNGKey(self.random_seed))
        return checkpoints.abstract_like(shapes, self.state_shardings)

    def checkpointer(self, directory: str, save_cfg) -> checkpoints.Checkpointer:
        return checkpoints.Checkpointer(directory, save_cfg, run_meta(self.model, self.param_shapes))


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
    validation.check_train_args(total_steps=total_steps, eval_steps=eval_steps, eval_period=eval_period,
                                stats_period=stats_period, microbatches=microbatches, random_seed=random_seed,
                                max_consecutive_nonfinite=max_consecutive_nonfinite)
    optimizer(axes=None)  # checks its settings (learning rate, TRAIN_STEPS, ...) before MODEL_DIR is touched
    partitioner = partitioner or partitioning.PjitPartitioner()
    cfg = model.config
    partitioner.check_batch_size(train_dataset_cfg.batch_size)
    utils.check_lengths(train_dataset_cfg, cfg.max_length)
    if train_dataset_cfg.batch_size % (partitioner.data_parallel_size * microbatches):
        raise ValueError(
            f"BATCH_SIZE={train_dataset_cfg.batch_size} must split into {microbatches} microbatches, "
            f"each divisible by the data-parallel size {partitioner.data_parallel_size}."
        )
    length = train_dataset_cfg.task_feature_lengths["targets"]
    batch_shape = (train_dataset_cfg.batch_size, length)
    is_main = jax.process_index() == 0
    validation.prepare_model_dir(model_dir)
    if is_main:
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.config_str())

    setup = TrainSetup(model, partitioner, batch_shape, optimizer, random_seed)
    logging.info("Model: %d parameters; mesh %s", models.param_count(setup.param_shapes), dict(partitioner.mesh.shape))
    ckpt = setup.checkpointer(model_dir, checkpoint_cfg.save if checkpoint_cfg else None)
    abstract = setup.abstract_state()
    restored = ckpt.restore_latest(abstract)
    if restored is None and checkpoint_cfg and checkpoint_cfg.restore and checkpoint_cfg.restore.path:
        source = checkpoints.Checkpointer(checkpoint_cfg.restore.path, None, ckpt.meta)
        restored = source.restore_latest(abstract, max_step=checkpoint_cfg.restore.step)
        if restored is None:
            raise FileNotFoundError(f"No loadable checkpoint in CHECKPOINT_PATH={checkpoint_cfg.restore.path!r}.")
    if restored is not None:
        state, meta = restored
        logging.info("Restored step %d from %s", int(state["step"]), ckpt.directory)
    else:
        state = setup.init_state()
    start = int(jax.device_get(state["step"]))
    if start >= total_steps:
        logging.warning("MODEL_DIR %s already holds step %d >= TRAIN_STEPS=%d: nothing to train. "
                        "Raise TRAIN_STEPS to continue this run.", model_dir, start, total_steps)

    step_fn = make_train_step(model, setup.tx, microbatches, random_seed, _agc_clip_metric(optimizer, setup.logical_specs))
    batch_shardings = partitioner.data_sharding
    with partitioner.activate():
        train_step = jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_shardings),
                             out_shardings=(setup.state_shardings, partitioner.replicated), donate_argnums=(0,))
    eval_fn = jax.jit(lambda p, b: model.loss_fn(p, b, None)[1], in_shardings=(setup.param_shardings, batch_shardings))

    writer = metric_writers.create_default_writer(model_dir, just_logging=not is_main, collection="train")
    eval_writer = metric_writers.create_default_writer(model_dir, just_logging=not is_main, collection="training_eval")
    flops_per_token = perf.train_flops_per_token(cfg, length)
    peak, peak_source = perf.peak_flops_per_device(peak_flops)
    n_devices = len(partitioner.mesh.devices.flat)
    total_peak = peak if jax.devices()[0].platform == "cpu" else peak * n_devices  # CPU "devices" share the cores
    logging.info("MFU reference: %.3g FLOP/s (%s); %.3g model FLOPs per token", total_peak, peak_source, flops_per_token)

    data = utils.batches(utils.get_dataset(train_dataset_cfg, partitioner.data_parallel_size, skip_batches=start,
                                           shard=partitioner.data_shard(train_dataset_cfg.batch_size)))
    pending: list[dict] = []
    last_metrics: dict = {}
    nonfinite_run = 0
    prev_skipped = None
    t_start = t_last = time.time()
    step_last = start
    step = start
    with _Preemption() as preemption:
        for step in range(start + 1, total_steps + 1):
            if profile_steps and step == profile_steps[0]:
                jax.profiler.start_trace(os.path.join(model_dir, "profile"))
            try:
                local = next(data)
            except StopIteration:
                what = "is empty (or smaller than one batch)" if step == start + 1 and not start else f"ran out at step {step}"
                raise ValueError(
                    f"The '{train_dataset_cfg.split}' split of {train_dataset_cfg.mixture_or_task_name} {what}; "
                    f"BATCH_SIZE={train_dataset_cfg.batch_size}. Check the data files or lower the batch size."
                ) from None
            with partitioner.activate():
                state, metrics = train_step(state, partitioner.global_batch(local))
            pending.append(metrics)
            if profile_steps and step == profile_steps[0] + profile_steps[1] - 1:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()

            preemption.check(step)
            log_now = step % stats_period == 0 or step == total_steps or preemption.requested
            # The previous step's flag is ready by now: checking it does not stall the pipeline.
            if prev_skipped is not None:
                nonfinite_run = nonfinite_run + 1 if float(jax.device_get(prev_skipped)) else 0
            prev_skipped = metrics["skipped"]
            if nonfinite_run >= max_consecutive_nonfinite:
                ckpt.close()
                raise FloatingPointError(
                    f"{nonfinite_run} consecutive steps had a non-finite loss or gradient (last: step {step - 1}); "
                    "those steps left parameters and optimizer state untouched and the last checkpoint is intact. "
                    "Lower the learning rate or the AGC clipping threshold, or check the data."
                )
            if log_now:
                fetched = jax.device_get(pending)
                pending = []
                now = time.time()
                tokens = sum(float(m["tokens"]) for m in fetched)
                summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k not in ("tokens", "skipped")}
                summary["skipped_steps"] = float(sum(m["skipped"] for m in fetched))
                tps = tokens / max(now - t_last, 1e-9)
                summary["tokens_per_second"] = tps
                summary["mfu"] = flops_per_token * tps / total_peak
                summary["learning_rate"] = float(_learning_rate(optimizer, step))
                writer.write_scalars(step, summary)
                eta = (total_steps - step) * (now - t_start) / max(step - start, 1)
                logging.info(
                    "step %d/%d  loss %.4f  %s  tokens/s %.0f  MFU %.1f%%  ETA %s",
                    step, total_steps, summary["loss"],
                    f"bits/byte {summary['bits_per_byte']:.3f}" if "bits_per_byte" in summary else f"bits/token {summary['bits_per_token']:.3f}",
                    tps, 100 * summary["mfu"], _fmt_seconds(eta),
                )
                last_metrics = summary
                t_last, step_last = now, step

            if train_eval_dataset_cfg is not None and eval_period and (step % eval_period == 0 or step == total_steps):
                ev = evaluate(model, state["params"], train_eval_dataset_cfg, partitioner, eval_steps, eval_fn)
                eval_writer.write_scalars(step, ev)
                logging.info("eval step %d: %s", step, _fmt_metrics(ev))
                last_metrics = dict(last_metrics, **{f"eval/{k}": v for k, v in ev.items()})

            if ckpt.should_save(step) or step == total_steps or preemption.requested:
                ckpt.save(step, state)
            if preemption.requested:
                logging.warning("Saved step %d after SIGTERM; rerun the same command to resume.", step)
                break
    ckpt.close()
    writer.flush()
    eval_writer.flush()
    return step, last_metrics


def _learning_rate(optimizer: Callable, step: int) -> float:
    try:
        bound = gin.get_bindings(optimizer)
    except (ValueError, TypeError):
        bound = {}
    get = lambda k: bound.get(k, _default_arg(optimizer, k))  # noqa: E731
    try:
        schedule = optim.make_schedule(get("schedule"), get("learning_rate"), get("warmup_steps"), get("total_steps"))
    except (TypeError, ValueError):
        return float("nan")
    return float(schedule(step))


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_metrics(m: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in sorted(m.items()))


def main(argv):
    del argv
    from olmax import multihost

    multihost.initialize_from_flags()
    gin_utils.parse_from_flags(run_file="runs/pretrain.gin")
    train()


def console_main():
    gin_utils.run(main)


if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy, so Gin binds one `train`.
    from olmax import train as _train

    _train.console_main()
