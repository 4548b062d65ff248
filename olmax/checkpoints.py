"""Checkpoints with orbax: async saves, keep the last N, resume, and never load a bad one.

A checkpoint is a directory `<model_dir>/<step>/` holding two orbax items:
  state: the train state pytree (step, params, opt_state), sharded arrays;
  meta:  JSON: the model config, parameter shapes, vocabulary size and data position.
Orbax writes into a temporary directory and renames it when complete, so a process
killed mid-save leaves no step directory that looks finished. A checkpoint that
still fails to load (truncated files, wrong shapes) is skipped with a warning and
the previous one is used; a config mismatch stops with an error naming both sides.
Nothing here unpickles: orbax stores arrays with tensorstore and metadata as JSON.
"""
from __future__ import annotations

import asyncio
import logging as logging_std
import os
import sys
import warnings
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging

from olmax import config as config_lib
from olmax import multihost, utils


def tree_shapes(tree: Any) -> dict[str, list[int]]:
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class CheckpointMismatchError(ValueError):
    pass


class CheckpointSaveError(RuntimeError):
    """A save failed (a full disk, no write permission): the run must stop, the message says why."""


def hide_closed_event_loop_reports() -> None:
    """After a background save or a read fails, orbax closes its event loop while tensorstore
    still calls back into it; each callback reports 'RuntimeError: Event loop is closed' (through
    sys.excepthook, threading.excepthook or sys.unraisablehook, depending on the thread):
    hundreds of tracebacks after a full disk. They say nothing the save error does not, so
    they are dropped; every other report passes through."""
    import threading

    if getattr(sys.excepthook, "olmax_hides_closed_loops", False):
        return

    def closed_loop(kind, value) -> bool:
        return kind is RuntimeError and str(value) == "Event loop is closed"

    previous, previous_thread, previous_unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook

    def hook(kind, value, tb):
        if not closed_loop(kind, value):
            previous(kind, value, tb)

    def thread_hook(args):
        if not closed_loop(args.exc_type, args.exc_value):
            previous_thread(args)

    def unraisable_hook(args):
        if not closed_loop(args.exc_type, args.exc_value):
            previous_unraisable(args)

    hook.olmax_hides_closed_loops = True
    sys.excepthook, threading.excepthook, sys.unraisablehook = hook, thread_hook, unraisable_hook


class Checkpointer:
    """Saves and restores the train state under `directory`.

    Args:
      directory: MODEL_DIR (local path or any path orbax/etils supports, e.g. gs://).
      save_cfg: period / keep / async; None makes a read-only checkpointer.
      meta: JSON-able description of the run, compared on restore ('shapes',
        'vocab_size' must match; the rest is informational).
    """

    def __init__(self, directory: str, save_cfg: utils.SaveCheckpointConfig | None, meta: dict):
        directory = os.fspath(directory)
        # orbax needs absolute paths; MODEL_DIR='runs/x' is relative to the working directory.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.save_cfg = save_cfg
        self.meta = meta
        options = ocp.CheckpointManagerOptions(
            max_to_keep=save_cfg.keep if save_cfg else None,
            enable_async_checkpointing=bool(save_cfg and save_cfg.async_save),
            read_only=save_cfg is None,
            create=save_cfg is not None,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        if save_cfg is not None:
            hide_closed_event_loop_reports()
            _quiet_abandoned_tasks()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return bool(self.save_cfg) and step % self.save_cfg.period == 0

    def save(self, step: int, state: Any) -> None:
        """Starts an (async) save of `state` at `step`; returns before it completes.
        Raises CheckpointSaveError if this or an earlier background save failed."""
        meta = dict(self.meta, step=int(step))
        try:
            self.manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:  # noqa: BLE001  orbax raises what the filesystem raised, wrapped
            raise self._save_error(e) from None

    def check(self) -> None:
        """Raises CheckpointSaveError as soon as a background save has failed (does not wait)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(e) from None

    def _save_error(self, e: Exception) -> CheckpointSaveError:
        text = str(e)
        cause = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        full = any(s in text for s in ("No space left", "RESOURCE_EXHAUSTED", "ENOSPC", "Disk quota exceeded"))
        steps = self.all_steps()
        last = f"the last complete checkpoint is step {steps[-1]}" if steps else "no checkpoint is complete"
        fix = ("the disk is full: free space or point MODEL_DIR at a larger disk" if full
               else "check that MODEL_DIR is writable and has space")
        return CheckpointSaveError(f"Saving a checkpoint to {self.directory} failed, so the run stops: {fix}, then "
                                   f"rerun the same command to resume ({last}). Cause: {cause[:300]}")

    def close(self) -> None:
        """Waits for pending saves, then releases the manager; raises CheckpointSaveError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(e) from None
        finally:
            self.manager.close()

    def abandon(self) -> None:
        """close() for a run that is already failing: errors of pending saves are not raised again."""
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, meta: dict) -> None:
        """Raises CheckpointMismatchError when the checkpoint at `step` cannot hold this model."""
        where = os.path.join(self.directory, str(step))
        if meta.get("vocab_size") != self.meta.get("vocab_size"):
            raise CheckpointMismatchError(
                f"Checkpoint {where} was trained with vocab_size={meta.get('vocab_size')} but the model has "
                f"vocab_size={self.meta.get('vocab_size')}; use the same vocabulary and OlmaxConfig.vocab_size."
            )
        changed = function_changes(meta.get("config", {}), self.meta.get("config", {}))
        warning, change = forget_bound_change(meta, self.meta)
        if warning:
            logging.warning("Checkpoint %s: %s", where, warning)
        changed += [change] if change else []
        if changed:
            raise CheckpointMismatchError(
                f"Checkpoint {where} was trained as another function than this model computes, with the same "
                f"parameter shapes: {'; '.join(changed)}. Bind the checkpoint's values (gin) to restore it."
            )
        mismatch = first_shape_mismatch(meta.get("shapes", {}), self.meta.get("shapes", {}))
        if mismatch:
            name, saved, want = mismatch
            raise CheckpointMismatchError(
                f"Checkpoint {where} does not match the model: parameter {name} has shape "
                f"{saved} in the checkpoint and {want} in the model "
                "(missing = None). Use the gin model file the checkpoint was trained with."
            )

    def restore(self, step: int, abstract_state: Any, partial: bool = False) -> tuple[Any, dict]:
        """Restores `step` into the shapes/shardings of `abstract_state` (ShapeDtypeStructs).

        partial: `abstract_state` names a subset of the saved tree (e.g. params only).
        """
        meta = self.read_meta(step)
        self.check_compatible(step, meta)
        if partial:
            args = ocp.args.PyTreeRestore(
                item=abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                partial_restore=True,
            )
        else:
            args = ocp.args.StandardRestore(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
        return restored["state"], meta

    def restore_latest(self, abstract_state: Any, max_step: int | None = None) -> tuple[Any, dict] | None:
        """The newest checkpoint that loads; skips (with a warning) any that does not.

        A config mismatch is not skipped: it means the wrong model, not a bad file.
        """
        steps = [s for s in reversed(self.all_steps()) if max_step is None or s <= max_step]
        found = self.restore_first_readable(steps, abstract_state)
        return None if found is None else found[1:]

    def restore_first_readable(self, steps: Sequence[int], abstract_state: Any, partial: bool = False,
                               when_none_left: str = "no earlier checkpoint is left") -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the first of `steps` that loads, or None when none does.

        The one rule for every binary: a checkpoint that fails to load (truncated or
        corrupt files) is named in a warning, set aside when this checkpointer may write
        (training), left in place otherwise (eval, infer), and the next step is tried.
        A config mismatch is raised: it means the wrong model, not a bad file.
        """
        # Before the first read: a failed read's siblings can be reported while that read
        # is still raising, before the except below runs (CI saw one such traceback).
        _quiet_abandoned_tasks()
        for i, step in enumerate(steps):
            try:
                state, meta = self.restore(step, abstract_state, partial=partial)
                return step, state, meta
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001  tensorstore, JSON and orbax errors of a damaged checkpoint
                moved = self._set_aside(step)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else when_none_left
                where = "" if moved == "(left in place)" else f"moved it to {moved}; "
                logging.warning("Checkpoint %s/%d is unreadable (could not be loaded: %s); %s%s.",
                                self.directory, step, reason[:300], where, nxt)
        return None

    def _set_aside(self, step: int) -> str:
        """Renames a bad checkpoint out of the way (kept for inspection, never deleted),
        so it is not found again and a new save of that step does not collide with it."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.corrupt"
        if self.save_cfg is None or not multihost.is_main_process() or "://" in src:
            return "(left in place)"
        n = 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}.corrupt{n}"
        os.rename(src, dst)
        self.manager.reload()
        return dst


class _AbandonedTasks(logging_std.Filter):
    """Drops asyncio's "Task exception was never retrieved" reports (see _quiet_abandoned_tasks)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()


def _quiet_abandoned_tasks() -> None:
    """Silences the echoes of a failed checkpoint read or write, for the rest of the process.

    Orbax reads and writes a checkpoint's arrays concurrently and raises on the first
    error; the sibling reads or writes fail the same way later, unawaited, and Python
    reports each as "Task exception was never retrieved" or "coroutine ... was never
    awaited", after the binary's own one-line error. That error (or the warning logged
    for an unreadable step) already names the cause, so these repeats are dropped, from
    before the first read and from the start in a process that saves: a failed read's or
    write's siblings can be reported before its own error reaches our code. Olmax runs
    no other asyncio tasks.
    """
    if not any(isinstance(f, _AbandonedTasks) for f in asyncio.log.logger.filters):
        asyncio.log.logger.addFilter(_AbandonedTasks())
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    _drop_unraisable_coroutine_reports()


def _drop_unraisable_coroutine_reports() -> None:
    """A sibling read's coroutine, closed by the garbage collector after the read failed, is
    reported as "Exception ignored in: <coroutine ...>" with a traceback, one per array: more
    than a hundred of them after a checkpoint with random bytes inside. Those reports are
    dropped; every other unraisable report passes through."""
    if getattr(sys.unraisablehook, "olmax_drops_coroutine_reports", False):
        return
    previous = sys.unraisablehook

    def hook(args):
        if not asyncio.iscoroutine(args.object):
            previous(args)

    hook.olmax_drops_coroutine_reports = True
    sys.unraisablehook = hook


# OlmaxConfig fields that change what trained parameters compute while leaving every shape as
# it was, so that the shape check cannot see them. The rest either change a shape or only how
# the same function is computed (dtype, chunk sizes, scan_layers, attention_impl, max_length
# apart from the block size it implies).
_FUNCTION_FIELDS = ("mixer", "reversible", "norm", "placement", "activation", "blocks")


def _block_size(config: dict) -> int | None:
    """K of a run's config as a checkpoint records it (every field a string): mixer_block, or
    the block size max_length implies when it is None; None if the config does not say."""
    try:
        block = config.get("mixer_block", "None")
        return config_lib.OlmaxConfig(max_length=int(config["max_length"]),
                                      mixer_block=None if block == "None" else int(block)).block_size
    except (KeyError, ValueError):
        return None


def function_changes(saved: dict, current: dict) -> list[str]:
    """What differs, as 'field saved -> current' with the gin binding that restores it, between the
    config a checkpoint was trained with and the model's (both as run_meta records them). Empty if
    either side records no config (checkpoints written before configs were recorded)."""
    if not saved or not current:
        return []
    changes = [f"{k} {saved[k]} -> {current[k]} (network.OlmaxConfig.{k})" for k in _FUNCTION_FIELDS
               if k in saved and k in current and saved[k] != current[k]]
    # The recall mixer's window and blocks are K wide; its parameters do not depend on K, so a
    # run restored with another max_length (and mixer_block None) would compute another function.
    k_saved, k_now = _block_size(saved), _block_size(current)
    if saved.get("mixer") in ("recall", "axial") and k_saved and k_now and k_saved != k_now:
        changes.append(f"mixer block size K {k_saved} -> {k_now} (max_length {saved.get('max_length')} -> "
                       f"{current.get('max_length')}, mixer_block {saved.get('mixer_block')} -> "
                       f"{current.get('mixer_block')}; keep K with network.OlmaxConfig.mixer_block = {k_saved})")
    return changes


def forget_bound_change(saved: dict, current: dict) -> tuple[str | None, str | None]:
    """(warning, change) about the recall decay's bound (mixers.MAX_FORGET_RATE, recorded by
    run_meta as `recall_forget_bound`) between a checkpoint's meta and the model's: a recall-mixer
    checkpoint that records a config but no bound was trained before there was one (restored, with
    a warning: only heads that learned to forget faster than ~0.1 nats a token decay differently);
    one that records another bound computes another function (a change: refused)."""
    now = current.get("recall_forget_bound")
    if now is None or current.get("config", {}).get("mixer") != "recall" or not saved.get("config"):
        return None, None
    was = saved.get("recall_forget_bound")
    if was is None:
        return (f"trained before the recall decay's forget rate was bounded ({now} nats a token); heads that "
                "learned to forget faster now forget at most that fast: evaluate it before relying on it."), None
    if was != now:
        return None, (f"recall decay's forget-rate bound {was} -> {now} nats a token (mixers.MAX_FORGET_RATE; "
                      "no binding: restore it with the Olmax version that trained it)")
    return None, None


def first_shape_mismatch(have: dict, want: dict) -> tuple[str, Any, Any] | None:
    """(name, shape here, shape wanted) of the first parameter whose shapes differ (None =
    missing), by name, or None when all agree. have, want: {name: shape}."""
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            return name, have.get(name), want.get(name)
    return None


class NoReadableCheckpointError(FileNotFoundError):
    pass


def restore_params(directory: str, meta: dict, abstract_params: Any, steps: Sequence[int],
                   when_none_left: str = "no earlier checkpoint is left") -> tuple[int, Any]:
    """(step, params) of the newest readable checkpoint among `steps`, read-only (eval, infer).

    Unreadable ones are skipped with a warning (see `restore_first_readable`); when
    none is left, NoReadableCheckpointError names the directory and the steps tried.
    """
    ckpt = Checkpointer(directory, None, meta)
    steps = sorted(steps, reverse=True)
    try:
        found = ckpt.restore_first_readable(steps, {"params": abstract_params}, partial=True,
                                            when_none_left=when_none_left)
    finally:
        ckpt.close()
    if found is None:
        tried = ", ".join(str(s) for s in steps)
        raise NoReadableCheckpointError(
            f"No readable checkpoint left in {ckpt.directory}: step{'s' if len(steps) > 1 else ''} {tried} could not "
            "be loaded (see the warnings above). Point CHECKPOINT_PATH at a MODEL_DIR with an intact checkpoint."
        )
    step, state, _ = found
    return step, state["params"]


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings, the restore target orbax needs."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
