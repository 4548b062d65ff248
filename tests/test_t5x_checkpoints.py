"""Checkpoints across layouts, without T5X: Olmax -> T5X layout -> back into an Olmax model.

(tests/test_t5x_interop.py checks the same files against T5X's own binaries.)
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmax import checkpoints, t5x_checkpoints, trainer, utils


def _params(scale=1.0):
    return {"decoder": {"layers": {"conv_0": {"wi": scale * jnp.arange(24.0).reshape(2, 3, 4)}}},
            "embedding": scale * jnp.ones((5, 4))}


def _save_olmax(model_dir, step, params):
    ckpt = checkpoints.Checkpointer(str(model_dir), utils.SaveCheckpointConfig(period=1, async_save=False),
                                    {"vocab_size": 5, "shapes": checkpoints.tree_shapes(params)})
    ckpt.save(step, {"step": jnp.asarray(step), "params": params, "opt_state": {"mu": params}})
    ckpt.close()


def test_export_then_read_back_and_find_steps(tmp_path):
    params = _params(0.5)
    _save_olmax(tmp_path / "olmax", 7, params)
    out = t5x_checkpoints.export(str(tmp_path / "olmax" / "7"), str(tmp_path / "t5x"))
    assert out == str(tmp_path / "t5x" / "checkpoint_7") and t5x_checkpoints.step_of(out) == 7
    assert t5x_checkpoints.steps(str(tmp_path / "t5x")) == [7]

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    restored = t5x_checkpoints.read_params(out, abstract)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)

    # olmax.eval / olmax.infer find the T5X layout from a checkpoint or a MODEL_DIR.
    cfg = utils.RestoreCheckpointConfig()
    assert trainer.checkpoint_steps(out, cfg) == (str(tmp_path / "t5x"), [7])
    assert trainer.checkpoint_steps(str(tmp_path / "t5x"), cfg) == (str(tmp_path / "t5x"), [7])
    assert trainer.checkpoint_dir(str(tmp_path / "t5x"), 7) == out
    assert trainer.checkpoint_dir(str(tmp_path / "olmax"), 7) == str(tmp_path / "olmax" / "7")


def test_layout_errors_name_the_problem(tmp_path):
    params = _params()
    _save_olmax(tmp_path / "olmax", 3, params)
    out = t5x_checkpoints.export(str(tmp_path / "olmax" / "3"), str(tmp_path / "t5x"))
    wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    wrong["embedding"] = jax.ShapeDtypeStruct((6, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"\['embedding'\] has shape \(5, 4\) there and \(6, 4\)"):
        t5x_checkpoints.read_params(out, wrong)
    with pytest.raises(FileNotFoundError, match="not an Olmax checkpoint"):
        t5x_checkpoints.export(str(tmp_path / "olmax"), str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="not a T5X checkpoint"):  # an Olmax state has no 'target'
        os.rename(tmp_path / "olmax" / "3", tmp_path / "olmax" / "checkpoint_3")
        t5x_checkpoints.read_params(str(tmp_path / "olmax" / "checkpoint_3"), wrong)
