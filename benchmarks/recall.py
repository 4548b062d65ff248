"""Recall: multi-query associative recall (olmax_recall tasks) for the recall mixer, the
seed's axial MLP-Mixer and attention, at equal steps on the same batches.

    python -m benchmarks.recall [--points 8x256,32x256,64x256,8x1024,32x1024,64x1024] [--steps N] [--merge]
    python -m benchmarks.recall --points 32x1024,64x1024 --steps 3000 --merge
    python -m benchmarks.recall --seeds 1,2 --mixers recall,attention --merge

Each point trains the three models (same width, depth, recipe; interleaved in chunks)
on `olmax_recall_{P}x{L}` and scores the held-out rows' answer positions: accuracy and
bits per answer token (perfect recall: 0; guessing among the 64 values: 6). The claim reads
every point at 1500 steps; a point trained longer (--steps 3000) gets a second row at its
last step, checked by a second claim (at 1024 tokens both attention and the recall mixer
learn the lookup abruptly, somewhere between steps ~1000 and ~1500, or later).
Writes benchmarks/results/recall.{md,json,png} after every round of chunks (the point in
progress at the models' last common step), so a run that is stopped keeps what it measured;
--merge keeps the points of recall.json that this run does not re-measure; with
--mixers recall it also keeps the other two mixers' figures of the points it re-measures
(same setup and batches: for a change to the recall mixer only; each point's note says so).
--seeds runs each point at several parameter initializations (same batches); the table
lists every seed and, for a task run at more than one, their mean, which the claims read:
at 1024 tokens the step at which a model learns the lookup moves by hundreds of steps from
one initialization to the next, for attention as much as for the recall mixer.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time

import jax
import numpy as np

from benchmarks import common
from olmax import network, tasks

MIXERS = ("recall", "axial", "attention")
OUT = os.path.join(os.path.dirname(__file__), "results")


@dataclasses.dataclass
class Setup:
    features: int = 64
    depth: int = 2
    heads: int = 2
    batch: int = 16
    steps: int = 1500
    chunk: int = 100
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    val_rows: int = 64
    recall_features: int = network.OlmaxConfig.recall_features
    seed: int = 0  # every model's parameter initialization (the batches do not change)


def config(mixer: str, length: int, s: Setup) -> network.OlmaxConfig:
    return common.olmax_config(s.features, s.depth, length, mixer=mixer, mixer_heads=s.heads, num_heads=s.heads,
                               conv_features=2 * s.features, recall_features=s.recall_features)


def score(trainee: common.Trainee, val: list[dict], pairs: int) -> tuple[float, float]:
    """(accuracy, bits per token) over the answer positions of the validation rows."""
    fn = common.target_logprobs(trainee.cfg)
    bits = hits = count = 0.0
    for b in val:
        logp, correct = jax.device_get(fn(trainee.state["params"], b))
        mask = tasks.answer_mask(b["decoder_target_tokens"], b["decoder_positions"], pairs)
        bits += float(-np.sum(logp[mask]) / math.log(2))
        hits += float(np.sum(correct[mask]))
        count += float(mask.sum())
    return hits / count, bits / count


def run_point(pairs: int, length: int, s: Setup, log, on_progress, mixers=MIXERS) -> dict:
    task = f"olmax_recall_{pairs}x{length}"
    batch = max(1, s.batch * 256 // length)  # equal tokens per step at every length
    train = common.task_batches(task, "train", batch, length, shuffle=True)
    val = common.task_batches(task, "validation", batch, length, shuffle=False).take(max(1, s.val_rows // batch))
    def answers_only(i: int) -> dict:  # Zoology's protocol: the loss is on the answers
        b = dict(train[i])
        mask = tasks.answer_mask(b["decoder_target_tokens"], b["decoder_positions"], pairs)
        b["decoder_loss_weights"] = mask.astype(b["decoder_loss_weights"].dtype)
        return b

    trainees = [common.Trainee(m, config(m, length, s), (batch, length), answers_only, [],
                               learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, seed=s.seed) for m in mixers]
    rows = {t.name: {"params": t.params, "curve": []} for t in trainees}
    point = {"pairs": pairs, "length": length, "seed": s.seed, "batch": batch, "task": task, "models": rows,
             "target_steps": s.steps}
    order = list(trainees)
    while any(t.step < s.steps for t in trainees):
        for t in order:
            t.train(min(s.chunk, s.steps - t.step))
            acc, bits = score(t, val, pairs)
            rows[t.name]["curve"].append((t.step, acc, bits))
            log(f"  {task} {t.name:9s} step {t.step:5d}  answer accuracy {acc:.3f}  bits/token {bits:.3f}  "
                f"({t.seconds:.0f} s, load {common.load():.1f})")
        order.reverse()
        for t in trainees:
            rows[t.name]["step_s"] = float(np.median(t.step_times))
        on_progress(finish(point))
    return finish(point)


def finish(point: dict) -> dict:
    """The point as measured so far: every model's figures at the models' last common step."""
    models = point["models"]
    common_step = min(r["curve"][-1][0] for r in models.values())
    out = dict(point, steps=common_step, models={})
    for name, r in models.items():
        curve = [c for c in r["curve"] if c[0] <= common_step]
        out["models"][name] = dict(r, curve=curve, accuracy=curve[-1][1], bits=curve[-1][2])
    return out


PROTOCOL_STEPS = Setup.steps  # the claim's step count at every point


def _in_progress(n: int) -> str:
    return f" ({n} point{'s' * (n > 1)} in progress)" if n else ""


def seed_of(point: dict) -> int:
    return point.get("seed", 0)  # points measured before --seeds existed ran seed 0


def by_task(points: list[dict]) -> dict[str, list[dict]]:
    """The points grouped by task (its seeds), in the order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p["task"], []).append(p)
    return groups


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def section(points: list[dict], s: Setup) -> common.Section:
    """One row per point (a task at one initialization seed) at PROTOCOL_STEPS, the claim's
    step count (or at the step a point in progress reached), and for a point trained longer
    (--steps) a second row at its last step, checked by a second claim. A task run at several
    seeds gets a `mean` row per step, and its claims read that mean: at 1024 tokens the step
    at which a model learns the lookup moves by hundreds of steps between initializations,
    for attention too, so one seed measures that step more than the mixer. A mixer not run
    at a seed (the axial one, say) shows as missing there."""
    rows, gaps, longer = [], [], []
    short = long_open = 0
    for task, group in by_task(points).items():
        at_step: dict[int, list[tuple[list, float, dict]]] = {}
        for p in sorted(group, key=seed_of):
            steps, target = p["steps"], p.get("target_steps", p["steps"])
            curves = {m: {c[0]: c[1:3] for c in r["curve"]} for m, r in p["models"].items()}
            for step in sorted({min(steps, PROTOCOL_STEPS), steps}):
                fig = [v for m in MIXERS for v in curves.get(m, {}).get(step, (None, None))]
                gap = curves["recall"][step][1] - curves["attention"][step][1]
                rows.append([task, seed_of(p), step] + fig + [gap])
                at_step.setdefault(step, []).append((fig, gap, p))
            short += steps < PROTOCOL_STEPS  # listed at the step it reached, not claimed
            long_open += PROTOCOL_STEPS < target and steps < target
        for step, entries in sorted(at_step.items()):
            mean_gap = float(np.mean([gap for _, gap, _ in entries]))
            if len(entries) > 1:
                rows.append([task, "mean", step] + [_mean(col) for col in zip(*(fig for fig, _, _ in entries))] + [mean_gap])
            finished = [gap for _, gap, p in entries if step >= p.get("target_steps", p["steps"])]
            if step == PROTOCOL_STEPS:
                gaps.append(mean_gap)
            elif step > PROTOCOL_STEPS and finished:
                longer.append(float(np.mean(finished)))
    measured = (f"worst {max(gaps):+.3f}" if gaps else "no point finished") + _in_progress(short)
    targets = [common.Target(f"recall mixer within 0.05 bits/token of attention at every point after {PROTOCOL_STEPS} "
                             "steps (mean over the seeds run)", "<= +0.05", measured,
                             bool(gaps) and not short and max(gaps) <= 0.05)]
    if longer or long_open:
        targets.append(common.Target(
            "the same at the points trained longer (their second row)", "<= +0.05",
            (f"worst {max(longer):+.3f}" if longer else "none finished") + _in_progress(long_open),
            bool(longer) and not long_open and max(longer) <= 0.05))
    cfg = config("recall", 256, s)
    full = max(points, key=lambda p: len(p["models"]))
    params = ", ".join(f"{k} {v['params']:,}" for k, v in full["models"].items())
    return common.Section(
        name="recall",
        title="Recall: multi-query associative recall at equal steps",
        header=["task", "seed", "steps"] + [f"{m} {q}" for m in MIXERS for q in ("accuracy", "bits/token")] + ["recall - attention bits"],
        rows=rows,
        targets=targets,
        notes=[
            f"Models: features {s.features}, depth {s.depth}, conv_features {cfg.conv_features}, {s.heads} heads, "
            f"K = mixer_block_for(N) (16 at 256, 64 at 1024; rows measured before 2026-12-05 used K = sqrt(N): "
            f"16 and 32, and no forget gate), reversible, fp32; parameters at length 256: {params}.",
            f"Recipe: steps (column; the claim at {PROTOCOL_STEPS}, a point trained longer has a second row) of "
            f"{s.batch * 256} tokens (batch {s.batch} x 256; fewer, longer rows at 1024), "
            f"AdamW + AGC, LR {s.learning_rate} after {s.warmup_steps} warm-up steps, constant; loss on the answer "
            "positions only (Zoology's protocol: the other tokens are random or filler); the same batches "
            "for every model, trained in interleaved chunks of {s.chunk} steps.".replace("{s.chunk}", str(s.chunk)),
            f"Scored on {s.val_rows} held-out rows per point, answer positions only (`olmax.tasks.answer_mask`): "
            "argmax accuracy and bits per answer token (perfect recall 0; guessing among the 64 values 6).",
            "Seed: the models' parameter initialization (the batches are the same at every seed); a task run at "
            "several seeds has a `mean` row, and the claims read it.",
        ] + [f"{p['task']} seed {seed_of(p)}: `{p.get('command', '(earlier run)')}`" + (f"; {p['note']}" if p.get("note") else "")
             for p in points],
        plots=["recall.png"],
        data={"setup": dataclasses.asdict(s), "points": points},
    )


def table_points(kept: list[dict], new: list[dict]) -> list[dict]:
    """The table's points: `new` ones, and of `kept` (recall.json's) those not re-measured yet,
    so that a --merge run stopped midway still lists every point; those with the claim's two
    models (recall and attention), sorted. A point is a task at one seed."""
    fresh = {point_key(p) for p in new}
    points = [dict(p, command=p.get("command", "(earlier run)")) for p in kept if point_key(p) not in fresh]
    return sorted((p for p in points + new if {"recall", "attention"} <= set(p["models"])),
                  key=lambda p: (p["length"], p["pairs"], seed_of(p)))


def point_key(p: dict) -> tuple[int, int, int]:
    return p["pairs"], p["length"], seed_of(p)


def plot(points: list[dict], out: str) -> None:
    """Answer accuracy against steps, one panel per task; seed 0 solid, other seeds dashed."""
    groups = by_task(points)
    fig, axes = common.figure(ncols=len(groups))
    for ax, (task, group) in zip(axes, groups.items()):
        for color, m in zip(("C0", "C1", "C2"), MIXERS):
            for p in group:
                if m in p["models"]:
                    steps, acc, _ = zip(*p["models"][m]["curve"])
                    ax.plot(steps, acc, color=color, linestyle="-" if seed_of(p) == 0 else "--",
                            marker="o" if seed_of(p) == 0 else None, label=m if p is group[0] else None)
        ax.set_title(task + (f" ({len(group)} seeds)" if len(group) > 1 else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("answer accuracy")
    axes[0].legend(fontsize=8)
    common.save_figure(fig, out, "recall.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="8x256,32x256,64x256,8x1024,32x1024,64x1024")
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--mixers", default=",".join(MIXERS),
                        help="a subset: for exploration, or with --merge to re-measure one changed mixer")
    parser.add_argument("--lr", type=float, default=Setup.learning_rate)
    parser.add_argument("--merge", action="store_true", help="keep recall.json's other points in the table")
    parser.add_argument("--recall_features", type=int, default=Setup.recall_features)
    parser.add_argument("--seeds", default=str(Setup.seed),
                        help="parameter initializations, each a point of its own (the table averages them per task)")
    args = parser.parse_args(argv)
    s = Setup(steps=args.steps, learning_rate=args.lr, recall_features=args.recall_features)
    start, load0 = time.perf_counter(), common.load()
    log = functools.partial(print, flush=True)
    command = "python -m benchmarks.recall" + "".join(f" {a}" for a in (argv if argv is not None else []))
    previous = common.read_section(args.out, "recall") if args.merge else None
    mixers = tuple(args.mixers.split(","))

    def recipe(setup: dict) -> dict:  # the setup but its steps and seed: each point records its own
        return {k: v for k, v in {**dataclasses.asdict(Setup()), **setup}.items() if k not in ("steps", "seed")}

    if previous and set(mixers) != set(MIXERS) and recipe(previous["data"]["setup"]) != recipe(dataclasses.asdict(s)):
        raise SystemExit(f"--merge with --mixers {args.mixers} keeps the other mixers' figures from recall.json, "
                         f"measured with another setup ({previous['data']['setup']}); re-run every mixer instead.")
    earlier = {point_key(p): p for p in (previous["data"]["points"] if previous else [])}
    specs = [tuple(int(v) for v in spec.split("x")) for spec in args.points.split(",")]
    measured: list[dict] = []

    def complete(point: dict) -> dict:
        """With --merge and a subset of the mixers: the other mixers' figures from recall.json's
        run of the same point (same task and seed, same setup, same batches; for a change to one
        mixer only)."""
        old = earlier.get(point_key(point))
        kept = [m for m in MIXERS if m not in point["models"] and old and m in old["models"]]
        if not kept:
            return point
        steps = min(point["steps"], old.get("steps", s.steps))
        models = {**{m: old["models"][m] for m in kept}, **point["models"]}
        out = finish(dict(point, models={m: dict(r, curve=[c for c in r["curve"] if c[0] <= steps])
                                         for m, r in models.items()}))
        note = f"{', '.join(kept)} from the earlier run `{old.get('command', '(earlier run)')}`"
        return dict(out, note="; ".join(n for n in (old.get("note"), note) if n))

    def write(progress: dict | None = None) -> None:
        # Read again: a run merging other points or seeds into the same --out side by side
        # may have written since this one started (its points are kept, this run's replaced).
        latest = common.read_section(args.out, "recall") if args.merge else None
        points = table_points(latest["data"]["points"] if latest else list(earlier.values()),
                              [complete(p) for p in measured + ([dict(progress, command=command)] if progress else [])])
        if not points:
            return
        os.makedirs(args.out, exist_ok=True)
        plot(points, args.out)
        context = {"command": command, "seconds": time.perf_counter() - start, "load": (load0, common.load()),
                   "hardware": common.hardware()}
        common.write_section(args.out, section(points, s), context)

    for pairs, length in specs:
        for seed in (int(v) for v in args.seeds.split(",")):
            measured.append(dict(run_point(pairs, length, dataclasses.replace(s, seed=seed), log, write, mixers),
                                 command=command))
            write()
    table = os.path.join(args.out, "recall.md")
    if measured and os.path.exists(table):  # without recall and attention there is no table
        with open(table) as f:
            log(f.read())

if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
