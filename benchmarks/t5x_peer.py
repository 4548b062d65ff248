"""Olmax against the real peer: upstream T5X's decoder-only transformer, each trained by its
own binary (`python -m olmax.train` and T5X's `train.py` through ../shared/peers/t5x-run).

    python -m benchmarks.t5x_peer quality [--steps 600] [--corpus '/usr/share/vim/vim90/doc/*.txt']
    python -m benchmarks.t5x_peer speed [--lengths 256,1024,4096,8192] [--steps 10] [--merge] [--xla_flags ...]
                                        [--peer tiny|matched]

quality  gin/models/tiny.gin + gin/runs/pretrain.gin (Olmax's defaults) against
         benchmarks/t5x/transformer_tiny.gin + T5X's configs/runs/pretrain.gin (T5X's
         defaults), at equal steps and tokens (batch 16 x 256, packed) on the `text_files`
         task over an English corpus that is not Python source (default: Vim's manuals,
         which Debian installs with vim; 2% of the files held out by a hash of their text).
         Both evaluate the same held-out batches (unshuffled validation split) at the end:
         bits per token (= per byte: byte vocabulary, EOS aside).
speed    training tokens/s (non-padding target tokens) at each length, same task, packed,
         the two binaries alternating; each run times its second half (after compilation).
         --xla_flags sets XLA_FLAGS for both binaries (for example XLA:CPU's memory-optimized
         scheduler: T5X's step buffers at 8192 take 15 GiB with it, 27.6 without). A run that
         pages to swap is reported with the GiB it wrote there; where T5X did, its claim rests
         on T5X's speed at the next shorter length instead (see `swap_bound`). --peer matched
         races T5X at Olmax tiny's depth and width (benchmarks/t5x/transformer_tiny_matched.gin)
         instead of the 6-layer transformer_tiny.gin, against its own targets (SPEED_TARGETS).

T5X is found through OLMAX_T5X_RUN (the runner script) or ../shared/peers/t5x-run beside
the checkout. Writes benchmarks/results/t5x_{quality,speed,speed_matched}.{md,json}.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "benchmarks", "results")
CORPUS = "/usr/share/vim/vim90/doc/*.txt"
# The T5X transformer to race (--peer): as shipped in the first comparison (6 layers), or
# at Olmax tiny's own depth and width (4 layers), each with its own speed targets.
PEERS = {"tiny": "transformer_tiny.gin", "matched": "transformer_tiny_matched.gin"}
SPEED_TARGETS = {"tiny": {256: 1.0, 4096: 3.0, 8192: 5.0}, "matched": {256: 1.2, 4096: 5.0, 8192: 12.0}}


def t5x_gin(peer: str = "tiny") -> str:
    return os.path.join(REPO, "benchmarks", "t5x", PEERS[peer])


def t5x_runner() -> str:
    path = os.environ.get("OLMAX_T5X_RUN") or os.path.join(os.path.dirname(REPO), "shared", "peers", "t5x-run")
    if not os.path.exists(path):
        raise SystemExit(f"T5X runner not found at {path}: set OLMAX_T5X_RUN to ../shared/peers/t5x-run's path.")
    return path


def macros(model_dir: str, length: int, batch: int, steps: int, quote: bool) -> list[str]:
    q = (lambda s: f"'{s}'") if quote else (lambda s: s)  # T5X needs Python literals; Olmax takes bare strings too
    return [f"--gin.MODEL_DIR={q(model_dir)}", f"--gin.MIXTURE_OR_TASK_NAME={q('text_files')}",
            f"--gin.TASK_FEATURE_LENGTHS={{'targets': {length}}}", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.BATCH_SIZE={batch}", "--gin.USE_CACHED_TASKS=False"]


def t5x_command(model_dir: str, length: int, batch: int, steps: int, eval_period: int, eval_steps: int,
                peer: str = "tiny") -> list[str]:
    runner = t5x_runner()
    return [runner, "train", f"--gin_search_paths={os.path.join(os.path.dirname(runner), 't5x')},"
            f"{os.path.dirname(t5x_gin(peer))}", f"--gin_file={t5x_gin(peer)}", "--gin_file=t5x/configs/runs/pretrain.gin",
            *macros(model_dir, length, batch, steps, quote=True), "--gin.MIXTURE_OR_TASK_MODULE='olmax.tasks'",
            f"--gin.train.eval_period={eval_period}", f"--gin.train.eval_steps={eval_steps}",
            f"--gin.utils.SaveCheckpointConfig.period={steps}"]


def olmax_command(model_dir: str, length: int, batch: int, steps: int, eval_period: int, eval_steps: int,
                  extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "olmax.train", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
            *macros(model_dir, length, batch, steps, quote=False), f"--gin.network.OlmaxConfig.max_length={length}",
            f"--gin.train.train.eval_period={eval_period}", f"--gin.train.train.eval_steps={eval_steps}",
            f"--gin.train.train.stats_period={eval_period}", f"--gin.utils.SaveCheckpointConfig.period={steps}", *extra]


def swapped_out() -> float:
    """GiB the kernel has written to swap since boot (0 where /proc/vmstat is missing)."""
    try:
        with open("/proc/vmstat") as f:
            pages = next((int(line.split()[1]) for line in f if line.startswith("pswpout ")), 0)
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


# Runs argv[2:] and writes "<exit code> <its peak resident KiB>" to argv[1]. A child's ru_maxrss
# starts at its parent's resident size at the fork (and exec keeps it), so the binary is started
# from this small process rather than from the benchmark, which holds JAX and TensorFlow.
_PEAK_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
                 "open(sys.argv[1], 'w').write(f'{rc} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}')")


def run(cmd: list[str], corpus: str, log, xla_flags: str = "") -> tuple[float, float, float]:
    """Runs one binary; (wall seconds, GiB written to swap meanwhile, its peak resident GiB).

    The peak is the kernel's maximum resident set size of the binary (ru_maxrss): its whole
    process, runtime and input pipeline included, as a machine must hold it; pages it sent to
    swap are not in it."""
    env = dict(os.environ, OLMAX_TEXT_FILES=corpus, TF_CPP_MIN_LOG_LEVEL="3")
    if xla_flags:
        env["XLA_FLAGS"] = " ".join(filter(None, (env.get("XLA_FLAGS", ""), xla_flags)))
    start, swap0 = time.perf_counter(), swapped_out()
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "peak")
        proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, report, *cmd], cwd=REPO, env=env,
                              capture_output=True, text=True)
        with open(report) as f:
            returncode, kib = (int(x) for x in f.read().split())
    if returncode:
        killed = " (killed: out of memory?)" if returncode == -9 else ""
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({returncode}{killed}):\n{proc.stderr[-4000:]}")
    seconds, swap = time.perf_counter() - start, swapped_out() - swap0
    peak = kib / 2**20  # ru_maxrss is in KiB on Linux
    swap_note = f", {swap:.1f} GiB to swap" if swap >= 0.1 else ""
    log(f"    {os.path.basename(cmd[0])} {cmd[1]} ... done in {seconds:.0f} s, peak {peak:.2f} GiB resident{swap_note}")
    return seconds, swap, peak


def scalars(model_dir: str, collection: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the TensorBoard events under model_dir/collection."""
    import tensorflow as tf

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, collection, "**", "events.out.tfevents.*"), recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                value = np.asarray(tf.make_ndarray(v.tensor) if v.HasField("tensor") else v.simple_value)
                if value.size == 1 and value.dtype.kind in "fiu":  # scalars only (not the config text)
                    out.setdefault(v.tag, []).append((int(event.step), float(value)))
    return out


def last(series: dict, tag: str) -> float:
    if tag not in series:
        raise KeyError(f"no {tag!r} in the events (tags: {sorted(series)[:20]})")
    return sorted(series[tag])[-1][1]


def quality(args, log) -> common.Section:
    batch, length, steps, eval_steps = 16, 256, args.steps, args.eval_batches
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("olmax", "t5x"):
            model_dir = os.path.join(tmp, name)
            make = olmax_command if name == "olmax" else t5x_command
            seconds, _, _ = run(make(model_dir, length, batch, steps, steps, eval_steps), args.corpus, log)
            ev = scalars(model_dir, "training_eval")
            bits = last(ev, "bits_per_token") if name == "olmax" else last(
                ev, "cross_ent_loss_per_all_target_tokens") / math.log(2)
            res[name] = {"bits": bits, "wall_s": seconds}
            log(f"  {name}: {bits:.4f} bits/token after {steps} steps")
    gain = 1 - res["olmax"]["bits"] / res["t5x"]["bits"]
    return common.Section(
        name="t5x_quality",
        title="Language modelling against upstream T5X's transformer, equal steps and tokens",
        header=["model", "binary", "steps", "tokens", "held-out bits/token", "wall s (incl. compile, eval)"],
        rows=[["Olmax tiny (recall mixer)", "olmax.train", steps, steps * batch * length, res["olmax"]["bits"],
               res["olmax"]["wall_s"]],
              ["T5X decoder-only transformer", "t5x/train.py", steps, steps * batch * length, res["t5x"]["bits"],
               res["t5x"]["wall_s"]]],
        targets=[common.Target("Olmax better than T5X's transformer in held-out bits", ">= 4% fewer bits",
                               f"{100 * gain:+.1f}% ({res['olmax']['bits']:.3f} vs {res['t5x']['bits']:.3f})",
                               gain >= 0.04)],
        notes=[
            f"Corpus: `text_files` over `{args.corpus}` (English prose, not Python source), byte vocabulary; "
            "2% of the files held out by a hash of their text; both evaluate the same first "
            f"{eval_steps} unshuffled validation batches of {batch} x {length} (packed).",
            "Olmax: `python -m olmax.train --gin_file=gin/models/tiny.gin --gin_file=gin/runs/pretrain.gin` with "
            "its defaults (AdamW + AGC, the model file's LR, 10% warm-up, cosine).",
            "T5X: `t5x-run train --gin_file=benchmarks/t5x/transformer_tiny.gin --gin_file=t5x/configs/runs/"
            "pretrain.gin` with T5X's defaults (Adafactor, rsqrt schedule at 0.01 for the first 10k steps).",
            "Bits per token = mean cross-entropy / ln 2 (T5X: cross_ent_loss_per_all_target_tokens; Olmax: "
            "bits_per_token), without the z-loss.",
        ],
        data=res,
    )


def swap_bound(rows: list[list], length: int) -> tuple[int, float] | None:
    """(shorter length, Olmax at `length` / T5X at the shorter one) for a row whose T5X run paged
    to swap: a transformer's work per token only grows with the length (attention reads every
    earlier position; the rest is per token), so T5X cannot run faster per token at `length`
    than at the next shorter length measured, and this ratio is a lower bound that swap does
    not flatter. None without a shorter row."""
    olmax = next(r[3] for r in rows if r[0] == length)
    shorter = [r for r in rows if r[0] < length and r[4]]
    if olmax is None or not shorter:
        return None
    n = max(shorter, key=lambda r: r[0])
    return n[0], olmax / n[4]


def speed_targets(rows: list[list], swapped: dict[int, tuple[str, ...]], peer: str = "tiny") -> list[common.Target]:
    """The speed claims at 256, 4096 and 8192 (SPEED_TARGETS[peer]) from rows [length, batch,
    steps, Olmax, T5X, ratio]; swapped: {length: binaries that paged to swap there}. Olmax
    swapping voids its claim; T5X swapping makes the claim rest on `swap_bound` (the measured
    ratio is shown, not relied on)."""
    targets = []
    for n, want in SPEED_TARGETS[peer].items():
        for r in (r for r in rows if r[0] == n and r[5] is not None):
            measured, met = f"{r[5]:.2f}x", r[5] >= want
            if "olmax" in swapped.get(n, ()):
                measured, met = measured + " (Olmax swapped)", False
            elif "t5x" in swapped.get(n, ()):
                bound = swap_bound(rows, n)
                measured += (f"; T5X swapped, >= {bound[1]:.2f}x against T5X at {bound[0]}" if bound
                             else "; T5X swapped, no shorter row to bound it")
                met = bool(bound) and bound[1] >= want
            targets.append(common.Target(f"Olmax tokens/s vs T5X at N={n}", f">= {want:g}x", measured, met))
    return targets


def memory_targets(rows: list[list], swapped: dict[int, tuple[str, ...]]) -> list[common.Target]:
    """Memory per token not higher than T5X's, at each length both binaries ran without swapping
    (rows [length, batch, steps, Olmax, T5X, ratio, Olmax peak GiB, T5X peak GiB]; equal tokens
    per step, so the peaks' ratio is that of memory per token)."""
    targets = []
    for r in rows:
        if len(r) < 8 or None in r[6:8] or swapped.get(r[0]):
            continue
        targets.append(common.Target(f"Olmax peak memory per token vs T5X at N={r[0]}", "<= 1x",
                                     f"{r[6] / r[7]:.2f}x ({r[6]:.2f} vs {r[7]:.2f} GiB)", r[6] <= r[7]))
    return targets


def kept_rows(previous: dict | None, lengths: list[int]) -> tuple[list[list], dict[int, tuple], dict[str, str]]:
    """The rows of a `previous` speed section (as read back) that a run of `lengths` does not
    re-measure: (rows, their swap records, {length: the command, load and machine that measured it}).
    A row merged in before origins were recorded is credited to the previous run's command."""
    if not previous:
        return [], {}, {}
    rows = [r for r in previous["data"]["rows"] if r[0] not in lengths]
    swapped = {int(n): tuple(names) for n, names in previous["data"].get("swapped", {}).items()
               if any(r[0] == int(n) for r in rows)}
    c = previous["context"]
    before = f"`{c['command']}` (load {c['load'][0]:.1f} / {c['load'][1]:.1f}; {common.hardware_line(c['hardware'])})"
    return rows, swapped, {str(r[0]): previous["data"].get("origin", {}).get(str(r[0]), before) for r in rows}


def origin_notes(origin: dict[str, str]) -> list[str]:
    """One note per command that measured merged rows: "Rows of length 4096, 8192: from ..."."""
    return [f"Rows of length {', '.join(n for n in origin if origin[n] == o)}: from {o}."
            for o in dict.fromkeys(origin.values())]


def speed(args, log) -> common.Section:
    notes = []
    name_of_section = "t5x_speed" if args.peer == "tiny" else f"t5x_speed_{args.peer}"
    previous = common.read_section(args.out, name_of_section) if args.merge else None
    rows, swapped, origin = kept_rows(previous, [int(n) for n in args.lengths.split(",")])
    with tempfile.TemporaryDirectory() as tmp:
        for i, length in enumerate(int(n) for n in args.lengths.split(",")):
            batch = max(1, args.tokens // length)
            order = ("olmax", "t5x") if i % 2 == 0 else ("t5x", "olmax")
            res, peak = {}, {"olmax": None, "t5x": None}
            for name in order:
                model_dir = os.path.join(tmp, f"{name}_{length}")
                cmd = (olmax_command(model_dir, length, batch, 2 * args.steps, args.steps, 1) if name == "olmax"
                       else t5x_command(model_dir, length, batch, 2 * args.steps, args.steps, 1, args.peer))
                try:
                    _, swap, peak[name] = run(cmd, args.corpus, log, args.xla_flags)
                except RuntimeError as e:  # a binary that does not fit this machine at this length
                    oom = re.search(r"Out of memory allocating (\d+) bytes", str(e))
                    if not oom:
                        raise
                    res[name] = None
                    notes.append(f"N={length}: {name}'s train step ran out of memory (it asked for "
                                 f"{int(oom.group(1)) / 2**30:.1f} GiB at once; this machine has "
                                 f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB): no ratio.")
                    log("  " + notes[-1])
                    continue
                if swap >= 0.1:
                    swapped[length] = swapped.get(length, ()) + (name,)
                    notes.append(f"N={length}: {name}'s run wrote {swap:.1f} GiB to swap (it needs more memory than "
                                 "this machine has): its tok/s is a low estimate.")
                train = scalars(model_dir, "train")
                # The second half (compiled, warm), in non-padding target tokens: T5X's timing rate counts
                # every target position, so it is scaled by the same summary's non-padding fraction.
                res[name] = (last(train, "tokens_per_second") if name == "olmax" else
                             last(train, "timing/target_tokens_per_second")
                             * last(train, "non_padding_fraction/loss_weights"))
            ratio = res["olmax"] / res["t5x"] if None not in res.values() else None
            rows.append([length, batch, args.steps, res["olmax"], res["t5x"], ratio, peak["olmax"], peak["t5x"]])
            log(f"  N={length}: Olmax {res['olmax']} tok/s, T5X {res['t5x']} tok/s (ratio {ratio}); peak resident "
                f"{peak['olmax']} vs {peak['t5x']} GiB")
    rows.sort(key=lambda r: r[0])
    return common.Section(
        name=name_of_section,
        title="Training speed against upstream T5X's transformer"
              + (" at Olmax's depth and width" if args.peer == "matched" else ""),
        header=["length", "batch", "timed steps", "Olmax tok/s", "T5X tok/s", "Olmax / T5X", "Olmax peak GiB",
                "T5X peak GiB"],
        rows=[r + [None] * (8 - len(r)) for r in rows],  # rows merged from before the peaks were recorded
        targets=speed_targets(rows, swapped, args.peer) + memory_targets(rows, swapped),
        notes=[
            f"Each binary trains 2 x (timed steps) steps of {args.tokens} tokens (batch = {args.tokens} / length) on "
            f"`text_files` over `{args.corpus}`, packed; tokens/s over the second half, as each binary "
            "reports it, in non-padding target tokens (Olmax: tokens_per_second; T5X: "
            "timing/target_tokens_per_second, which counts every target position, times "
            "non_padding_fraction/loss_weights of the same summary). The two binaries alternate which runs "
            "first at each length.",
            "Peak GiB: each binary's maximum resident set (ru_maxrss, read by a small launcher process): the "
            "whole process, Python, "
            "TensorFlow's input pipeline and XLA's compiler included, at equal tokens per step, so their ratio is "
            "that of memory per token; a binary that paged to swap held more than it shows.",
            "Olmax: gin/models/tiny.gin with max_length = the length (K = mixer_block_for(length), README's "
            f"choice); T5X: benchmarks/t5x/{PEERS[args.peer]}.",
        ] + ([f"Both binaries ran with XLA_FLAGS={args.xla_flags} at the lengths of this run."] if args.xla_flags else [])
        + notes + origin_notes(origin),
        data={"rows": rows, "swapped": swapped, "xla_flags": args.xla_flags, "origin": origin},
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("quality", "speed"))
    parser.add_argument("--steps", type=int, default=None, help="quality: steps (600); speed: steps per half (10)")
    parser.add_argument("--eval_batches", type=int, default=20)
    parser.add_argument("--lengths", default="256,1024,4096,8192")
    parser.add_argument("--tokens", type=int, default=8192, help="speed: tokens per step")
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--merge", action="store_true", help="speed: keep the section's rows of other lengths")
    parser.add_argument("--peer", default="tiny", choices=sorted(PEERS),
                        help="speed: T5X's transformer as first compared (tiny: 6 layers) or at Olmax tiny's depth "
                             "and width (matched: 4 layers); each has its own section and targets")
    parser.add_argument("--xla_flags", default="", help="speed: XLA_FLAGS for both binaries, e.g. "
                        "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    args.steps = args.steps or (600 if args.what == "quality" else 10)
    if not glob.glob(args.corpus):
        raise SystemExit(f"No files match --corpus {args.corpus!r}.")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start, load0 = time.perf_counter(), common.load()
    section = quality(args, log) if args.what == "quality" else speed(args, log)
    context = {"command": "python -m benchmarks.t5x_peer " + " ".join(argv if argv is not None else sys.argv[1:]),
               "seconds": time.perf_counter() - start, "load": (load0, common.load()), "hardware": common.hardware()}
    log(common.write_section(args.out, section, context))


if __name__ == "__main__":
    main()
