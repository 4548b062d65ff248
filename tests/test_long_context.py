"""benchmarks.long_context: its rows say what they claim, and a tiny run writes its tables."""
import json

import numpy as np
import pytest

from benchmarks import long_context as lc
from olmax import network


@pytest.mark.parametrize("gap", [0, 17, 64 - 4 * 3])
def test_distance_row_layout(gap):
    """Pairs `gap` tokens before the query block, distinct keys, every answer its key's value,
    filler disjoint from keys and values, the loss mask on exactly the P answers."""
    length, pairs = 64, 3
    tokens, answers = lc.distance_row(np.random.RandomState(gap), length, pairs, gap)
    start, q = length - 4 * pairs - gap, length - 2 * pairs
    keys, values = tokens[start:start + 2 * pairs:2], tokens[start + 1:start + 2 * pairs:2]
    assert len(set(keys.tolist())) == pairs
    assert ((keys >= lc.KEY0) & (keys < lc.KEY0 + lc.KEYS)).all()
    assert ((values >= lc.VALUE0) & (values < lc.VALUE0 + lc.VALUES)).all()
    pair_of = dict(zip(keys.tolist(), values.tolist()))
    assert all(pair_of[int(k)] == int(v) for k, v in zip(tokens[q::2], tokens[q + 1::2]))
    assert np.flatnonzero(answers).tolist() == list(range(q + 1, length, 2))
    filler = np.ones(length, bool)
    filler[start:start + 2 * pairs] = filler[q:] = False
    assert (tokens[filler] >= lc.FILLER0).all() and (tokens[filler] < lc.FILLER0 + lc.FILLERS).all()
    assert lc.FILLER0 >= lc.VALUE0 + lc.VALUES
    with pytest.raises(ValueError, match="gap=53"):
        lc.distance_row(np.random.RandomState(0), length, pairs, length - 4 * pairs + 1)


def test_distance_section_writes_every_cell(tmp_path):
    """A 3-step run of both mixers, the first step on shorter rows (a length curriculum), scores
    every (eval length, distance) cell but attention's beyond its limit, and checks its targets."""
    lc.RESULTS_OUT[0] = str(tmp_path)
    lc.CONTEXT.update(command="test", hardware={"cpu": "x", "cores": 1, "device": "cpu", "jax": "", "python": ""},
                      start=0.0, load0=0.0)
    s = lc.DistanceSetup(length=64, eval_factors=(1, 4), pairs=2, features=16, depth=1, tokens_per_step=128,
                         steps=3, chunk=2, val_rows=1, curriculum=((32, 1),), attention_eval_max=64)
    section = lc.distance(s, str(tmp_path))
    assert len(section.rows) == 2 * 3  # (64, 256) x (near, mid, far)
    for row in section.rows:  # recall accuracy, bits, attention accuracy, bits
        scored = row[3:] if row[0] == 64 else row[3:5]
        assert all(isinstance(x, float) and 0 <= x for x in scored)
        assert row[0] == 64 or row[5:] == [None, None]
    assert "1 steps at length 32 (4 rows per step), then 2 steps at length 64" in section.notes[0]
    assert "not evaluated at 256 tokens" in section.notes[2]
    assert [t.claim.split(":")[0] for t in section.targets][-1].startswith("length generalization")
    saved = json.loads((tmp_path / "long_context_distance_64.json").read_text())
    assert saved["rows"] == [list(r) for r in section.rows]
    assert lc.distance_config("recall", s).block_size == network.mixer_block_for(64)


def test_curriculum_stages_and_their_errors():
    s = lc.DistanceSetup(length=1024, steps=100, tokens_per_step=4096, curriculum=((256, 30), (512, 20)))
    assert [s.stage(i) for i in (0, 29, 30, 49, 50, 99)] == [(256, 30), (256, 30), (512, 50), (512, 50),
                                                              (1024, 100), (1024, 100)]
    assert [s.rows_per_step(n) for n in (256, 1024, 8192)] == [16, 4, 1]
    assert lc.parse_curriculum("256:30,512:20") == s.curriculum and lc.parse_curriculum("") == ()
    with pytest.raises(SystemExit, match="LENGTH:STEPS"):
        lc.parse_curriculum("256")
    with pytest.raises(ValueError, match="raise --steps past its 100"):
        lc.distance(lc.DistanceSetup(length=64, steps=100, curriculum=((32, 100),)), "unused")


def test_length_generalization_reads_16L_or_the_next_longer_and_the_longest():
    assert lc.generalization_factors((1, 4, 16, 64)) == [16, 64]
    assert lc.generalization_factors((1, 4, 32, 128)) == [32, 128]  # no 16L: the shortest beyond it
    assert lc.generalization_factors((1, 16)) == [16]
    assert lc.generalization_factors((1, 4)) == [4]
    assert lc.generalization_factors((1,)) == []


def test_step_prediction_extrapolates_growth():
    res = {("attention", 1024): {"step_s": 2.0}, ("attention", 2048): {"step_s": 8.0}}
    assert lc._predicted_step(res, "attention", 4096) == 32.0
    assert lc._predicted_step(res, "attention", 2048) == 0.0  # one row before it only


def test_longest_doubles_until_the_row_does_not_fit(tmp_path, monkeypatch):
    """Real steps of a stand-in model: rows double from `first` until the compiled step needs more
    than memory_gib; each model writes its own section, and the target names the row that did not fit."""
    monkeypatch.setitem(lc.MODELS, "mini", dict(features=16, depth=1, conv_features=32, mixer_heads=2, num_heads=2))
    lc.RESULTS_OUT[0] = str(tmp_path)
    lc.CONTEXT.update(command="test", hardware={"cpu": "x", "cores": 1, "device": "cpu", "jax": "", "python": ""},
                      start=0.0, load0=0.0)
    probe = lc._one_step(network.OlmaxConfig(vocab_size=384, max_length=256, mixer="recall", **lc.MODELS["mini"]),
                         256, memory_gib=100.0, step_limit_s=600.0)
    assert probe["step_s"] > 0 and np.isfinite(probe["loss"])
    # A budget between the 256-token step's memory and twice it: 512 tokens cannot fit (memory grows with the row).
    sec = lc.longest("mini", 256, 1024, 1.5 * probe["gib"], 600.0, str(tmp_path), mixers=("recall",))
    assert sec.name == lc.longest_name("mini") == "long_context_longest_mini" and lc.longest_name("tiny") == (
        "long_context_longest")
    assert [(r[0], r[1]) for r in sec.rows] == [(256, "recall"), (512, "recall")]  # 1024 not tried after a miss
    assert sec.rows[0][4] > 0 and sec.rows[1][4] is None and sec.rows[1][6].startswith("does not fit")
    assert sec.targets[0].measured == "256 (512 does not fit)" and sec.targets[0].met
    assert json.loads((tmp_path / "long_context_longest_mini.json").read_text())["rows"][0][0] == 256
    assert (tmp_path / "long_context_longest_mini.png").exists()
