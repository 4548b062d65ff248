"""The olmax_recall tasks (multi-query associative recall): layout, answers, seqio, errors."""
import numpy as np
import pytest
import seqio

from olmax import tasks
from olmax.tasks import recall


@pytest.mark.parametrize("pairs,length", [(8, 256), (64, 256), (3, 12)])
def test_every_answer_is_the_value_of_its_key_in_the_context(pairs, length):
    rng = np.random.RandomState(0)
    for _ in range(20):
        tokens, answers = recall.recall_example(rng, pairs, length)
        assert tokens.shape == answers.shape == (length,)
        keys, values = tokens[0:2 * pairs:2], tokens[1:2 * pairs:2]
        assert len(set(keys)) == pairs  # distinct keys
        assert np.all((keys >= recall.KEY0) & (keys < recall.KEY0 + recall.KEYS))
        assert np.all((values >= recall.VALUE0) & (values < recall.VALUE0 + recall.VALUES))
        table = dict(zip(keys, values))
        where = np.flatnonzero(answers)
        assert len(where) == pairs and np.all(where >= 2 * pairs + 1)
        assert sorted(tokens[where - 1]) == sorted(keys)  # every key queried exactly once
        assert all(tokens[p] == table[tokens[p - 1]] for p in where)
        rest = np.ones(length, bool)
        rest[:2 * pairs] = rest[where] = rest[where - 1] = False
        assert np.all(tokens[rest] == recall.FILLER)


def test_answer_mask_finds_the_answers_from_a_batch():
    rng = np.random.RandomState(1)
    rows = [recall.recall_example(rng, 16, 128) for _ in range(3)]
    targets = np.stack([t for t, _ in rows])
    positions = np.broadcast_to(np.arange(128), targets.shape)
    np.testing.assert_array_equal(tasks.answer_mask(targets, positions, 16), np.stack([a for _, a in rows]))


def test_registered_task_gives_packed_rows_of_the_length_deterministically():
    task = seqio.get_mixture_or_task("olmax_recall_8x256")
    assert "olmax_recall" in tasks.registered_names()

    def first(split):
        ds = task.get_dataset({"targets": 256}, split=split, shuffle=False)
        return [ex["targets"] for ex in ds.take(2).as_numpy_iterator()]

    train = first("train")
    assert [t.shape for t in train] == [(256,), (256,)]
    np.testing.assert_array_equal(train[0], first("train")[0])  # the same on every run
    assert not np.array_equal(train[0], first("validation")[0])  # held-out rows differ
    tokens, _ = recall.recall_example(np.random.RandomState([recall.SEEDS["train"], 8, 256, 0]), 8, 256)
    np.testing.assert_array_equal(train[0], tokens)


def test_bad_shapes_name_the_fix():
    with pytest.raises(ValueError, match="length >= 128"):
        tasks.register_recall_task("bad", pairs=32, length=100)
    with pytest.raises(ValueError, match="pairs=65"):
        tasks.register_recall_task("bad", pairs=65, length=1024)
