"""TFDS-backed LM tasks, for users who have the data prepared.

    task         TFDS dataset   splits (Olmax -> TFDS)             vocabulary
    c4_en_bytes  c4/en:3.1.0    train, validation                  bytes
    c4_en_spm    c4/en:3.1.0    train, validation                  SentencePiece (*)
    lm1b_bytes   lm1b:1.1.0     train, validation -> test          bytes

(*) the model path comes from `--gin.olmax_tasks.spm_model.path="'/x/spm.model'"`
or the environment variable OLMAX_SPM_MODEL, and is only looked at when the
dataset is built or the vocabulary first used.

Registering reads nothing: `seqio.TfdsDataSource` loads lazily. Building a
dataset reads the prepared TFDS data from `tfds_data_dir` (the binaries' flag
`--tfds_data_dir`, which sets `seqio.set_tfds_data_dir_override`, else TFDS's
default ~/tensorflow_datasets). The sources are read-only: a missing dataset is
an error, never a download. Prepare c4 with the TFDS/Beam instructions for
`c4/en:3.1.0` and lm1b with `tfds build lm1b`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import seqio

from . import registry
from . import vocab as vocab_lib

C4_TFDS_NAME = "c4/en:3.1.0"
LM1B_TFDS_NAME = "lm1b:1.1.0"
C4_SPLITS = {"train": "train", "validation": "validation"}
LM1B_SPLITS = {"train": "train", "validation": "test"}


def register_tfds_text_task(
    name: str,
    tfds_name: str,
    vocabulary: registry.VocabularyOrFn,
    splits: Mapping[str, str],
    text_key: str = "text",
    tfds_data_dir: Optional[str] = None,
) -> seqio.Task:
    """Registers (or replaces) an LM task over the text feature of a TFDS dataset."""
    source = seqio.TfdsDataSource(
        tfds_name=tfds_name,
        tfds_data_dir=tfds_data_dir,
        splits=dict(splits),
        read_only=True,
    )
    return registry.add_lm_task(
        name, source, vocabulary, text_key=text_key, cache_placeholder=True
    )


def register_tfds_tasks(tfds_data_dir: Optional[str] = None) -> None:
    """Registers c4_en_bytes, c4_en_spm and lm1b_bytes."""
    byte_vocab = vocab_lib.byte_vocabulary()
    register_tfds_text_task(
        "c4_en_bytes", C4_TFDS_NAME, byte_vocab, C4_SPLITS, tfds_data_dir=tfds_data_dir
    )
    register_tfds_text_task(
        "c4_en_spm",
        C4_TFDS_NAME,
        vocab_lib.default_spm_vocabulary,  # Called when needed.
        C4_SPLITS,
        tfds_data_dir=tfds_data_dir,
    )
    register_tfds_text_task(
        "lm1b_bytes", LM1B_TFDS_NAME, byte_vocab, LM1B_SPLITS, tfds_data_dir=tfds_data_dir
    )


register_tfds_tasks()
