"""A seqio DataSource over local text files, resolved when the dataset is built.

`TextFileSource(files_fn)` asks `files_fn(split)` for a `SplitFiles` each time a
dataset (or its shard list) is requested, so registering a task never touches
the disk, and file patterns may come from Gin or the environment after the
task was registered. The pipeline is pure tf.data (no Python generators), so
it reads files in parallel and its iterators can be checkpointed.

Documents (`document_mode`):
  'file'       one document per file (the default). Files longer than
               `max_document_bytes` are cut at line boundaries into documents
               of about that size (each piece may exceed it by at most one
               line), so one huge file still shuffles and splits.
  'paragraph'  one document per block of text separated by blank lines.
  'line'       one document per non-blank line (streamed; for huge files).

Text is read as UTF-8 with CRLF turned into LF; blank documents are dropped. Each
example is `{'text': <document>}`.

Files that are not UTF-8 text (a binary file, UTF-16, Latin-1 or another legacy
encoding) are skipped, each with a warning on stderr naming the file and the fix,
every time they are read; in 'line' mode each such line is skipped and named. Why
skip rather than stop: the pipeline streams, so a stray file in a large glob may be
reached hours into a run, and stopping there would stop every resume at the same
point; why not decode anyway: U+FFFD replacement characters would silently become
training data. A split left empty by skipping reports the usual empty-split error.

Sharding: the source lists its files as shards, so with `shard_info` each host
reads only files[index::num_shards] (seqio falls back to sharding examples when
there are fewer files than hosts).

Content split: when `SplitFiles.validation_fraction` is set, both splits read
the same files and keep a document in 'validation' iff the FarmHash fingerprint
of its text (`tf.strings.to_hash_bucket_fast`, stable across runs and machines)
falls below the fraction. Identical documents always land in the same split.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional, Sequence

import seqio
import tensorflow as tf

DOCUMENT_MODES = ("file", "paragraph", "line")
#: Default cap on a 'file'-mode document, in bytes (see module docstring).
DEFAULT_MAX_DOCUMENT_BYTES = 256 * 1024
_HASH_BUCKETS = 1_000_000


@dataclasses.dataclass(frozen=True)
class SplitFiles:
    """What one split of a `TextFileSource` reads."""

    files: Sequence[str]
    document_mode: str = "file"
    max_document_bytes: Optional[int] = DEFAULT_MAX_DOCUMENT_BYTES
    # When set: keep only documents whose content hash puts them in this split.
    validation_fraction: Optional[float] = None
    is_validation: bool = False

    def __post_init__(self):
        check_document_mode(self.document_mode)


def check_document_mode(mode: str) -> None:
    if mode not in DOCUMENT_MODES:
        raise ValueError(
            f"Unknown document_mode {mode!r}; expected one of {DOCUMENT_MODES}"
        )


def _clean_text(text: tf.Tensor) -> tf.Tensor:
    return tf.strings.regex_replace(text, "\r\n", "\n")


def is_utf8_text(raw: tf.Tensor) -> tf.Tensor:
    """True when the bytes are valid UTF-8 without NUL bytes (those mean binary or UTF-16)."""
    decoded = tf.strings.unicode_transcode(
        raw, input_encoding="UTF-8", output_encoding="UTF-8", errors="replace"
    )
    return tf.logical_and(
        tf.equal(decoded, raw), tf.logical_not(tf.strings.regex_full_match(raw, "(?s).*\\x00.*"))
    )


def _keep_text(path: tf.Tensor, raw: tf.Tensor, what: str) -> tf.Tensor:
    """is_utf8_text(raw), printing a warning that names `path` when it is not."""
    ok = is_utf8_text(raw)

    def warn():
        tf.print(
            tf.strings.join([
                f"WARNING: skipping {what} ", path, ": not UTF-8 text (binary, UTF-16, Latin-1 or another "
                "encoding). Convert it (e.g. iconv -f latin1 -t utf-8) or leave it out of the file patterns.",
            ]),
            output_stream=sys.stderr,
        )
        return ok

    return tf.cond(ok, lambda: ok, warn)


def _chunk_at_lines(text: tf.Tensor, max_bytes: int) -> tf.Tensor:
    """Cuts a scalar string into pieces of about `max_bytes`, at line ends."""
    lines = tf.strings.split(text, "\n")
    count = tf.shape(lines)[0]
    newline = tf.where(tf.range(count) < count - 1, "\n", "")
    lines = tf.strings.join([lines, newline])
    starts = tf.cumsum(tf.strings.length(lines), exclusive=True)
    chunk_ids = tf.cast(starts // max_bytes, tf.int64)
    pieces = tf.strings.reduce_join(
        tf.RaggedTensor.from_value_rowids(lines, chunk_ids), axis=1
    )
    # A line longer than max_bytes leaves empty chunk ids behind; drop those.
    return tf.boolean_mask(pieces, tf.strings.length(pieces) > 0)


def _paragraphs(text: tf.Tensor) -> tf.Tensor:
    blocks = tf.strings.regex_replace(text, r"\n\s*\n", "\n\n")
    return tf.strings.split(blocks, "\n\n")


def _not_blank(text: tf.Tensor) -> tf.Tensor:
    return tf.logical_not(tf.strings.regex_full_match(text, r"\s*"))


def documents_dataset(
    spec: SplitFiles, shuffle: bool = False, seed: Optional[int] = None
) -> tf.data.Dataset:
    """`{'text'}` examples for `spec`; file order is sorted unless `shuffle`."""
    files = list(spec.files)
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(files, dtype=tf.string))
    if shuffle and len(files) > 1:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    if spec.document_mode == "line":
        cycle = min(16, len(files)) if shuffle else 1
        lines_of = lambda path: tf.data.TextLineDataset(path).map(lambda line: (path, line))
        if cycle > 1:
            ds = ds.interleave(
                lines_of,
                cycle_length=cycle,
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
        else:
            ds = ds.flat_map(lines_of)
        ds = ds.filter(lambda path, line: _keep_text(path, line, "a line of"))
        ds = ds.map(
            lambda path, line: tf.strings.regex_replace(_clean_text(line), "\r$", ""),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        ds = ds.map(
            lambda path: (path, tf.io.read_file(path)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.filter(lambda path, raw: _keep_text(path, raw, "file"))
        ds = ds.map(lambda path, raw: _clean_text(raw))
        if spec.document_mode == "paragraph":
            split_fn = _paragraphs
        elif spec.max_document_bytes:
            max_bytes = int(spec.max_document_bytes)
            split_fn = lambda text: _chunk_at_lines(text, max_bytes)
        else:
            split_fn = lambda text: tf.expand_dims(text, 0)
        ds = ds.flat_map(lambda text: tf.data.Dataset.from_tensor_slices(split_fn(text)))

    ds = ds.filter(_not_blank)
    if spec.validation_fraction is not None:
        threshold = int(round(spec.validation_fraction * _HASH_BUCKETS))
        want_validation = spec.is_validation

        def _in_split(text):
            bucket = tf.strings.to_hash_bucket_fast(text, _HASH_BUCKETS)
            return tf.equal(bucket < threshold, want_validation)

        ds = ds.filter(_in_split)
    return ds.map(lambda text: {"text": text})


class TextFileSource(seqio.DataSource):
    """Documents from text files chosen by `files_fn(split)` at build time."""

    def __init__(
        self,
        files_fn: Callable[[str], SplitFiles],
        splits: Sequence[str] = ("train", "validation"),
        description: str = "text files",
    ):
        self._files_fn = files_fn
        self._description = description
        super().__init__(splits=splits, num_input_examples=None, caching_permitted=True)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def _spec(self, split: str) -> SplitFiles:
        if split not in self.splits:
            raise ValueError(
                f"Unknown split {split!r} for {self._description}; "
                f"available: {list(self.splits)}"
            )
        return self._files_fn(split)

    def list_shards(self, split: str) -> Sequence[str]:
        return list(self._spec(split).files)

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: Optional[int] = None,
        shard_info: Optional[seqio.ShardInfo] = None,
        *,
        sequence_length=None,  # Unused, part of the seqio interface.
        use_cached: bool = False,  # Unused.
        num_epochs: Optional[int] = 1,  # Unused: the Task repeats.
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        spec = self._spec(split)
        if shard_info and shard_info.num_shards > 1:
            spec = dataclasses.replace(
                spec, files=list(spec.files)[shard_info.index :: shard_info.num_shards]
            )
        return documents_dataset(spec, shuffle=shuffle, seed=seed)

    def __repr__(self) -> str:
        return f"TextFileSource({self._description}, splits={list(self.splits)})"
