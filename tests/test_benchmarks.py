"""benchmarks/run.py: `--quick` runs every section and writes well-formed outputs.

Checks the format (files, tables, finite positive numbers, valid PNGs), never timings.
"""
import json
import math
import os
import struct
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, REPO)

from benchmarks import common, run  # noqa: E402

MISSING = common.MISSING
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# section -> (expected header, number of leading label columns, expected row count under --quick)
EXPECTED = {
    "memory": (["depth", "params", "reversible MiB", "remat MiB", "plain MiB"], 0, len(run.QUICK.mem_depths)),
    "throughput": (
        ["length", "K", "batch"] + [f"{m} tok/s" for m in run.TP_MIXERS] + ["recall / attention",
         "axial / attention"] + [f"{m} MFLOP/tok" for m in run.TP_MIXERS] + [f"{m} temp MiB" for m in run.TP_MIXERS],
        0,
        len(run.QUICK.tp_lengths),
    ),
    "quality": (["model", "params", "steps", "train s", "s/step (median)", "val bpb @ step", "val bpb @",
                 "final val bpb"], 1, 2),
    "ablations": (["variant", "placement", "norm", "init seed", "params", "val bpb @ step", "train loss (last chunks)",
                   "step s (min)", "step s (median)", "step time / Olmax (min)"], 4, 4),
    "mfu": (["config", "params", "length", "batch", "step s (min)", "tokens/s", "model MFLOP/token", "peak GFLOP/s",
             "MFU %", "MFU % (medians)"], 1, 1),
    "block": (["length", "batch", "fastest K", "its tok/s", "leanest K", "its temp MiB", "mixer_block_for",
               "its tok/s / fastest"], 0, len(run.QUICK.blk_lengths)),
    "far_block": (["length", "batch", "K", "default B", "its tok/s", "its temp MiB", "fastest B", "its tok/s",
                   "default / fastest"], 0, len(run.QUICK.fb_lengths)),
}
TARGETS_HEADER = ["claim", "target", "measured", "met"]


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in `text`: (header, rows of cells)."""
    out, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            assert len(block) >= 2 and set("".join(block[1])) <= set("-:"), f"malformed table: {block[:2]}"
            out.append((block[0], block[2:]))
            block = []
    return out


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x%"))


def check_png(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(24)
        size = 24 + len(f.read())
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 100 and height > 100 and size > 2000, (path, width, height, size)


def check_section(out: str, name: str, rows_expected: int | None, allow_missing: bool) -> None:
    header, labels, n_rows = EXPECTED[name]
    with open(os.path.join(out, f"{name}.md")) as f:
        text = f.read()
    found = tables(text)
    assert found, f"{name}.md has no table"
    head, rows = found[0]
    assert len(head) == len(header), (name, head)
    for got, want in zip(head, header):
        assert got.startswith(want), (name, got, want)
    assert len(rows) == (n_rows if rows_expected is None else rows_expected), (name, rows)
    for row in rows:
        assert len(row) == len(head), (name, row)
        for col, value in zip(head[labels:], row[labels:]):
            if value == MISSING and allow_missing:
                continue
            x = number(value)
            assert math.isfinite(x) and x > 0, f"{name}: {col} = {value!r}"
    targets = [t for t in found if t[0] == TARGETS_HEADER]
    assert len(targets) == 1, f"{name}.md should have one targets table"
    for row in targets[0][1]:
        assert row[3] in ("met", "MISSED"), row
    for line in text.splitlines():  # every plot the page shows exists and is a PNG
        if line.startswith("!["):
            check_png(os.path.join(out, line.split("](", 1)[1].rstrip(")")))
    with open(os.path.join(out, f"{name}.json")) as f:
        data = json.load(f)
    assert data["name"] == name and data["context"]["hardware"]["cores"] >= 1
    assert data["context"]["seconds"] > 0
    check_png(os.path.join(out, f"{name}.png"))


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    env = dict(os.environ)
    # One CPU device, as a user would run it (conftest asks for 8), and XLA's default compiles:
    # the quick sections are timed loops, which fast_compile's flags slow more than they speed the compiles.
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", out],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_section_outputs(quick_results, name):
    out, _ = quick_results
    check_section(out, name, None, allow_missing=False)


@pytest.mark.slow
def test_quick_summary_and_printed_tables(quick_results):
    out, stdout = quick_results
    with open(os.path.join(out, "summary.md")) as f:
        text = f.read()
    (head, rows), = tables(text)
    assert head == TARGETS_HEADER
    n_targets = sum(len(json.load(open(os.path.join(out, f"{n}.json")))["targets"]) for n in EXPECTED)
    assert len(rows) == n_targets >= len(EXPECTED)
    for name in EXPECTED:  # the tables are printed too
        assert f"== {name}" in stdout
    assert stdout.count("| claim | target | measured | met |") == len(EXPECTED) + 1


def test_unknown_section_is_an_error(capsys):
    with pytest.raises(SystemExit):
        run.main(["--only", "memory,speed"])
    assert "speed" in capsys.readouterr().err


@pytest.mark.parametrize("mixer", ["recall", "axial"])
def test_attention_twin_has_equal_parameters(mixer):
    cfg = common.olmax_config(64, 2, 1024, mixer=mixer)
    twin = common.attention_twin(cfg)
    assert twin.mixer == "attention" and twin.conv_features != cfg.conv_features
    n_olmax = run.models.param_count(common.param_shapes(cfg))
    n_attention = run.models.param_count(common.param_shapes(twin))
    assert abs(n_attention - n_olmax) / n_olmax < 0.005, (n_olmax, n_attention)


def test_markdown_table_round_trip():
    header = ["a", "b", "c"]
    text = common.markdown_table(header, [["x", 1234567, 0.5], ["y", float("nan"), None]])
    ((head, rows),) = tables(text)
    assert head == header
    assert rows == [["x", "1,234,567", "0.5"], ["y", MISSING, MISSING]]


def test_interleaved_alternates_order():
    calls = []
    common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]


RESULTS = os.path.join(REPO, "benchmarks", "results")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_committed_results_are_well_formed(name):
    if not os.path.exists(os.path.join(RESULTS, f"{name}.md")):
        pytest.skip(f"no committed benchmarks/results/{name}.md")
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        quick = json.load(f)["context"]["quick"]
    rows = None if quick else {
        "memory": len(run.Sizes().mem_depths), "throughput": len(run.Sizes().tp_lengths),
        "block": len(run.Sizes().blk_lengths), "far_block": len(run.Sizes().fb_lengths),
    }.get(name, EXPECTED[name][2])
    check_section(RESULTS, name, rows, allow_missing=True)


def test_t5x_speed_merge_keeps_each_rows_command():
    from benchmarks import t5x_peer

    hw = common.hardware()
    ctx = lambda cmd: {"command": cmd, "load": [1.0, 2.0], "hardware": hw}  # noqa: E731
    rows = [[256, 32, 10, 7000.0, 5800.0, 1.2], [4096, 2, 5, 4300.0, 700.0, 6.1], [8192, 1, 5, 3900.0, 300.0, 13.0]]
    # A section written before origins were kept: its rows are credited to its own command.
    first = {"context": ctx("run A"), "data": {"rows": rows, "swapped": {"8192": ["t5x"]}}}
    kept, swapped, origin = t5x_peer.kept_rows(first, [256])
    assert [r[0] for r in kept] == [4096, 8192] and swapped == {8192: ("t5x",)}
    assert set(origin) == {"4096", "8192"} and all(o.startswith("`run A`") for o in origin.values())
    # Merged again by a run of 4096: 8192 keeps run A, 256 (measured by run B) is credited to run B.
    second = {"context": ctx("run B"), "data": {"rows": [rows[0]] + kept, "swapped": {"8192": ["t5x"]}, "origin": origin}}
    kept, swapped, origin = t5x_peer.kept_rows(second, [4096])
    assert [r[0] for r in kept] == [256, 8192]
    assert origin["8192"].startswith("`run A`") and origin["256"].startswith("`run B`")
    notes = t5x_peer.origin_notes(origin)
    assert len(notes) == 2 and any(n.startswith("Rows of length 8192: from `run A`") for n in notes)
    assert t5x_peer.kept_rows(None, [256]) == ([], {}, {})


def test_recall_merge_lists_points_not_yet_re_measured():
    from benchmarks import recall

    def point(pairs, length, steps, mixers=recall.MIXERS, **kw):
        return {"pairs": pairs, "length": length, "steps": steps, "models": {m: {} for m in mixers}, **kw}

    kept = [point(8, 1024, 1500, command="old"), point(32, 1024, 1500), point(8, 256, 1500)]
    new = [point(32, 1024, 400, command="new"), point(64, 1024, 100, mixers=("recall",))]
    points = recall.table_points(kept, new)
    assert [(p["pairs"], p["length"], p["steps"]) for p in points] == [(8, 256, 1500), (8, 1024, 1500), (32, 1024, 400)]
    assert [p["command"] for p in points] == ["(earlier run)", "old", "new"]


def test_recall_claim_counts_finished_points_only():
    from benchmarks import recall

    def point(task, steps, recall_bits, attention_bits=0.0, target_steps=None, curve_at=()):
        """A point measured up to `steps`; `curve_at` {step: (recall bits, attention bits)} earlier."""
        figures = {**dict(curve_at), steps: (recall_bits, attention_bits)}
        models = {m: {"params": 1, "curve": [(t, 1.0, f[i] if i < 2 else 6.0) for t, f in sorted(figures.items())]}
                  for i, m in enumerate(("recall", "attention", "axial"))}
        return {"task": task, "steps": steps, "target_steps": target_steps or steps, "models": models}

    s = recall.Setup(steps=1500)
    done = [point("a", 1500, 0.01), point("b", 1500, 0.04)]
    (target,) = recall.section(done, s).targets
    assert target.met and target.measured == "worst +0.040"
    # A point in progress (its models' last common step < the protocol's) is listed, not claimed.
    (target,) = recall.section(done + [point("c", 600, 5.0, 5.5, target_steps=1500)], s).targets
    assert not target.met and target.measured == "worst +0.040 (1 point in progress)"
    (target,) = recall.section(done + [point("d", 1500, 0.39)], s).targets
    assert not target.met and target.measured == "worst +0.390"
    # A point trained longer: the claim reads its figures at the protocol's step (a row), and a
    # second claim its last step (a second row); until that step it is in progress there.
    longer = point("e", 3000, 0.02, 0.0, curve_at={1500: (0.30, 0.01)})
    sec = recall.section(done + [longer], s)
    first, second = sec.targets
    assert not first.met and first.measured == "worst +0.290"
    assert second.met and second.measured == "worst +0.020"
    assert [r[:3] for r in sec.rows] == [["a", 0, 1500], ["b", 0, 1500], ["e", 0, 1500], ["e", 0, 3000]]
    growing = point("f", 2000, 0.02, 0.0, target_steps=3000, curve_at={1500: (0.03, 0.01)})
    first, second = recall.section(done + [growing], s).targets
    assert first.met and first.measured == "worst +0.040"
    assert not second.met and second.measured == "none finished (1 point in progress)"
    early = point("g", 600, 5.0, 5.5, target_steps=3000)
    first, second = recall.section(done + [longer, early], s).targets
    assert first.measured == "worst +0.290 (1 point in progress)" and not first.met
    assert second.measured == "worst +0.020 (1 point in progress)" and not second.met


def test_recall_claim_reads_the_mean_over_seeds():
    from benchmarks import recall

    def point(task, seed, steps, recall_bits, attention_bits, mixers=("recall", "attention", "axial")):
        figures = {"recall": recall_bits, "attention": attention_bits, "axial": 6.0}
        models = {m: {"params": 1, "curve": [(steps, 0.5, figures[m])]} for m in mixers}
        return {"task": task, "pairs": 8, "length": 256, "seed": seed, "steps": steps, "models": models}

    s = recall.Setup(steps=1500)
    # Seed 0 misses by itself (+0.10), the mean over three seeds (+0.04) is within the target;
    # the seeds run without the axial mixer show it as missing, and the mean of its one run.
    points = [point("a", 0, 1500, 0.3, 0.2), point("a", 1, 1500, 5.0, 5.1, ("recall", "attention")),
              point("a", 2, 1500, 0.22, 0.1, ("recall", "attention")), point("b", 0, 1500, 0.0, 0.0)]
    sec = recall.section(points, s)
    (target,) = sec.targets
    assert target.met and target.measured == "worst +0.040"
    assert [r[:3] for r in sec.rows] == [["a", 0, 1500], ["a", 1, 1500], ["a", 2, 1500], ["a", "mean", 1500],
                                         ["b", 0, 1500]]
    mean = sec.rows[3]
    assert mean[4] == pytest.approx((0.3 + 5.0 + 0.22) / 3) and mean[6] == 6.0 and mean[9] == pytest.approx(0.04)
    assert sec.rows[1][5:7] == [None, None]  # axial, not run at seed 1
    (target,) = recall.section(points[:1] + points[3:], s).targets
    assert not target.met and target.measured == "worst +0.100"
    # Seeds are points of their own when merging: a seed-1 run does not replace seed 0's.
    assert [recall.seed_of(p) for p in recall.table_points(points[:1], points[1:2])] == [0, 1]


def test_t5x_speed_claims_rest_on_a_bound_where_t5x_swapped():
    from benchmarks import t5x_peer

    def row(n, olmax, t5x):
        return [n, 8192 // n, 5, olmax, t5x, None if None in (olmax, t5x) else olmax / t5x]

    rows = [row(256, 900.0, 1000.0), row(4096, 5000.0, 500.0), row(8192, 4000.0, 200.0)]
    by_length = lambda targets: {t.claim.rsplit("=", 1)[1]: t for t in targets}  # noqa: E731
    claims = by_length(t5x_peer.speed_targets(rows, {}))
    assert not claims["256"].met and claims["256"].measured == "0.90x"
    assert claims["4096"].met and claims["8192"].met and claims["8192"].measured == "20.00x"
    # T5X paged to swap at 8192: its tok/s there is too low to trust, so the claim rests on
    # Olmax at 8192 against T5X at 4096 (T5X does more work per token at 8192).
    claims = by_length(t5x_peer.speed_targets(rows, {8192: ("t5x",)}))
    assert claims["8192"].met and claims["8192"].measured == "20.00x; T5X swapped, >= 8.00x against T5X at 4096"
    slow = rows[:2] + [row(8192, 2000.0, 200.0)]  # 10x as measured, but only 4x against T5X at 4096
    claims = by_length(t5x_peer.speed_targets(slow, {8192: ("t5x",)}))
    assert not claims["8192"].met and claims["8192"].measured.endswith(">= 4.00x against T5X at 4096")
    assert not by_length(t5x_peer.speed_targets(rows[2:], {8192: ("t5x",)}))["8192"].met  # nothing shorter
    claims = by_length(t5x_peer.speed_targets(rows, {8192: ("olmax",)}))
    assert not claims["8192"].met and claims["8192"].measured == "20.00x (Olmax swapped)"
    # A length where T5X ran out of memory has no ratio and no claim.
    assert "8192" not in by_length(t5x_peer.speed_targets(rows[:2] + [row(8192, 4000.0, None)], {}))
    # Against T5X at Olmax's own depth and width the bars are higher: 1.2x, 5x, 12x.
    matched = by_length(t5x_peer.speed_targets([row(256, 1150.0, 1000.0), row(4096, 5000.0, 1000.0),
                                                row(8192, 4000.0, 300.0)], {}, "matched"))
    assert [(matched[n].target, matched[n].met) for n in ("256", "4096", "8192")] == [
        (">= 1.2x", False), (">= 5x", True), (">= 12x", True)]


def test_t5x_memory_claim_compares_peaks_where_neither_swapped():
    from benchmarks import t5x_peer

    rows = [[256, 32, 5, 900.0, 1000.0, 0.9, 1.5, 1.2], [4096, 2, 5, 5000.0, 500.0, 10.0, 1.6, 4.0],
            [8192, 1, 5, 4000.0, 200.0, 20.0, 1.7, 9.0], [1024, 8, 5, 1.0, 1.0, 1.0]]  # the last: merged, no peaks
    claims = {t.claim.rsplit("=", 1)[1]: t for t in t5x_peer.memory_targets(rows, {8192: ("t5x",)})}
    assert set(claims) == {"256", "4096"}  # 8192: T5X paged to swap, its resident peak is not what it needed
    assert not claims["256"].met and claims["256"].measured == "1.25x (1.50 vs 1.20 GiB)"
    assert claims["4096"].met and claims["4096"].measured == "0.40x (1.60 vs 4.00 GiB)"


def test_t5x_peer_run_reports_the_binarys_own_peak(tmp_path):
    """`run` measures the child's maximum resident set, not this process's: a child that touches
    ~200 MiB reports at least that, and a failing child's stderr is in the error."""
    from benchmarks import t5x_peer

    grow = [sys.executable, "-c", "import numpy as np; a = np.ones(200 * 2**20 // 8); print(a.sum())"]
    seconds, swap, peak = t5x_peer.run(grow, "unused", lambda msg: None)
    small = t5x_peer.run([sys.executable, "-c", "pass"], "unused", lambda msg: None)[2]
    assert seconds > 0 and swap >= 0 and peak >= small + 0.15 and small < 0.1  # not this process's ~0.2 GiB
    with pytest.raises(RuntimeError, match="boom"):
        t5x_peer.run([sys.executable, "-c", "import sys; sys.exit('boom')"], "unused", lambda msg: None)


def test_summary_names_each_sections_machine_when_they_differ(tmp_path):
    """Sections are rerun one at a time, possibly elsewhere: the summary must not credit them all to one machine."""
    def context(cpu):
        hw = {"cpu": cpu, "cores": 2, "device": "cpu (cpu)", "jax": "0", "python": "3"}
        return {"hardware": hw, "command": "cmd", "seconds": 1.0, "load": [0.0, 0.0], "quick": True}

    section = lambda name: common.Section(name=name, title=name, header=["x"], rows=[[1]])  # noqa: E731
    common.write_section(str(tmp_path), section("memory"), context("CPU A"))
    one = run.write_summary(str(tmp_path))
    assert "Hardware: CPU A, 2 cores" in one and ", on CPU A" not in one
    common.write_section(str(tmp_path), section("mfu"), context("CPU B"))
    two = run.write_summary(str(tmp_path))
    assert "Hardware: differs by section" in two
    assert "`cmd`, 1 s, load 0.0 -> 0.0, on CPU A, 2 cores" in two
    assert "`cmd`, 1 s, load 0.0 -> 0.0, on CPU B, 2 cores" in two
