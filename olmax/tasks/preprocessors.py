"""Preprocessing for decoder-only LM tasks.

Every Olmax LM task runs, in order:

1. `text_to_targets`: `{'text': s}` -> `{'text': s, 'targets': s}` (any other
   source feature, e.g. c4's url, is dropped).
2. `seqio.preprocessors.tokenize` (targets only; no '_pretokenized' copy).
3. [TFDS tasks only] `seqio.CacheDatasetPlaceholder()`: caching with seqio's
   cache_tasks_main is possible but never required (USE_CACHED_TASKS=False).
4. `seqio.preprocessors.append_eos`: one EOS at the end of each *document*.
5. `split_targets_to_length`: cut the token sequence into pieces of at most
   `sequence_length['targets']` tokens.

Why step 5: seqio trims every example to the sequence length, which for an LM
would throw away everything of a document after its first L tokens (most of a
source file, a book, a web page). Splitting keeps every token; the last piece
of a document ends with its EOS, and packing (`DecoderFeatureConverter(pack=True)`)
fills rows with the short tail pieces. Pieces carry only 'targets' (a copy of
a document's whole text in every piece would waste memory); without a
sequence length (`sequence_length=None`) nothing is split and 'text' is kept.
"""

from __future__ import annotations

import functools
from typing import List, Mapping, Optional

import seqio
import tensorflow as tf


def text_to_targets(dataset: tf.data.Dataset, text_key: str = "text") -> tf.data.Dataset:
    """Keeps the text under 'text' and copies it to 'targets'."""
    return dataset.map(
        lambda ex: {"text": ex[text_key], "targets": ex[text_key]},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def split_targets_to_length(
    dataset: tf.data.Dataset,
    sequence_length: Optional[Mapping[str, Optional[int]]] = None,
    feature_key: str = "targets",
) -> tf.data.Dataset:
    """Splits each token sequence into consecutive pieces of <= L tokens.

    Args:
      dataset: examples with a rank-1 int feature `feature_key`.
      sequence_length: seqio's mapping; L = sequence_length[feature_key]. When
        missing or None the dataset is returned unchanged.
      feature_key: the feature to split.

    Returns:
      A dataset of `{feature_key: piece}`, pieces in document order.
    """
    length = (sequence_length or {}).get(feature_key)
    if not length:
        return dataset
    length = int(length)

    def _pieces(example):
        tokens = example[feature_key]
        count = (tf.size(tokens, out_type=tf.int64) + length - 1) // length
        return tf.data.Dataset.range(count).map(
            lambda i: {feature_key: tokens[i * length : (i + 1) * length]}
        )

    return dataset.flat_map(_pieces)


def lm_preprocessors(text_key: str = "text", cache_placeholder: bool = False) -> List:
    """The preprocessor list described in the module docstring."""
    steps = [
        functools.partial(text_to_targets, text_key=text_key),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
    ]
    if cache_placeholder:
        steps.append(seqio.CacheDatasetPlaceholder())
    steps += [seqio.preprocessors.append_eos, split_targets_to_length]
    return steps


def lm_output_features(vocabulary: seqio.Vocabulary) -> Mapping[str, seqio.Feature]:
    """`{'targets': Feature(vocabulary, add_eos=True, dtype=int32)}`."""
    return {
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, dtype=tf.int32)
    }
