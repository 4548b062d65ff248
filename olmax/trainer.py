"""The training library under the binaries: state set-up, compiled steps, evaluation, checks.

train.py, eval.py, infer.py, plan.py and benchmarks/ build on this module and never on
each other (T5X splits its trainer.py / utils.py from its binaries the same way):

  TrainSetup          shapes, logical axes and shardings of the train state, its init
                      directly into the shardings, its abstract (restore) form;
  make_steps          the one place the jitted steps are built: the donated, sharded
                      train step (gradient accumulation, skip of non-finite steps) and
                      the eval and score steps;
  evaluate            token-weighted validation metrics over a split; every process
                      stops at the same batch, so uneven shards never hang a pod;
  restore_or_init     the latest loadable checkpoint in MODEL_DIR, else CHECKPOINT_PATH,
                      else a fresh state;
  checkpoint_steps, load_params   which checkpoints eval/infer read, and their params;
  check_batch         batch size against the mesh and the microbatches;
  check_split         a split gives at least one full batch (before step 1);
  check_memory        parameters and optimizer state fit in a device (before they exist);
  metric_writer       TensorBoard events (the console gets Olmax's own short lines);
  Preemption          SIGTERM or Ctrl-C: finish the step, save, exit (twice: stop
                      without saving; three times: exit now);
  run_meta, fmt_metrics, fmt_seconds.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from clu import metric_writers

from olmax import axes, checkpoints, mixers, models, multihost, optim, partitioning, t5x_checkpoints, utils


def check_batch(batch_size: int, partitioner: partitioning.PjitPartitioner, microbatches: int = 1) -> None:
    """Raises ValueError unless the global batch splits over the data-parallel devices and microbatches."""
    partitioner.check_batch_size(batch_size)
    if microbatches < 1 or batch_size % (partitioner.data_parallel_size * microbatches):
        raise ValueError(
            f"BATCH_SIZE={batch_size} must split into {microbatches} microbatches, "
            f"each divisible by the data-parallel size {partitioner.data_parallel_size}."
        )


def run_meta(model: models.DecoderOnlyLM, param_shapes: Any) -> dict:
    """What a checkpoint records about its model (compared on restore)."""
    return {
        "vocab_size": model.config.vocab_size,
        "config": {k: str(v) for k, v in vars(model.config).items()},
        "recall_forget_bound": mixers.MAX_FORGET_RATE,  # part of the recall mixer's function (checkpoints)
        "shapes": checkpoints.tree_shapes(param_shapes),
    }


class TrainSetup:
    """Everything derived from the model, optimizer and mesh that train/eval/infer/plan share.

    `batch_shape` is (batch, length) of the decoder inputs; `optimizer` a factory taking
    `axes=` (the logical axis names), e.g. `optim.create_optimizer`; without one the
    state holds only step and params (eval, infer).
    """

    def __init__(self, model: models.DecoderOnlyLM, partitioner: partitioning.PjitPartitioner, batch_shape: tuple,
                 optimizer: Callable | None = None, random_seed: int = 0):
        self.model, self.partitioner, self.random_seed = model, partitioner, random_seed
        self._init_fn = functools.partial(model.get_initial_variables, input_shapes={"decoder_input_tokens": batch_shape})
        variables = jax.eval_shape(self._init_fn, jax.random.PRNGKey(random_seed))
        self.logical_specs = axes.logical_axes(variables)
        self.param_shapes = variables["params"]
        partitioner.check_divisible(self.param_shapes, self.logical_specs)
        self.param_shardings = partitioner.param_shardings(self.logical_specs)
        self.tx = optimizer(axes=self.logical_specs) if optimizer is not None else None
        self.state_shardings = {"step": partitioner.replicated, "params": self.param_shardings}
        if self.tx is not None:
            self.state_shardings["opt_state"] = partitioner.opt_state_shardings(self.tx, self.param_shapes,
                                                                                self.param_shardings)

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
        """The state as ShapeDtypeStructs with shardings (restore target, AOT compilation)."""
        shapes = jax.eval_shape(self._init, jax.random.PRNGKey(self.random_seed))
        return checkpoints.abstract_like(shapes, self.state_shardings)

    def checkpointer(self, directory: str, save_cfg: utils.SaveCheckpointConfig | None) -> checkpoints.Checkpointer:
        return checkpoints.Checkpointer(directory, save_cfg, run_meta(self.model, self.param_shapes))


def state_bytes_per_device(setup: TrainSetup) -> int:
    """Bytes of parameters and optimizer state one device holds: the largest shard of each
    leaf, from abstract shapes (the planner's arithmetic; nothing is allocated)."""
    leaves = jax.tree.leaves(setup.abstract_state())
    return sum(int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * x.dtype.itemsize for x in leaves)


def device_memory_bytes(device: jax.Device) -> int | None:
    """A device's memory: what its allocator may use on GPU and TPU; on CPU, the host's RAM
    shared by its simulated devices. None when neither is known."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  backends without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        try:
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
        return ram // max(len(jax.local_devices(backend="cpu")), 1)
    return None


def check_memory(setup: TrainSetup) -> None:
    """Raises ValueError, pointing to olmax.plan, when the parameters (and optimizer state) alone
    exceed a device's memory: caught here, before they are built, rather than as a compile or
    allocation that runs for many minutes and then fails."""
    device = setup.partitioner.mesh.devices.flat[0]
    available = device_memory_bytes(device)
    needed = state_bytes_per_device(setup)
    if available is None or needed <= available:
        return
    gib = 1024**3
    what = "parameters and optimizer state" if setup.tx is not None else "parameters"
    raise ValueError(
        f"The model cannot fit: its {what} alone need {needed / gib:,.1f} GiB per device "
        f"({models.param_count(setup.param_shapes):,} parameters, mesh {dict(setup.partitioner.mesh.shape)}) but a "
        f"{device.platform} device has {available / gib:,.1f} GiB. Choose a smaller model (network.OlmaxConfig "
        "features, depth) or more devices and model parallelism (partitioning.PjitPartitioner.num_partitions); "
        "`python -m olmax.plan --gin_file=... --mesh data=D,model=M` shows what fits."
    )


def metric_writer(logdir: str, collection: str):
    """TensorBoard events under logdir/collection, written by process 0 only. No console
    copy: CLU's default writer logs every metric on one long line, after the binaries' own
    short line of the same step."""
    if not multihost.is_main_process():
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(os.path.join(logdir, collection))])


def _tree_where(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(model: models.DecoderOnlyLM, tx: optax.GradientTransformation, microbatches: int = 1,
                    dropout_seed: int = 0, clip_metric: Callable | None = None) -> Callable:
    """(state, batch) -> (state, metrics), not yet jitted. A non-finite loss or gradient
    leaves params and optimizer state untouched (the step is counted as skipped)."""
    use_dropout = model.config.dropout_rate > 0
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)

    def grads_of(params, batch, rng):
        if microbatches <= 1:
            (_, metrics), grads = grad_fn(params, batch, rng)
            return grads, metrics
        mbs = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)  # [m, b/m, l]

        def body(acc, xs):
            mb, i = xs
            (_, m), g = grad_fn(params, mb, None if rng is None else jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, acc, (g, m)), None

        (_, metrics0), grads0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], mbs), rng)
        zeros = jax.tree.map(jnp.zeros_like, (grads0, metrics0))
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


def agc_clip_metric(tx: Any, logical_specs: Any) -> Callable | None:
    """(grads, params) -> fraction of AGC units clipped, with the clipping the optimizer
    reports (`optim.Optimizer.agc`); None when it has no AGC or does not say."""
    agc = getattr(tx, "agc", None)
    if not agc:
        return None
    clipping, eps = agc
    return functools.partial(optim.agc_clip_fraction, clipping=clipping, eps=eps, axes=logical_specs)


def learning_rate(tx: Any, step: int) -> float | None:
    """The optimizer's learning rate at `step` (`optim.Optimizer.learning_rate`); None if it does not say."""
    schedule = getattr(tx, "learning_rate", None)
    return None if schedule is None else float(schedule(step))


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted steps of one TrainSetup (shardings from its partitioner).

    train: (state, batch) -> (state, metrics), donates the state; None without an optimizer.
    eval:  (params, batch) -> metrics of `model.loss_fn` (no dropout).
    score: (params, batch) -> [batch] log-likelihood of each row's targets.
    """

    train: Any
    eval: Any
    score: Any


def make_steps(setup: TrainSetup, microbatches: int = 1, dropout_seed: int = 0) -> Steps:
    """The one builder of compiled steps, for train, eval, infer, plan and benchmarks."""
    model, partitioner = setup.model, setup.partitioner
    data = partitioner.data_sharding
    train_step = None
    if setup.tx is not None:
        step_fn = make_train_step(model, setup.tx, microbatches, dropout_seed,
                                  agc_clip_metric(setup.tx, setup.logical_specs))
        train_step = jax.jit(step_fn, in_shardings=(setup.state_shardings, data),
                             out_shardings=(setup.state_shardings, partitioner.replicated), donate_argnums=(0,))
    eval_step = jax.jit(lambda p, b: model.loss_fn(p, b, None)[1], in_shardings=(setup.param_shardings, data))
    score_step = jax.jit(model.score_batch)
    return Steps(train_step, eval_step, score_step)


def _empty_split_error(cfg: utils.DatasetConfig) -> ValueError:
    return ValueError(
        f"The '{cfg.split}' split of {cfg.mixture_or_task_name} gives no full batch of BATCH_SIZE={cfg.batch_size}: "
        "it is empty or smaller than one batch. Give it more data (text_files: "
        "--gin.olmax_tasks.text_files.validation_patterns=\"['val/*.txt']\", or leave validation_patterns unset "
        "to hold out a share of the train files), lower BATCH_SIZE, or train without evaluation: "
        "--gin.train.train.eval_period=0."
    )


def _split_batches(cfg: utils.DatasetConfig, partitioner: partitioning.PjitPartitioner):
    ds = utils.get_dataset(dataclasses.replace(cfg, shuffle=False), partitioner.data_parallel_size, num_epochs=1,
                           shard=partitioner.data_shard(cfg.batch_size))
    return utils.batches(ds)


def check_split(cfg: utils.DatasetConfig, partitioner: partitioning.PjitPartitioner) -> None:
    """Raises ValueError (naming the fix) unless every process reads at least one full batch of `cfg`."""
    if not multihost.all_processes(next(_split_batches(cfg, partitioner), None) is not None):
        raise _empty_split_error(cfg)


def evaluate(params: Any, cfg: utils.DatasetConfig, partitioner: partitioning.PjitPartitioner, steps: int | None,
             eval_step: Callable, before_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Token-weighted mean metrics over `steps` batches of `cfg`'s split (None: the whole split).
    `before_batch` runs before each batch (the trainer's `Preemption.stop_if_aborted`).

    With several processes each reads its shard, and shards may hold different numbers
    of batches: before every batch the processes agree that all of them have one, and
    all stop at the first that does not (a process that waited for the others' next
    collective step would wait forever).
    """
    totals: dict[str, float] = {}
    weight = 0.0
    local = _split_batches(cfg, partitioner)
    for _ in range(steps if steps is not None else np.iinfo(np.int64).max):
        if before_batch is not None:
            before_batch()
        batch = next(local, None)
        if not multihost.all_processes(batch is not None):
            break
        with partitioner.activate():
            m = jax.device_get(eval_step(params, partitioner.global_batch(batch)))
        w = float(m["tokens"])
        weight += w
        for k, v in m.items():
            if k != "tokens":
                totals[k] = totals.get(k, 0.0) + float(v) * w
    if not weight:
        raise _empty_split_error(cfg)
    out = {k: v / weight for k, v in totals.items()}
    out["perplexity"] = float(np.exp(out.get("nll", out["cross_entropy"])))  # from the mean, not a mean of exps
    out["tokens"] = weight
    return out


def restore_or_init(setup: TrainSetup, ckpt: checkpoints.Checkpointer,
                    restore_cfg: utils.RestoreCheckpointConfig | None) -> dict:
    """The latest loadable checkpoint of `ckpt` (MODEL_DIR), else of `restore_cfg.path`
    (CHECKPOINT_PATH, up to `restore_cfg.step`), else a fresh state."""
    abstract = setup.abstract_state()
    restored = ckpt.restore_latest(abstract)
    if restored is None and restore_cfg is not None and restore_cfg.path:
        source = checkpoints.Checkpointer(restore_cfg.path, None, ckpt.meta)
        restored = source.restore_latest(abstract, max_step=restore_cfg.step)
        if restored is None:
            raise FileNotFoundError(f"No loadable checkpoint in CHECKPOINT_PATH={restore_cfg.path!r}.")
    if restored is None:
        return setup.init_state()
    state, _ = restored
    logging.info("Restored step %d from %s", int(state["step"]), ckpt.directory)
    return state


def checkpoint_path(cfg: utils.RestoreCheckpointConfig, model_dir: str | None) -> str:
    """CHECKPOINT_PATH, else MODEL_DIR: where eval and infer read checkpoints."""
    path = cfg.path or model_dir
    if not path:
        raise ValueError("Set CHECKPOINT_PATH (a MODEL_DIR or a MODEL_DIR/<step>) or MODEL_DIR.")
    return path


def step_dirs(path: str) -> list[int]:
    """The steps of the complete checkpoints in `path`, sorted: Olmax's numbered directories
    with a state, else T5X's `checkpoint_<step>` ones (olmax.t5x_checkpoints)."""
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d, "state")))
    return steps or t5x_checkpoints.steps(path)


def checkpoint_dir(directory: str, step: int) -> str:
    """Olmax's `<directory>/<step>`, or T5X's `<directory>/checkpoint_<step>` when only that exists."""
    olmax_dir, t5x_dir = os.path.join(directory, str(step)), t5x_checkpoints.step_dir(directory, step)
    return t5x_dir if not os.path.isdir(olmax_dir) and os.path.isdir(t5x_dir) else olmax_dir


def checkpoint_setting(cfg: utils.RestoreCheckpointConfig) -> str:
    """The setting eval and infer read checkpoints from, as messages should name it."""
    return "CHECKPOINT_PATH" if cfg.path else "MODEL_DIR"


def _step_named_by(path: str) -> int | None:
    """The step of a path that names one checkpoint: Olmax's `<model_dir>/<step>` or T5X's
    `<model_dir>/checkpoint_<step>`; None for anything else (a MODEL_DIR)."""
    path = os.path.normpath(os.fspath(path))
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return int(base)
    return t5x_checkpoints.step_of(path)


def names_one_step(path: str, cfg: utils.RestoreCheckpointConfig) -> bool:
    """True when the user asked for one checkpoint by name (CHECKPOINT_PATH=<dir>/<step> or mode
    'specific'): that one is read or the binary fails; no other step stands in for it."""
    return cfg.mode == "specific" or _step_named_by(path) is not None


def when_none_left(path: str, cfg: utils.RestoreCheckpointConfig, setting: str) -> str:
    """What eval and infer say after an unreadable checkpoint when no step can stand in for it."""
    if names_one_step(path, cfg):
        return f"no other step is tried: {setting} asks for this one"
    return "no earlier checkpoint is left"


def checkpoint_steps(path: str, cfg: utils.RestoreCheckpointConfig,
                     setting: str = "CHECKPOINT_PATH") -> tuple[str, list[int]]:
    """(directory of checkpoints, the steps to read) for CHECKPOINT_PATH and `cfg.mode`; Olmax's
    `<model_dir>/<step>` and T5X's `<model_dir>/checkpoint_<step>` layouts both work. `setting`
    names where `path` came from in the messages."""
    path = os.path.normpath(os.fspath(path))
    step = _step_named_by(path)
    if step is not None:
        return os.path.dirname(path), [step]
    if not os.path.isdir(path):
        fix = ("point it at a MODEL_DIR or a MODEL_DIR/<step>" if setting == "CHECKPOINT_PATH"
               else "point it at a trained run's directory, or set CHECKPOINT_PATH")
        raise FileNotFoundError(f"{setting}={path!r} does not exist; {fix}.")
    steps = step_dirs(path)
    if not steps:
        raise FileNotFoundError(f"No checkpoints (numbered step directories) in {setting}={path!r}.")
    if cfg.mode == "all":
        return path, steps
    if cfg.mode == "specific":
        if cfg.step not in steps:
            raise FileNotFoundError(f"No checkpoint for step {cfg.step} in {path!r}; it has {steps}.")
        return path, [cfg.step]
    return path, [steps[-1]]


def checkpoint_candidates(path: str, cfg: utils.RestoreCheckpointConfig,
                          setting: str = "CHECKPOINT_PATH") -> tuple[str, list[list[int]]]:
    """(directory, one list per checkpoint to use: its step, then the earlier steps to fall
    back on, newest first, should it be unreadable). Mode 'all' uses each one on its own, and
    a step asked for by name (`names_one_step`) has nothing to fall back on."""
    directory, steps = checkpoint_steps(path, cfg, setting)
    if cfg.mode == "all" or names_one_step(path, cfg):
        return directory, [[s] for s in steps]
    return directory, [[s for s in reversed(step_dirs(directory)) if s <= steps[0]]]


def load_params(setup: TrainSetup, directory: str, steps: Sequence[int],
                when_none_left: str = "no earlier checkpoint is left") -> tuple[int, Any]:
    """(step, params) of the first readable checkpoint among `steps`, parameters only, into
    their shardings; unreadable ones are named and skipped (checkpoints.restore_params). A
    T5X checkpoint (`checkpoint_<step>`) is read as it is, without a fallback."""
    abstract = checkpoints.abstract_like(setup.param_shapes, setup.param_shardings)
    path = checkpoint_dir(directory, steps[0])
    if t5x_checkpoints.step_of(path) is not None:
        return steps[0], t5x_checkpoints.read_params(path, abstract)
    return checkpoints.restore_params(directory, run_meta(setup.model, setup.param_shapes), abstract, steps,
                                      when_none_left)


class Preemption:
    """SIGTERM or a first Ctrl-C -> finish the current step, checkpoint, exit cleanly;
    a second Ctrl-C -> stop before the next step (or eval batch) without saving
    (`stop_if_aborted` raises KeyboardInterrupt there); a third -> exit at once (status 130).

    The handler never raises itself: a Python signal handler also runs inside native code
    that polls for signals (jaxlib does, while a step is dispatched), and an exception
    raised there can abort the process (SIGABRT, a core dump) instead of unwinding. The
    training loop raises at its own points instead, where the exception unwinds through
    Python only. A third Ctrl-C is for a main thread stuck in native code (a long compile):
    `os._exit`, no unwinding; checkpoints are written atomically, so the saved ones stay.

    With several processes every host must stop at the same step (saving is
    collective): JAX's preemption service (started by jax.distributed) catches
    SIGTERM on any host and the hosts agree on a step, which `check` reports. A
    Python SIGTERM handler would replace the service's, so none is installed then,
    and a first Ctrl-C is passed on to the service as a SIGTERM to this process.
    """

    def __init__(self):
        self.requested = False
        self.reason = "SIGTERM"
        self._interrupts = 0
        self._previous: dict[int, Any] = {}
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

    @property
    def aborted(self) -> bool:
        """A second Ctrl-C came: stop before the next step without saving."""
        return self._interrupts >= 2

    def stop_if_aborted(self) -> None:
        """Raises KeyboardInterrupt after a second Ctrl-C: call it where unwinding is safe."""
        if self.aborted:
            raise KeyboardInterrupt("second Ctrl-C")

    def __enter__(self):
        handlers = {signal.SIGINT: self._interrupt}
        if not self._multihost:
            handlers[signal.SIGTERM] = self._terminate
        for sig, handler in handlers.items():
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _terminate(self, signum, frame):
        logging.warning("SIGTERM received: finishing this step, saving a checkpoint and exiting.")
        self.requested = True

    def _interrupt(self, signum, frame):
        self._interrupts += 1
        if self._interrupts >= 3:
            os.write(2, b"Third Ctrl-C: exiting now, without saving; the checkpoints already saved are intact.\n")
            os._exit(130)
        if self._interrupts == 2:
            logging.warning("Second Ctrl-C: stopping before the next step, without saving; press Ctrl-C a third "
                            "time to exit at once.")
            return
        logging.warning("Ctrl-C: finishing this step, saving a checkpoint and exiting; press Ctrl-C again to stop "
                        "without saving.")
        if self._multihost:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service: every host stops at one step
        else:
            self.requested, self.reason = True, "Ctrl-C"

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)


def fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_metrics(m: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in sorted(m.items()))
