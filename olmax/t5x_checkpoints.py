r"""Checkpoints across Olmax and upstream T5X (without importing t5x).

Both write orbax checkpoints of the same parameter tree (T5X's DecoderOnlyModel
holds an `olmax.network.Olmax` module), in different layouts:

    Olmax  <model_dir>/<step>/state            {'params', 'opt_state', 'step'}
           <model_dir>/<step>/meta             JSON: config, shapes, vocabulary size
    T5X    <model_dir>/checkpoint_<step>/state {'target': params,
                                                'state': {'step', 'param_states'}}

* T5X -> Olmax: `olmax.eval` and `olmax.infer` take a T5X checkpoint as
  CHECKPOINT_PATH (a `checkpoint_<step>` directory, or a T5X MODEL_DIR for its
  latest); `read_params` restores its `target` into the Olmax model's shapes.
* Olmax -> T5X: `python -m olmax.t5x_checkpoints --checkpoint=MODEL_DIR/<step>
  --output=DIR` writes DIR/checkpoint_<step> with the parameters and the step and
  no optimizer state (the two optimizer-state trees differ in layout). T5X's
  infer.py and eval.py restore only parameters and read it as is (tested);
  resuming T5X training from it is not supported (no optimizer state).
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

from olmax import checkpoints

PREFIX = "checkpoint_"
_STEP_DIR = re.compile(rf"^{PREFIX}(\d+)$")


def step_of(path: str) -> int | None:
    """The step of a T5X checkpoint directory (`.../checkpoint_<step>` holding `state`), else None."""
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if match and os.path.isdir(os.path.join(path, "state")):
        return int(match.group(1))
    return None


def steps(directory: str) -> list[int]:
    """Sorted steps of the T5X checkpoints in `directory` (a T5X MODEL_DIR)."""
    if not os.path.isdir(directory):
        return []
    found = (step_of(os.path.join(directory, d)) for d in os.listdir(directory))
    return sorted(s for s in found if s is not None)


def step_dir(directory: str, step: int) -> str:
    return os.path.join(os.path.abspath(directory), f"{PREFIX}{step}")


def _shapes(tree: Any) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def read_params(path: str, abstract_params: Any) -> Any:
    """The parameters (`target`) of the T5X checkpoint at `path` (`.../checkpoint_<step>`).

    abstract_params: ShapeDtypeStructs (with shardings) of the Olmax model's params;
    the restored arrays get their dtypes and shardings. Raises ValueError naming the
    first parameter whose shape differs (the checkpoint is of another config).
    """
    state_dir = os.path.join(os.path.abspath(path), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(state_dir).item_metadata.tree
    if "target" not in saved:
        raise ValueError(f"{path} is not a T5X checkpoint: its state has no 'target' (keys {sorted(saved)}).")
    mismatch = checkpoints.first_shape_mismatch(_shapes(saved["target"]), _shapes(abstract_params))
    if mismatch:
        name, have, want = mismatch
        raise ValueError(
            f"T5X checkpoint {path} does not match the model: parameter {name} has shape {have} "
            f"there and {want} in the model (None = missing). Use the network.OlmaxConfig of the "
            "gin/t5x file it was trained with."
        )
    item = {"target": abstract_params}
    restored = checkpointer.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        ),
    )
    return restored["target"]


def export(checkpoint: str, output: str) -> str:
    """Writes the Olmax checkpoint `<model_dir>/<step>` as `output/checkpoint_<step>` for T5X.

    Returns the written directory. Only the parameters and the step are exported.
    """
    checkpoint = os.path.abspath(checkpoint)
    step = os.path.basename(os.path.normpath(checkpoint))
    if not step.isdigit() or not os.path.isdir(os.path.join(checkpoint, "state")):
        raise FileNotFoundError(f"--checkpoint={checkpoint!r} is not an Olmax checkpoint (a MODEL_DIR/<step> "
                                "directory holding 'state').")
    state_dir = os.path.join(checkpoint, "state")
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(state_dir).item_metadata.tree
    item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved["params"])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    params = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )["params"]
    tree = {"target": params, "state": {"step": np.asarray(int(step), np.int32)}}
    manager = ocp.CheckpointManager(
        os.path.abspath(output), options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"), item_names=("state",)
    )
    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)), force=True)
    manager.wait_until_finished()
    manager.close()
    return step_dir(output, int(step))


def main(argv):
    del argv
    fl = flags.FLAGS
    print(export(fl.checkpoint, fl.output), flush=True)


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "The Olmax checkpoint to export: MODEL_DIR/<step>.", required=True)
    flags.DEFINE_string("output", None, "Directory to write checkpoint_<step> into (a T5X MODEL_DIR).", required=True)
    app.run(main)
