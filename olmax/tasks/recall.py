"""`olmax_recall`: multi-query associative recall (MQAR), a quick check that a model can look
a value up by its key in its context.

Each example is one row of exactly `length` tokens (no EOS, so packing puts one example
in each row of that length), ids of the byte vocabulary:

    k1 v1 k2 v2 ... kP vP  .  .  kπ1 vπ1  .  .  .  kπ2 vπ2  .  ...

P key-value pairs (distinct keys), then every key once more, in a random order, at random
non-overlapping even positions of the rest of the row, each followed by its value; the
gaps hold a filler token. The values after the repeated keys (the "answers") can only be
predicted by recalling the pair from the context; every other token is either random
(keys, first values, where a query starts) or the filler. Zoology's MQAR (Arora et al.
2023) has this layout; here the model is trained on every token, as an LM task, and
`answer_mask` marks the positions to score.

Registered tasks (nothing is generated at import): `olmax_recall` (32 pairs, 256 tokens)
and `olmax_recall_{P}x{L}` for P in 8, 16, 32, 64 and L in 256, 1024. Keys and values come
from two alphabets of 64 byte ids each (a smaller alphabet than Zoology's, so that a small
model learns the task in hundreds of steps on a CPU). Any other shape:
`register_recall_task('my_recall', pairs=16, length=512)` in a task module. Use a
TASK_FEATURE_LENGTHS of exactly `length`.

Bits per token on the answers, perfect recall: 0. A model that only knows the value
alphabet: log2(VALUES) = 6 bits. Training loss over all tokens is dominated by the
random keys and first values, so compare models on the answers (benchmarks/recall.py).
"""

from __future__ import annotations

import numpy as np
import seqio
import tensorflow as tf

from . import vocab as vocab_lib

RECALL_TASK = "olmax_recall"
FILLER = 3  # byte 0 in the byte vocabulary (ids 0-2 are pad, EOS, unk)
KEY0, KEYS = 4, 64  # keys: ids 4..67 (bytes 1..64)
VALUE0, VALUES = 68, 64  # values: ids 68..131 (bytes 65..128)
SEEDS = {"train": 0, "validation": 1}


def recall_example(rng: np.random.RandomState, pairs: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One MQAR row: (tokens [length] int32, answer mask [length] bool)."""
    check_shape(pairs, length)
    keys = KEY0 + rng.choice(KEYS, pairs, replace=False)
    values = VALUE0 + rng.randint(VALUES, size=pairs)
    tokens = np.full(length, FILLER, np.int32)
    tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2] = keys, values
    slots = (length - 2 * pairs) // 2  # even positions after the context
    starts = 2 * pairs + 2 * np.sort(rng.choice(slots, pairs, replace=False))
    order = rng.permutation(pairs)
    tokens[starts], tokens[starts + 1] = keys[order], values[order]
    answers = np.zeros(length, bool)
    answers[starts + 1] = True
    return tokens, answers


def check_shape(pairs: int, length: int) -> None:
    if not 1 <= pairs <= KEYS:
        raise ValueError(f"recall task: pairs={pairs} must be in [1, {KEYS}] (distinct keys).")
    if length < 4 * pairs:
        raise ValueError(f"recall task: length={length} is too short for {pairs} pairs and their queries; "
                         f"use length >= {4 * pairs}.")


def answer_mask(targets: np.ndarray, positions: np.ndarray, pairs: int) -> np.ndarray:
    """The answer positions of a batch of recall rows: a value token after the context.

    targets, positions: [batch, length] (decoder_target_tokens, decoder_positions) -> bool.
    """
    return (targets >= VALUE0) & (targets < VALUE0 + VALUES) & (positions >= 2 * pairs)


def register_recall_task(name: str = RECALL_TASK, pairs: int = 32, length: int = 256,
                         train_examples: int = 1_000_000, validation_examples: int = 512) -> seqio.Task:
    """Registers (or replaces) an MQAR task of `pairs` pairs in rows of `length` tokens.

    Examples are a function of (split, index): the same on every machine and run.
    """
    check_shape(pairs, length)
    sizes = {"train": train_examples, "validation": validation_examples}

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # examples are already random; the trainer's shuffle still applies

        def rows():
            for i in range(sizes[split]):
                yield {"targets": recall_example(np.random.RandomState([SEEDS[split], pairs, length, i]), pairs, length)[0]}

        spec = {"targets": tf.TensorSpec([length], tf.int32)}
        return tf.data.Dataset.from_generator(rows, output_signature=spec)

    source = seqio.FunctionDataSource(dataset_fn, splits=tuple(sizes), num_input_examples=sizes)
    features = {"targets": seqio.Feature(vocab_lib.byte_vocabulary(), add_eos=False, dtype=tf.int32)}
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, source=source, preprocessors=[], output_features=features)


register_recall_task()
for _pairs in (8, 16, 32, 64):
    for _length in (256, 1024):
        register_recall_task(f"{RECALL_TASK}_{_pairs}x{_length}", _pairs, _length)
