"""Long context: recall at distance, length generalization, and the longest row that trains.

    python -m benchmarks.long_context                                  # both sections, defaults below
    python -m benchmarks.long_context --sections distance --length 2048 --steps 600
    python -m benchmarks.long_context --sections distance --length 8192 --curriculum 256:2000 --steps 2600 \
        --pairs 8 --tokens_per_step 4096 --attention_eval_max 32768
    python -m benchmarks.long_context --sections longest --model tiny --max_row 524288

  distance  Recall at distance and length generalization. Each row: P key-value pairs
            (MQAR's alphabets, olmax/tasks/recall.py) as one block, random filler bytes
            (ids 132-255, disjoint from keys and values) everywhere else, and at the end of the
            row the P keys again in a random order, each followed by its value: the answers,
            each about D + 2P tokens after its pair. Training rows draw the gap D uniformly
            from [0, L - 4P]; the loss is on the answers only. The recall mixer and the
            attention baseline (equal parameters, `common.attention_twin`) train at equal steps
            on the same batches; each is then evaluated on held-out rows at the training length
            L and at longer lengths (4L, 16L: length generalization) with the pairs near, mid-way
            and at the start of the row (D = L/16, L/2 and L - 4P): answer accuracy and bits per
            answer by distance. --curriculum 256:2000 trains the first 2000 steps on 256-token
            rows (same tokens per step, so more rows), then the rest at L: how long-context
            models are trained, and what makes L = 8192 trainable here (at one row a step the
            lookup is not learned from scratch). --attention_eval_max bounds attention's
            evaluation rows (its forward is O(N^2): ~40 s a 128k row on 2 cores).
  longest   One real training step (loss, gradient, AdamW update) at batch 1 of the tiny (or
            small) model, doubling the row from 16k tokens, recall mixer vs the attention
            baseline (blockwise on a CPU): compiled temp memory, step seconds, tokens/s. A row
            whose compiled step needs more than --memory_gib is recorded as not fitting; a
            mixer stops doubling after a step longer than --step_limit_s.

Writes benchmarks/results/long_context_distance_<L>.{md,json,png} (one per training length L)
and long_context_longest[_small].{md,json,png}, after every chunk of training, so a stopped run keeps
what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, plots
from benchmarks.common import Section, Target
from olmax import models, network

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KEY0, KEYS, VALUE0, VALUES = 4, 64, 68, 64  # olmax/tasks/recall.py's alphabets (that module imports tensorflow)
FILLER0, FILLERS = 132, 124  # byte ids 132..255: noise, disjoint from keys and values
GiB = 2**30


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ rows


def distance_row(rng: np.random.RandomState, length: int, pairs: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [length], answer mask [length]): pairs at `length - 2 pairs - gap - 2 pairs`, queries at the end."""
    if not 0 <= gap <= length - 4 * pairs:
        raise ValueError(f"gap={gap} must be in [0, {length - 4 * pairs}] for {pairs} pairs in {length} tokens.")
    tokens = FILLER0 + rng.randint(FILLERS, size=length).astype(np.int32)
    keys = KEY0 + rng.choice(KEYS, pairs, replace=False)
    values = VALUE0 + rng.randint(VALUES, size=pairs)
    start = length - 4 * pairs - gap
    tokens[start:start + 2 * pairs:2], tokens[start + 1:start + 2 * pairs:2] = keys, values
    order = rng.permutation(pairs)
    q = length - 2 * pairs
    tokens[q::2], tokens[q + 1::2] = keys[order], values[order]
    answers = np.zeros(length, bool)
    answers[q + 1::2] = True
    return tokens, answers


def batch_of(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows -> the train step's features (common.TRAIN_KEYS); loss weights on the answers only."""
    return common.lm_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))


def eval_gaps(length: int, pairs: int) -> dict[str, int]:
    return {"near": length // 16, "mid": length // 2, "far": length - 4 * pairs}


# -------------------------------------------------------------- 1. distance


@dataclasses.dataclass(frozen=True)
class DistanceSetup:
    length: int = 2048
    eval_factors: tuple[int, ...] = (1, 4, 16)
    pairs: int = 8
    features: int = 64
    depth: int = 2
    heads: int = 2
    tokens_per_step: int = 8192
    steps: int = 600
    chunk: int = 100
    learning_rate: float = 3e-3
    val_rows: int = 16
    seed: int = 0
    # A length curriculum: (length, steps) stages trained, in order, before the rows of `length`
    # (at the same tokens per step); `steps` counts them.
    curriculum: tuple[tuple[int, int], ...] = ()
    attention_eval_max: int = 0  # evaluate attention on rows up to this long (0: all); its forward is O(N^2)

    def stage(self, step: int) -> tuple[int, int]:
        """(row length, the step where that stage ends) at training step `step`."""
        end = 0
        for length, steps in self.curriculum:
            end += steps
            if step < end:
                return length, end
        return self.length, self.steps

    @property
    def curriculum_steps(self) -> int:
        return sum(n for _, n in self.curriculum)

    def rows_per_step(self, length: int) -> int:
        return max(1, self.tokens_per_step // length)

    def evaluates(self, mixer: str, length: int) -> bool:
        return mixer != "attention" or not self.attention_eval_max or length <= self.attention_eval_max


def distance_config(mixer: str, s: DistanceSetup) -> network.OlmaxConfig:
    """K from the training length; max_length covers the longest evaluation (it only bounds the input here)."""
    cfg = common.olmax_config(s.features, s.depth, s.length * max(s.eval_factors), mixer="recall",
                              mixer_block=network.mixer_block_for(s.length), mixer_heads=s.heads, num_heads=s.heads,
                              conv_features=2 * s.features)
    return cfg if mixer == "recall" else common.attention_twin(cfg)


def score(cfg, params, rows: list) -> tuple[float, float]:
    """(answer accuracy, bits per answer) over rows, one row per call (rows may be long)."""
    hits = bits = n = 0.0
    for row in rows:
        b = batch_of([row])
        logp, ok = jax.device_get(common.target_logprobs(cfg)(params, b))
        mask = row[1][None]
        hits += float(ok[mask].sum())
        bits += float(-logp[mask].sum() / math.log(2))
        n += float(mask.sum())
    return hits / n, bits / n


def distance(s: DistanceSetup, out: str, mixers=("recall", "attention")) -> Section:
    if s.curriculum_steps >= s.steps:
        raise ValueError(f"The curriculum {s.curriculum} takes all {s.steps} steps: raise --steps past its "
                         f"{s.curriculum_steps} so that some train at {s.length}.")
    train_rng = np.random.RandomState([s.seed, 0])
    cache: list[dict] = []

    def data(i: int) -> dict:
        while len(cache) <= i:
            length = s.stage(len(cache))[0]
            cache.append(batch_of([distance_row(train_rng, length, s.pairs, train_rng.randint(length - 4 * s.pairs + 1))
                                   for _ in range(s.rows_per_step(length))]))
        return cache[i]

    first = s.stage(0)[0]
    trainees = [common.Trainee(m, distance_config(m, s), (s.rows_per_step(first), first), data, [],
                               learning_rate=s.learning_rate, warmup_steps=50, seed=s.seed) for m in mixers]
    curves: dict[str, list] = {t.name: [] for t in trainees}
    val = {(f, name): [distance_row(np.random.RandomState([s.seed, 1, f, i]), s.length * f, s.pairs, gap)
                       for i in range(s.val_rows)]
           for f in s.eval_factors for name, gap in eval_gaps(s.length * f, s.pairs).items()}
    section = None
    while any(t.step < s.steps for t in trainees):
        for t in trainees:
            length, end = s.stage(t.step)
            t.reshape((s.rows_per_step(length), length))
            t.train(min(s.chunk, end - t.step))
            acc, bits = score(t.cfg, t.state["params"], val[1, "far"])
            curves[t.name].append((t.step, acc, bits))
            log(f"  {t.name:9s} step {t.step:5d} (rows of {length})  far answers at L: accuracy {acc:.3f}, "
                f"{bits:.3f} bits "
                f"({t.seconds:.0f} s, load {common.load():.1f})")
        section = _distance_section(s, trainees, curves, val, final=all(t.step >= s.steps for t in trainees))
        write(out, section)
    return section


def generalization_factors(factors: tuple[int, ...]) -> list[int]:
    """The evaluation lengths (as multiples of L) that the length-generalization claim reads: 16L
    (the target's), or the shortest one beyond it where 16L was not evaluated (a harder test),
    and the longest one; the longest alone where none reaches 16L."""
    over = [f for f in factors if f >= 16]
    return sorted({min(over), max(over)}) if over else [f for f in [max(factors)] if f > 1]


def _distance_section(s: DistanceSetup, trainees, curves, val, final: bool) -> Section:
    res: dict[tuple[str, int, str], tuple[float, float]] = {}
    for t in trainees:
        for (f, name), rows in val.items():
            if (final or f == 1) and s.evaluates(t.name, s.length * f):
                res[t.name, f, name] = score(t.cfg, t.state["params"], rows)
    rows_out = []
    for f in s.eval_factors:
        for name, gap in eval_gaps(s.length * f, s.pairs).items():
            row = [s.length * f, name, gap + 2 * s.pairs]
            for t in trainees:
                row += list(res.get((t.name, f, name), (None, None)))
            rows_out.append(row)
    targets = []
    names = [t.name for t in trainees]
    if "recall" in names and ("recall", 1, "far") in res:
        acc, bits = res["recall", 1, "far"]
        targets.append(Target(f"recall mixer, trained at {s.length}: far answers' accuracy", ">= 0.95", f"{acc:.3f}",
                              acc >= 0.95))
        if ("attention", 1, "far") in res:
            att_bits = res["attention", 1, "far"][1]
            targets.append(Target(f"recall mixer bits per far answer vs attention's at {s.length}, equal steps",
                                  "<= +0.1", f"{bits - att_bits:+.3f} ({bits:.3f} vs {att_bits:.3f})",
                                  bits - att_bits <= 0.1))
        if final:
            for f in generalization_factors(s.eval_factors):
                far = res["recall", f, "far"][0]
                targets.append(Target(f"length generalization: recall accuracy at {f}L ({s.length * f}) "
                                      f"vs at L, far answers", ">= 0.9x", f"{far:.3f} vs {acc:.3f}",
                                      far >= 0.9 * acc))
    fig, axes = common.figure(2)
    for t, marker in zip(trainees, "os"):
        steps = [c[0] for c in curves[t.name]]
        axes[0].plot(steps, [c[1] for c in curves[t.name]], marker=marker, label=t.name)
        for name, ls in (("near", ":"), ("far", "-")):
            xs = [s.length * f for f in s.eval_factors if (t.name, f, name) in res]
            axes[1].plot(xs, [res[t.name, f // s.length, name][0] for f in xs], marker=marker, ls=ls,
                         label=f"{t.name}, {name}")
    axes[0].set(xlabel="training step", ylabel=f"far answer accuracy at {s.length}", title="Recall at distance")
    axes[1].set_xscale("log", base=2)
    axes[1].set(xlabel="evaluation row length", ylabel="answer accuracy", title=f"Trained at {s.length}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    name = f"long_context_distance_{s.length}"  # one table per training length
    plot = common.save_figure(fig, RESULTS_OUT[0], f"{name}.png")
    step = min(t.step for t in trainees)

    def rows(length: int) -> str:
        n = s.rows_per_step(length)
        return f"{n} row{'s' if n > 1 else ''} per step"

    stages = "".join(f"{n} steps at length {length} ({rows(length)}), then " for length, n in s.curriculum)
    skipped = [s.length * f for f in s.eval_factors if not s.evaluates("attention", s.length * f)]
    return Section(
        name=name,
        title="Long context: recall at distance and length generalization",
        header=["eval length", "pairs at", "distance"] + [f"{n} {k}" for n in names for k in ("accuracy", "bits/answer")],
        rows=rows_out, targets=targets, plots=[plot],
        notes=[
            f"Trained {stages}{max(0, step - s.curriculum_steps)} steps at length {s.length}, {rows(s.length)}"
            f"{' (a length curriculum: one model throughout)' if s.curriculum else ''}, {s.pairs} pairs per row "
            "at a uniformly random distance, loss on the answers only; "
            f"model: features {s.features}, depth {s.depth}, {s.heads} heads, K = {network.mixer_block_for(s.length)} "
            "(from the training length), equal parameters (attention's conv width adjusted).",
            f"Evaluation: {s.val_rows} held-out rows per cell; 'distance' is the gap between a pair and its "
            "query block plus 2 P (every answer is within 2 P tokens of it). Rows longer than the training "
            f"length ({', '.join(str(s.length * f) for f in s.eval_factors if f > 1)}) are never trained on: "
            "length generalization. Attention uses rotary positions, so these rows reach angles it never saw.",
        ] + ([(f"Attention is not evaluated at {', '.join(map(str, skipped))} tokens (--attention_eval_max "
               f"{s.attention_eval_max}): its forward is O(N^2).")] if skipped and "attention" in names else [])
          + ([] if all(t.step >= s.steps for t in trainees) else ["In progress: longer rows are scored at the end."]),
        data={"curves": curves, "results": {f"{m}/{f}/{n}": v for (m, f, n), v in res.items()}},
    )


# --------------------------------------------------------------- 2. longest


MODELS = {
    "tiny": dict(features=128, depth=4, conv_features=256, mixer_heads=4, num_heads=4),  # olmax/gin/models/tiny.gin
    "small": dict(features=512, depth=12, conv_features=768, mixer_heads=8, num_heads=8),  # small.gin
}


def longest_name(model: str) -> str:
    """The longest-row section of a model: long_context_longest (tiny), long_context_longest_<model>."""
    return "long_context_longest" + ("" if model == "tiny" else f"_{model}")


def longest(model: str, first: int, max_row: int, memory_gib: float, step_limit_s: float, out: str,
            mixers=("recall", "attention"), keep: bool = False, note: str = "") -> Section:
    """Double the row from `first` for each mixer until it does not fit or its step exceeds the limit.
    keep: start from the rows of <out>/<longest_name(model)>.json and measure only the others."""
    rows, res = [], {}
    stopped: dict[str, str] = {}
    notes: list[str] = []
    if keep and (prev := common.read_section(out, longest_name(model))) is not None:
        for key, r in prev["data"]["results"].items():
            mixer, n = key.split("/")
            res[mixer, int(n)] = r
        rows = [list(r) for r in prev["rows"]]
        stopped = dict(prev["data"].get("stopped", {}))
        notes = [n for n in prev["data"].get("notes", []) if n != note]
        for m in {m for m, _ in res} - set(mixers) - set(stopped):
            nxt = 2 * max(n for mm, n in res if mm == m)
            stopped[m] = (f"{nxt:,} tokens not run (kept from an earlier run; its step, extrapolated from the two "
                          f"rows before, would take ~{_predicted_step(res, m, nxt):.0f} s)")
    notes += [note] if note else []
    length = first
    while length <= max_row:
        for mixer in mixers:
            if mixer in stopped or (mixer, length) in res:
                continue
            cfg = network.OlmaxConfig(vocab_size=common.BYTE_VOCAB, max_length=length, mixer=mixer, **MODELS[model])
            predicted = _predicted_step(res, mixer, length)
            if predicted > 2 * step_limit_s:  # clearly over the limit (the extrapolation is rough: run the doubtful)
                stopped[mixer] = (f"{length:,} tokens not run: its step, predicted {predicted:.0f} s from the two "
                                  f"rows before (step time x their ratio), exceeds twice {step_limit_s:g} s")
                continue
            r = _one_step(cfg, length, memory_gib, step_limit_s)
            res[mixer, length] = r
            rows.append([length, mixer, cfg.block_size if mixer == "recall" else None, r["gib"], r.get("step_s"),
                         r.get("tok_s"), r["why"]])
            log(f"  {mixer:9s} {length:7d} tokens: {r['gib']:.2f} GiB, step {r.get('step_s') or 0:.1f} s {r['why']}")
            if r["why"] or r["step_s"] > step_limit_s:
                stopped[mixer] = r["why"] or f"step {r['step_s']:.0f} s > {step_limit_s:g} s"
            write(out, _longest_section(model, rows, res, stopped, step_limit_s, notes))
        length *= 2
    return _longest_section(model, rows, res, stopped, step_limit_s, notes)


def _predicted_step(res: dict, mixer: str, length: int) -> float:
    """The next row's step seconds, extrapolated from the last two rows' growth (0 with fewer)."""
    done = [res[mixer, n]["step_s"] for n in (length // 4, length // 2) if res.get((mixer, n), {}).get("step_s")]
    return done[1] * done[1] / done[0] if len(done) == 2 else 0.0


def _one_step(cfg: network.OlmaxConfig, length: int, memory_gib: float, step_limit_s: float) -> dict:
    from olmax import optim

    lm = models.DecoderOnlyLM(network.Olmax(cfg))
    params = common.random_params(cfg, (1, 8))
    tx = optim.create_optimizer(learning_rate=1e-3, schedule="constant", warmup_steps=1)
    opt = tx.init(params)
    batch = {k: jnp.asarray(v) for k, v in common.token_batch(1, length).items()}

    def step(p, o, b):
        loss, g = jax.value_and_grad(lambda p: lm.loss_fn(p, b, None)[0])(p)
        u, o = tx.update(g, o, p)
        return jax.tree.map(lambda a, d: a + d, p, u), o, loss

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, batch).compile()
    mem = compiled.memory_analysis()
    gib = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / GiB
    if gib > memory_gib:
        return {"gib": gib, "why": f"does not fit: {gib:.1f} GiB > {memory_gib:g} GiB"}
    times = []
    for _ in range(2):  # the second step is the one reported, unless the first takes over a minute
        t = time.perf_counter()
        params, opt, loss = compiled(params, opt, batch)
        float(loss)
        times.append(time.perf_counter() - t)
        if times[0] > 60:
            break
    return {"gib": gib, "step_s": times[-1], "tok_s": length / times[-1], "why": "", "loss": float(loss)}


def _longest_section(model, rows, res, stopped, step_limit_s, notes=()) -> Section:
    def longest_row(mixer: str, limit: float) -> int:
        ok = [n for (m, n), r in res.items() if m == mixer and r.get("step_s") and r["step_s"] <= limit]
        return max(ok, default=0)

    rec = longest_row("recall", math.inf)
    rec_t, att_t = longest_row("recall", step_limit_s), longest_row("attention", step_limit_s)
    fits = [n for (m, n), r in res.items() if m == "recall" and r["why"].startswith("does not fit")]
    beyond = f" ({min(fits):,} does not fit)" if fits else ""
    targets = [Target(f"longest row the recall mixer trains at batch 1 ({model})", ">= 262,144 tokens", f"{rec:,}{beyond}",
                      rec >= 262144)] if model == "tiny" else [
        Target(f"longest row the recall mixer trains at batch 1 ({model})", "the longest that fits (reported)",
               f"{rec:,}{beyond}", bool(fits) and rec == min(fits) // 2)]
    if att_t:
        targets.append(Target(f"longest row within {step_limit_s:g} s a step: recall vs attention", ">= 4x",
                              f"{rec_t:,} vs {att_t:,} ({rec_t / att_t:.0f}x)", rec_t >= 4 * att_t))
    fig, (ax,) = common.figure(1)
    for mixer, marker in (("recall", "o"), ("attention", "s")):
        xs = sorted(n for (m, n), r in res.items() if m == mixer and r.get("step_s"))
        ax.plot(xs, [res[mixer, n]["step_s"] for n in xs], marker=marker, label=mixer)
    plots.log_axes(ax, "row length (tokens, batch 1)", "train step seconds")
    ax.set_title(f"One training step, {model} model")
    plot = common.save_figure(fig, RESULTS_OUT[0], f"{longest_name(model)}.png")
    return Section(
        name=longest_name(model), title=f"Long context: the longest row that trains ({model} model, batch 1)",
        header=["length", "mixer", "K", "temp + args GiB", "step s", "tokens/s", "not run"], rows=rows,
        targets=targets, plots=[plot],
        notes=[f"One jitted step (loss, gradient, AdamW update; params and optimizer state donated) at batch 1, "
               f"the second of two (the first alone when it takes over 60 s); model {MODELS[model]}, byte vocabulary, fp32, reversible; attention: "
               "the blockwise (flash-style) kernel, K: the recall mixer's mixer_block (network.mixer_block_for).",
               "Stopped: " + ("; ".join(f"{m}: {w}" for m, w in stopped.items()) or "none") + "."] + list(notes),
        data={"results": {f"{m}/{n}": r for (m, n), r in res.items()}, "stopped": stopped, "notes": list(notes)},
    )


# ------------------------------------------------------------------ driver


RESULTS_OUT = [RESULTS]
CONTEXT: dict = {}


def context() -> dict:
    """The run's command, hardware, seconds so far and load (before, now), as write_section records them."""
    fixed = {k: v for k, v in CONTEXT.items() if k not in ("start", "load0")}
    return dict(fixed, seconds=time.perf_counter() - CONTEXT["start"], load=[CONTEXT["load0"], common.load()])


def write(out: str, section: Section) -> None:
    common.write_section(out, section, context())


def parse_curriculum(text: str) -> tuple[tuple[int, int], ...]:
    """'256:1500,1024:500' -> ((256, 1500), (1024, 500))."""
    stages = []
    for part in filter(None, text.split(",")):
        try:
            length, steps = (int(x) for x in part.split(":"))
        except ValueError:
            raise SystemExit(f"--curriculum {text!r}: each stage is LENGTH:STEPS, e.g. 256:1500") from None
        stages.append((length, steps))
    return tuple(stages)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="distance,longest")
    parser.add_argument("--length", type=int, default=DistanceSetup.length, help="distance: training row length")
    parser.add_argument("--eval_factors", default="1,4,16", help="distance: evaluation lengths as multiples of it")
    parser.add_argument("--pairs", type=int, default=DistanceSetup.pairs)
    parser.add_argument("--steps", type=int, default=DistanceSetup.steps)
    parser.add_argument("--chunk", type=int, default=DistanceSetup.chunk)
    parser.add_argument("--tokens_per_step", type=int, default=DistanceSetup.tokens_per_step)
    parser.add_argument("--val_rows", type=int, default=DistanceSetup.val_rows)
    parser.add_argument("--features", type=int, default=DistanceSetup.features)
    parser.add_argument("--curriculum", default="",
                        help="distance: LENGTH:STEPS,... stages trained first (e.g. 256:1500), then --length")
    parser.add_argument("--attention_eval_max", type=int, default=0,
                        help="distance: longest evaluation row for attention (0: every length)")
    parser.add_argument("--mixers", default="recall,attention")
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS), help="longest: the model")
    parser.add_argument("--first_row", type=int, default=16384)
    parser.add_argument("--max_row", type=int, default=524288)
    parser.add_argument("--memory_gib", type=float, default=20.0)
    parser.add_argument("--step_limit_s", type=float, default=600.0)
    parser.add_argument("--keep", action="store_true", help="longest: keep the rows already in the results")
    parser.add_argument("--note", default="", help="longest: a note for the table (how the run went)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    RESULTS_OUT[0] = args.out
    os.makedirs(args.out, exist_ok=True)
    CONTEXT.update(command="python -m benchmarks.long_context " + " ".join(argv if argv is not None else sys.argv[1:]),
                   hardware=common.hardware(), start=time.perf_counter(), load0=common.load())
    sections = args.sections.split(",")
    if "distance" in sections:
        s = DistanceSetup(length=args.length, eval_factors=tuple(int(f) for f in args.eval_factors.split(",")),
                          pairs=args.pairs, steps=args.steps, chunk=args.chunk, tokens_per_step=args.tokens_per_step,
                          val_rows=args.val_rows, features=args.features, curriculum=parse_curriculum(args.curriculum),
                          attention_eval_max=args.attention_eval_max)
        log(common.section_markdown(distance(s, args.out, tuple(args.mixers.split(","))), context()))
    if "longest" in sections:
        sec = longest(args.model, args.first_row, args.max_row, args.memory_gib, args.step_limit_s, args.out,
                      tuple(args.mixers.split(",")), args.keep, args.note)
        write(args.out, sec)
        log(common.section_markdown(sec, context()))


if __name__ == "__main__":
    main()
