"""benchmarks/gpu.py: `--smoke` runs every row kind on a CPU, imports no TensorFlow, and `--plot` draws.

Checks what the rows report (every row measured or saying why not, the memory properties
the GPU run is about), never timings.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("gpu"))
    run("-m", "benchmarks.gpu", "--smoke", "--out", out)
    with open(os.path.join(out, "gpu.json")) as f:
        return out, json.load(f)


def test_imports_only_jax_flax_optax_numpy():
    code = ("import sys, benchmarks.gpu; bad = [m for m in ('tensorflow', 'seqio', 'gin', 'clu', 'matplotlib') "
            "if m in sys.modules]; assert not bad, bad")
    run("-c", code)


def test_every_row_is_measured_or_says_why(smoke):
    out, result = smoke
    rows = {r["name"]: r for r in result["rows"]}
    assert {r["kind"] for r in rows.values()} == {"train", "block", "chunk", "decode"}
    assert {r["mixer"] for r in rows.values() if r["kind"] == "train"} == {"recall", "fused", "materialized"}
    for r in rows.values():
        assert (r["tokens_per_s"] or 0) > 0 or r["reason"], r
        if r["kind"] != "decode":  # compiled before anything runs: memory is known for every training row
            assert r["temp_bytes"] > 0 and r["kb_per_token"] > 0, r
    assert result["hardware"]["measured_peak_flops"] > 0
    with open(os.path.join(out, "gpu.md")) as f:
        text = f.read()
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table_lines) == len(rows) + 4 * 2, text  # one line per row, four tables with their headers


def test_materialized_attention_holds_more_than_fused(smoke):
    _, result = smoke
    temp = {(r["length"], r["mixer"]): r["temp_bytes"] for r in result["rows"] if r["kind"] == "train"}
    lengths = [n for n, m in temp if m == "materialized"]
    assert lengths
    for n in lengths:  # its [b, h, N, N] scores vs blockwise tiles
        assert temp[n, "materialized"] > temp[n, "fused"], (n, temp)


def test_recall_cache_is_smaller_than_attention_cache(smoke):
    _, result = smoke
    decode = [r for r in result["rows"] if r["kind"] == "decode"]
    longest = max(r["length"] for r in decode)
    cache = {r["mixer"]: r["cache_bytes"] for r in decode if r["length"] == longest}
    assert 0 < cache["recall"] < cache["attention"], cache


def test_plot(smoke, tmp_path):
    out, _ = smoke
    run("-m", "benchmarks.gpu", "--plot", os.path.join(out, "gpu.json"), "--out", str(tmp_path))
    with open(tmp_path / "gpu.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
