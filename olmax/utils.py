"""Gin-facing configs (T5X names) and the input pipeline: seqio task -> global batches.

`DatasetConfig`, `SaveCheckpointConfig` and `RestoreCheckpointConfig` carry the
same fields T5X's do, so run files read the same. Each process reads only its
shard of the data (seqio.ShardInfo by process index) and contributes its rows to
the global batch.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from olmax import tasks, validation


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """What to read: a seqio task or mixture, a split, lengths and the global batch size."""

    mixture_or_task_name: str = gin.REQUIRED
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED
    split: str = "train"
    batch_size: int = gin.REQUIRED  # global, over all processes
    shuffle: bool = True
    seed: int | None = 0
    use_cached: bool = False
    pack: bool = True
    module: str | Sequence[str] | None = None  # MIXTURE_OR_TASK_MODULE

    def __post_init__(self):
        validation.required(self.mixture_or_task_name, "utils.DatasetConfig.mixture_or_task_name",
                            macro="MIXTURE_OR_TASK_NAME", example="olmax_stdlib")
        validation.integer(self.batch_size, "utils.DatasetConfig.batch_size", minimum=1, macro="BATCH_SIZE")
        validation.feature_lengths(self.task_feature_lengths)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
    period: int = 1000  # save every `period` steps (and at the end)
    keep: int | None = 3  # keep the last `keep` checkpoints (None: all)
    async_save: bool = True

    def __post_init__(self):
        validation.integer(self.period, "utils.SaveCheckpointConfig.period", minimum=1, example=1000)
        validation.integer(self.keep, "utils.SaveCheckpointConfig.keep", minimum=1, example=3, allow_none=True)


RESTORE_MODES = ("latest", "specific", "all")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
    """Where to start from. `path` None: the latest checkpoint in MODEL_DIR, if any.

    mode: "latest" (the newest checkpoint under `path`), "specific" (the one of `step`)
    or "all" (eval: every checkpoint, in order). The model must match the checkpoint
    (shapes and vocabulary) whatever the mode: a mismatch is an error naming both sides.
    """

    path: str | None = None  # a checkpoint directory (…/<step>) or a directory of them
    step: int | None = None
    mode: str = "latest"

    def __post_init__(self):
        validation.integer(self.step, "utils.RestoreCheckpointConfig.step", minimum=0, example=1000, allow_none=True)
        validation.choice(self.mode, "utils.RestoreCheckpointConfig.mode", RESTORE_MODES)
        if self.mode == "specific" and self.step is None:
            raise ValueError("RestoreCheckpointConfig.mode='specific' needs a step: set "
                             "--gin.utils.RestoreCheckpointConfig.step=N (or point CHECKPOINT_PATH at MODEL_DIR/N).")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save: SaveCheckpointConfig | None = SaveCheckpointConfig()
    restore: RestoreCheckpointConfig | None = RestoreCheckpointConfig()


def get_task(cfg: DatasetConfig):
    tasks.import_task_module(cfg.module)
    return tasks.get_task_or_mixture(cfg.mixture_or_task_name)


def get_dataset(
    cfg: DatasetConfig,
    data_parallel_size: int = 1,
    num_epochs: int | None = None,
    shard: tuple[int, int] | None = None,
) -> tf.data.Dataset:
    """This process's batches: dicts of [global_batch / shard count, length] int32.

    `shard` is (index, count), `PjitPartitioner.data_shard`: the slice of each
    global batch this process feeds (default: one shard per process). With
    `shuffle` the order depends only on `seed`, so skipping n batches (`ds.skip(n)`)
    reproduces the position of a run that consumed n batches (resume).
    """
    if cfg.batch_size % max(1, data_parallel_size):
        raise ValueError(
            f"BATCH_SIZE={cfg.batch_size} is not divisible by the data-parallel size "
            f"{data_parallel_size}; use a multiple of {data_parallel_size} or change num_partitions."
        )
    shard_index, shard_count = shard if shard is not None else (jax.process_index(), jax.process_count())
    if cfg.batch_size % shard_count:
        raise ValueError(f"BATCH_SIZE={cfg.batch_size} must be divisible by the {shard_count} data shards (hosts).")
    task = get_task(cfg)
    shard_info = seqio.ShardInfo(index=shard_index, num_shards=shard_count)
    try:
        ds = task.get_dataset(
            sequence_length=dict(cfg.task_feature_lengths),
            split=cfg.split,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            use_cached=cfg.use_cached,
            shard_info=shard_info,
            num_epochs=num_epochs,
        )
    except KeyError as e:  # TFDS: "`splits` is empty ... has not been generated yet"
        if "not been generated" not in str(e):
            raise
        tfds_name = getattr(getattr(getattr(task, "source", None), "tfds_dataset", None), "name", None) or "NAME"
        raise FileNotFoundError(
            f"Task {cfg.mixture_or_task_name!r} reads the TFDS dataset {tfds_name}, which is not prepared in the TFDS "
            f"data directory; build it first (`tfds build {tfds_name.split(':')[0]} --data_dir=DIR`) and pass "
            "--tfds_data_dir=DIR."
        ) from None
    converter = seqio.DecoderFeatureConverter(pack=cfg.pack)
    ds = converter(ds, dict(cfg.task_feature_lengths))
    ds = ds.batch(cfg.batch_size // shard_count, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    for batch in ds.as_numpy_iterator():
        yield {k: np.asarray(v, np.int32) for k, v in batch.items()}


def check_lengths(cfg: DatasetConfig, max_length: int) -> None:
    length = cfg.task_feature_lengths.get("targets")
    if length is not None and length > max_length:
        raise ValueError(
            f"TASK_FEATURE_LENGTHS targets={length} exceeds the model's max_length={max_length}; "
            f"lower it or set network.OlmaxConfig.max_length >= {length}."
        )
