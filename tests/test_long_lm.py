"""benchmarks.long_lm on a few synthetic documents (nothing downloaded): the split, the rows, the
position buckets, and a 2-step run of both mixers that writes its tables."""
import itertools
import json

import numpy as np
import pytest

from benchmarks import long_lm

WORDS = ("the", "of", "and", "a", "to", "in", "is", "was", "that", "for", "on", "as", "with", "by", "at", "from", "his",
         "her", "it", "an", "were", "are", "which", "this")


def write_docs(folder, sizes):
    """Documents doc0.txt, ... of random words (every one different), one in a subfolder."""
    rng = np.random.RandomState(0)
    for i, size in enumerate(sizes):
        text = " ".join(rng.choice(WORDS, size // 2)).encode()[:size]
        path = folder / ("sub" if i == 0 else "") / f"doc{i}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text)


def test_info_text_keeps_nodes_only():
    main = (b"This is m.info, preamble.\n\x1f\nIndirect:\nm.info-1: 99\n"
            b"\x1f\nTag Table:\n(Indirect)\nNode: Top\x7f99\n\x1f\nEnd Tag Table\n")
    part = (b"This is m.info, the copying notice again.\n\x1f\nFile: m.info,  Node: Top,  Next: A\n\nTitle\n"
            b"\x00\x08[image src=\"x.png\"\x00\x08]\n"
            b"\x1f\nFile: m.info,  Node: A,  Prev: Top\n\nText\x00\x08[index\x00\x08]\n"
            b"\x1f\nLocal Variables:\ncoding: utf-8\nEnd:\n")
    assert long_lm.info_text([main, part]) == (b"File: m.info,  Node: Top,  Next: A\n\nTitle\n\n\n"
                                               b"File: m.info,  Node: A,  Prev: Top\n\nText\n")


def test_split_rows_and_buckets(tmp_path):
    write_docs(tmp_path, [600, 700, 800, 900, 1000, 1100, 1200, 1300, 100])
    docs = long_lm.read_documents(str(tmp_path), min_bytes=200)
    assert set(docs) == {"sub/doc0"} | {f"doc{i}" for i in range(1, 8)}  # doc8 is too short
    train, val = long_lm.split(list(docs), 0.25)
    assert not set(train) & set(val) and set(train) | set(val) == set(docs) and len(val) == 2
    assert long_lm.split([n for n in docs if n != train[0]], 0.25)[1] == val  # sides stay when a document goes

    length = 128
    first = long_lm.validation_windows(docs, val, length, per_doc=0)
    assert first == [(n, 0) for n in val]  # one window a document: its opening
    spread = long_lm.validation_windows(docs, val, length, per_doc=3)
    for n in val:  # evenly through the document, each a whole window, its opening left out
        last = docs[n].size - length
        assert [o for m, o in spread if m == n] == [round(last / 6), round(last / 2), round(5 * last / 6)]
    short = long_lm.validation_windows({"s": np.zeros(length + 1, np.uint8)}, ["s"], length, 4)
    assert short == [("s", 0), ("s", 1)]  # only two distinct offsets
    rows = long_lm.validation_rows(docs, spread, length)
    assert list(rows) == [f"{n}@{o}" for n, o in spread]
    for (name, o), b in zip(spread, rows.values()):  # position in the row = bytes of the document read so far
        assert (b["decoder_target_tokens"][0] == docs[name][o:o + length].astype(np.int32) + 3).all()
        assert b["decoder_input_tokens"][0, 0] == 0
        assert (b["decoder_input_tokens"][0, 1:] == b["decoder_target_tokens"][0, :-1]).all()
        assert (b["decoder_positions"][0] == np.arange(length)).all() and (b["decoder_loss_weights"] == 1).all()

    stream = long_lm.TrainRows([docs[n] for n in train], length, batch=3, seed=0)
    train_text = [docs[n].tobytes() for n in train]
    val_text = [docs[n].tobytes() for n in val]
    for i in range(20):
        b = stream(i)
        assert (b["decoder_target_tokens"] == long_lm.TrainRows([docs[n] for n in train], length, 3)(i)
                ["decoder_target_tokens"]).all()  # a function of (seed, i)
        for row in b["decoder_target_tokens"]:
            window = (row - 3).astype(np.uint8).tobytes()
            assert any(window in t for t in train_text) and not any(window in t for t in val_text)

    for n in (128, 2048, 8192, 10000, 16384, 65536):
        edges = long_lm.bucket_edges(n)
        assert edges[0] == 0 and edges[-1] == n and all(a < b for a, b in itertools.pairwise(edges)) and len(edges) >= 5
    assert long_lm.bucket_edges(8192) == [0, 1024, 2048, 4096, 8192]
    assert long_lm.bucket_edges(16384)[-2:] == [8192, 16384]
    bits = np.arange(2 * 128, dtype=float).reshape(2, 128)
    edges = long_lm.bucket_edges(128)
    assert long_lm.bucket_bpb(bits, edges)[0] == pytest.approx(bits[:, :16].mean())


def test_context_gain_compares_the_same_bytes_with_and_without_the_first_half():
    bits = np.array([[9.0, 9.0, 1.0, 2.0], [9.0, 9.0, 3.0, 2.0]])  # [rows, length]
    alone = np.array([[4.0, 4.0], [4.0, 4.0]])  # the second halves scored as rows of their own
    assert long_lm.context_gain(bits, alone) == pytest.approx(4.0 - 2.0)
    docs = {"a": np.arange(10, dtype=np.uint8), "b": np.arange(3, dtype=np.uint8)}
    windows = long_lm.validation_windows(docs, ["a", "b"], 8, per_doc=2)
    assert windows == [("a", 0), ("a", 2)]  # offsets 0.5 and 1.5 of 2, rounded to even; b is shorter than a row
    halves = long_lm.validation_rows(docs, windows, 8, start=4)
    assert [(h["decoder_target_tokens"][0] - 3).tolist() for h in halves.values()] == [[4, 5, 6, 7], [6, 7, 8, 9]]


def test_two_step_run_writes_a_row_per_mixer(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    write_docs(corpus, [400, 500, 600, 700, 800, 900])
    s = long_lm.Setup(length=128, features=32, depth=1, batch=1, steps=2, chunk=2, val_fraction=0.3, min_bytes=200,
                      val_windows=2)
    section = long_lm.run(s, str(corpus), str(out), "test")
    saved = json.loads((out / "long_lm.json").read_text())
    md = (out / "long_lm.md").read_text()
    assert [r[0] for r in saved["rows"]] == ["recall", "attention"] == [r[0] for r in section.rows]
    assert all(r[2] == 2 for r in saved["rows"])  # equal steps
    buckets = [r[5:5 + len(long_lm.bucket_edges(128)) - 1] for r in saved["rows"]]
    assert all(0 < b < 20 for row in buckets for b in row)
    assert "| recall |" in md and "| attention |" in md and "bpb 0-16" in md
    assert [t.claim.split("'")[0].split(" reads")[0] for t in section.targets] == ["recall mixer"] * 3
    assert all(isinstance(r[-1], float) and abs(r[-1]) < 20 for r in saved["rows"])  # the first half's gain
    assert (out / "long_lm.png").exists()
    train, val = long_lm.split(sorted(long_lm.read_documents(str(corpus), 200)), 0.3)
    assert saved["data"]["corpus"]["validation"] == sorted(val) and saved["data"]["corpus"]["train"] == len(train)
    assert saved["data"]["corpus"]["validation_rows"] == 2 * len(val)
