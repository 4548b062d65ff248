"""A small prefix-LM task with a seqio metric, for running T5X's eval and infer on Olmax.

T5X's DecoderOnlyModel predicts only from batches that have `decoder_causal_attention`,
i.e. tasks with an `inputs` and a `targets` feature, and eval.py reports metrics only for
tasks that define metric functions. The Olmax tasks are plain LM tasks (`targets` only),
so tests/test_t5x_interop.py registers this one with MIXTURE_OR_TASK_MODULE:

    olmax_next_line   inputs: a line of Python's `textwrap` module, targets: the next
                      line (bytes). Metrics: exact_match and char_match (percent, on
                      predictions) and log_likelihood (mean score of the targets).

Every split holds the same NUM_EXAMPLES pairs, so predictions are deterministic and
the same for T5X and Olmax.
"""
from __future__ import annotations

import functools
import textwrap

import numpy as np
import seqio
import tensorflow as tf

TASK = "olmax_next_line"
NUM_EXAMPLES = 8
MAX_LINE_BYTES = 40


@functools.lru_cache(maxsize=None)
def line_pairs() -> tuple[tuple[str, str], ...]:
    """(line, next line) pairs of ASCII lines of 8..40 bytes, first NUM_EXAMPLES, in file order."""
    with open(textwrap.__file__, encoding="utf-8") as f:
        lines = [ln.rstrip() for ln in f]
    fits = [8 <= len(ln) <= MAX_LINE_BYTES and ln.isascii() for ln in lines]
    pairs = [(a, b) for a, b, ok_a, ok_b in zip(lines, lines[1:], fits, fits[1:]) if ok_a and ok_b]
    if len(pairs) < NUM_EXAMPLES:
        raise RuntimeError(f"{textwrap.__file__} has only {len(pairs)} short line pairs; need {NUM_EXAMPLES}.")
    return tuple(pairs[:NUM_EXAMPLES])


def _dataset(split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
    del split, shuffle_files, seed  # every split is the same few pairs
    inputs, targets = zip(*line_pairs())
    return tf.data.Dataset.from_tensor_slices({"inputs": list(inputs), "targets": list(targets)})


def exact_match(targets, predictions) -> dict[str, float]:
    """Percent of predictions equal to their target line."""
    return {"exact_match": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def char_match(targets, predictions) -> dict[str, float]:
    """Percent of target characters that the prediction has at the same position."""
    hits = sum(sum(a == b for a, b in zip(t, p)) for t, p in zip(targets, predictions))
    total = max(1, sum(len(t) for t in targets))
    return {"char_match": 100.0 * hits / total}


def log_likelihood(targets, scores) -> dict[str, float]:
    """Mean log-likelihood of the targets (a seqio score metric: T5X's eval computes it with score_batch)."""
    del targets
    return {"log_likelihood": float(np.mean(scores))}


def register() -> seqio.Task:
    vocabulary = seqio.ByteVocabulary()
    features = {
        "inputs": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
        "targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
    }
    seqio.TaskRegistry.remove(TASK)
    return seqio.TaskRegistry.add(
        TASK,
        source=seqio.FunctionDataSource(_dataset, splits=("train", "validation", "test")),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        metric_fns=[exact_match, char_match, log_likelihood],
    )


register()
