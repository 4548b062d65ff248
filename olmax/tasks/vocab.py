"""Vocabularies: bytes, or a SentencePiece model from a local (or gs://) path.

* `byte_vocabulary()`: `seqio.ByteVocabulary`, ids 0=PAD, 1=EOS, 2=UNK, then the
  256 byte values at 3..258, so `vocab_size == 259`. Models should size their
  embedding with `BYTE_VOCAB_SIZE` (384): 259 rounded up to a multiple of 128,
  which keeps the embedding and logits matmuls aligned on TPU / GPU tiles. Ids
  259..383 are never produced by the data.
* `spm_vocabulary(path)`: `seqio.SentencePieceVocabulary`, checked to exist. Train
  one with `python -m olmax.tasks.train_spm` (ids follow the T5 convention: 0=PAD,
  1=EOS, 2=UNK, no BOS).
* `get_vocabulary(spec)`: 'byte' / None / a `.model` path / a Vocabulary.
* Tasks registered at import time (`text_files`, `c4_en_spm`) take their
  vocabulary from Gin or the environment, known only after the trainer has
  parsed its flags: they hold a function returning the vocabulary, called when
  the task's `output_features` are read (see `registry.LazyVocabularyTask`).
"""

from __future__ import annotations

import os
import threading
from typing import Dict, Optional, Union

import gin
import seqio

#: Environment variable naming the SentencePiece model of `c4_en_spm`.
SPM_MODEL_ENV = "OLMAX_SPM_MODEL"

VocabularySpec = Union[None, str, os.PathLike, seqio.Vocabulary]


def padded_vocab_size(vocabulary_or_size, multiple: int = 128) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (embedding rows)."""
    size = getattr(vocabulary_or_size, "vocab_size", vocabulary_or_size)
    return -(-int(size) // multiple) * multiple


_BYTE_VOCABULARY = seqio.ByteVocabulary()

#: Ids the byte vocabulary produces (PAD, EOS, UNK + 256 bytes).
BYTE_VOCAB_IDS = _BYTE_VOCABULARY.vocab_size  # 259
#: Embedding size for byte-level models: 259 padded to a multiple of 128.
BYTE_VOCAB_SIZE = padded_vocab_size(BYTE_VOCAB_IDS)  # 384


def byte_vocabulary() -> seqio.ByteVocabulary:
    """The shared byte vocabulary (all byte tasks use this one object)."""
    return _BYTE_VOCABULARY


_SPM_CACHE: Dict[str, seqio.SentencePieceVocabulary] = {}
_SPM_LOCK = threading.Lock()


def _normalize_path(path) -> str:
    path = os.fsdecode(path)
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def spm_vocabulary(path) -> seqio.SentencePieceVocabulary:
    """A `seqio.SentencePieceVocabulary` for the model file at `path`.

    Raises:
      FileNotFoundError: when there is no file at `path`, with how to make one.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    path = _normalize_path(path)
    with _SPM_LOCK:
        if path in _SPM_CACHE:
            return _SPM_CACHE[path]
        if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
            raise FileNotFoundError(
                f"SentencePiece model not found: {path!r}. Train one on local text "
                "with `python -m olmax.tasks.train_spm --input 'data/*.txt' "
                "--vocab_size 8000 --model_prefix out/spm` (then use out/spm.model), "
                "or use the byte vocabulary ('byte')."
            )
        vocab = seqio.SentencePieceVocabulary(path)
        _SPM_CACHE[path] = vocab
        return vocab


def get_vocabulary(spec: VocabularySpec) -> seqio.Vocabulary:
    """Resolves a vocabulary spec now.

    Args:
      spec: None or 'byte'/'bytes' for the byte vocabulary; a path to a
        SentencePiece `.model` file; or a `seqio.Vocabulary`, returned as is.
    """
    if spec is None:
        return byte_vocabulary()
    if isinstance(spec, seqio.Vocabulary):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = os.fsdecode(spec).strip()
        if text.lower() in ("byte", "bytes"):
            return byte_vocabulary()
        if text:
            return spm_vocabulary(text)
    raise ValueError(
        f"Unknown vocabulary {spec!r}: use 'byte', the path of a SentencePiece "
        "'.model' file, or a seqio.Vocabulary."
    )


@gin.configurable("spm_model", module="olmax_tasks")
def spm_model_path(path: Optional[str] = None) -> str:
    """The SentencePiece model of the `*_spm` tasks.

    Set it with Gin, `--gin.olmax_tasks.spm_model.path="'/data/spm.model'"`, or
    with the environment variable OLMAX_SPM_MODEL (Gin wins). Read when the
    dataset is built / the vocabulary first used.
    """
    path = path or os.environ.get(SPM_MODEL_ENV, "").strip()
    if not path:
        raise ValueError(
            "No SentencePiece model configured for the *_spm tasks: set "
            f"{SPM_MODEL_ENV}=/path/spm.model or "
            "--gin.olmax_tasks.spm_model.path=\"'/path/spm.model'\" (train one "
            "with `python -m olmax.tasks.train_spm`)."
        )
    return path


def default_spm_vocabulary() -> seqio.SentencePieceVocabulary:
    """The vocabulary of the `*_spm` tasks: `spm_vocabulary(spm_model_path())`."""
    return spm_vocabulary(spm_model_path())


def task_vocabulary(spec: VocabularySpec):
    """What a task registered now should hold for `spec`.

    The byte vocabulary or a given seqio.Vocabulary as is; for a SentencePiece
    path, a zero-argument function resolving it later (see
    `registry.LazyVocabularyTask`), so a missing file is reported when the
    vocabulary is first needed rather than at registration.
    """
    if spec is None or isinstance(spec, seqio.Vocabulary):
        return get_vocabulary(spec)
    if os.fsdecode(spec).strip().lower() in ("byte", "bytes"):
        return byte_vocabulary()
    return lambda: get_vocabulary(spec)
