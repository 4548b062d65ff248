"""The seed's claims measured side by side: memory, throughput, quality, ablations, MFU.

    python -m benchmarks.run                                  # all sections (~30 min on 2 CPU cores)
    python -m benchmarks.run --quick                          # tiny sizes, < 60 s: the CI smoke run
    python -m benchmarks.run --only memory,throughput         # some sections
    python -m benchmarks.run --out benchmarks/results         # where tables and plots go (the default;
                                                              # --quick defaults to a temporary folder)

Writes, per section, <out>/<section>.md (table, targets, notes), <section>.json (the
raw numbers) and <section>*.png, and <out>/summary.md (every target, from all the
section files present); prints the tables.

  memory      compiled temp memory of loss + gradient vs depth: reversible, remat, plain.
  throughput  forward + backward tokens/s and compiled FLOPs vs sequence length,
              recall mixer, axial MLP-Mixer and attention at equal parameters.
  quality     validation bits per byte on olmax_stdlib at equal steps and equal
              wall-clock, Olmax (the default mixer) vs the attention baseline at length
              1024 (training chunks interleaved).
  ablations   SandwichLN vs PreNorm, RMSNorm vs LayerNorm: loss at equal steps, step time.
  mfu         model FLOPs per token x tokens/s over the fp32 matmul peak measured
              in the same run, at the small config (gin/models/small.gin sizes).
  block       the recall mixer's forward + backward tokens/s and step memory for each
              mixer_block K at each length: the data behind olmax.network.mixer_block_for.
  far_block   the same for each recall_far_block B at K = mixer_block_for(length): the
              data behind mixers.recall_layout's default (one far block up to 512
              tokens, far blocks of mixers.FAR_BLOCK beyond).

The machine is shared: variants run in one process, interleaved, and each table
reports min / median times and ratios; the 1-min load average is recorded.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, plots
from benchmarks.common import Section, Target
from olmax import layers, mixers, models, network, perf, reversible

SECTIONS = ("memory", "throughput", "quality", "ablations", "mfu", "block", "far_block")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Sizes:
    # memory: loss + gradient at [batch, length], width `features`, for each depth
    mem_depths: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    mem_ref_depth: int = 4
    mem_batch: int = 4
    mem_length: int = 1024
    mem_features: int = 64
    mem_check_rebuild: bool = True  # also compile the rebuilt forward with remat, against the model's
    # throughput: tokens per step fixed (batch = tokens / length, at least 1)
    tp_lengths: tuple[int, ...] = (256, 1024, 4096, 8192, 16384, 32768)
    tp_tokens: int = 8192
    tp_features: int = 64
    tp_depth: int = 1  # XLA's cost analysis counts a scan body once: depth 1 keeps compiled FLOPs exact
    tp_repeats: int = 3
    tp_max_temp_gib: float = 6.0  # do not run a variant whose compiled temp memory exceeds this
    tp_max_step_s: float = 45.0  # nor time more than once a variant whose step takes longer
    # (shorter, longer) lengths of the memory targets: attention's step memory grows at most
    # tp_mem_growth x over them (linear in N), and the recall mixer's at `longer` is at most attention's
    tp_mem_lengths: tuple[int, int] = (8192, 32768)
    tp_mem_growth: float = 5.0
    tp_ratio_length: int = 8192  # where the recall / attention tokens/s ratio is reported
    # quality: equal wall-clock race, Olmax vs attention
    q_features: int = 128  # gin/models/tiny.gin widths
    q_conv_features: int = 256
    q_depth: int = 4
    q_length: int = 1024  # where the issue asks for it; 2 x 1024 = the 8 x 256 tokens per step it had
    q_batch: int = 2
    q_budget_s: float = 240.0  # training seconds per model
    q_chunk: int = 20  # steps between evaluations
    q_val_batches: int = 8
    # ablations: equal steps, steps fitted to the time budget (at most abl_max_steps)
    abl_budget_s: float = 400.0  # training seconds for all variants together
    abl_max_steps: int = 400
    abl_chunk: int = 20
    # mfu: gin/models/small.gin sizes
    mfu_features: int = 512
    mfu_depth: int = 12
    mfu_conv_features: int = 768
    mfu_mixer_block: int = 64
    mfu_mixer_heads: int = 8
    mfu_length: int = 512
    mfu_batch: int = 2
    mfu_steps: int = 3
    peak_sizes: tuple[int, ...] = (1024, 2048)  # matmul sizes for the peak; the best one counts
    # block: the recall mixer's step at each length for each mixer_block K (tiny.gin's widths, depth 1)
    blk_lengths: tuple[int, ...] = (1024, 4096, 16384, 32768)
    blk_blocks: tuple[int, ...] = (16, 32, 64, 128, 256)
    blk_tokens: int = 16384
    blk_features: int = 128
    blk_repeats: int = 3
    blk_slack: float = 0.9  # the rule's K must reach this share of the fastest K's tokens/s
    # far_block: the recall mixer's step at each length for each recall_far_block B (tiny.gin's widths and
    # depth: the model whose speed README quotes), K = mixer_block_for(length)
    fb_lengths: tuple[int, ...] = (256, 512, 1024, 4096, 8192)
    fb_blocks: tuple[int, ...] = (64, 128, 256, 512)
    fb_tokens: int = 8192
    fb_depth: int = 4
    fb_repeats: int = 3
    fb_slack: float = 0.95  # the default layout must reach this share of the fastest B's tokens/s


QUICK = Sizes(
    mem_depths=(2, 4), mem_ref_depth=2, mem_batch=2, mem_length=128, mem_features=16,
    tp_lengths=(64, 256), tp_tokens=512, tp_features=16, tp_repeats=2, tp_mem_lengths=(64, 256), tp_mem_growth=100.0,
    tp_ratio_length=256,
    q_features=32, q_conv_features=64, q_depth=1, q_length=64, q_batch=4, q_budget_s=1.0, q_chunk=3, q_val_batches=2,
    abl_budget_s=1.0, abl_max_steps=4, abl_chunk=2,
    mem_check_rebuild=False,
    # = the quick quality model, whose compiled train step is then reused
    mfu_features=32, mfu_depth=1, mfu_conv_features=64, mfu_mixer_block=8, mfu_mixer_heads=4,
    mfu_length=64, mfu_batch=4, mfu_steps=2, peak_sizes=(256,),
    blk_lengths=(64, 256), blk_blocks=(8, 16), blk_tokens=512, blk_features=16, blk_repeats=2, blk_slack=0.0,
    fb_lengths=(256,), fb_blocks=(64,), fb_tokens=512, fb_depth=1, fb_repeats=2, fb_slack=0.0,
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------- 1. memory


def stack_loss(cfg: network.OlmaxConfig, remat: bool) -> Callable:
    """The Olmax loss with the plain residual stack and remat on or off.

    network.Stack always remats its plain stack, so for the no-remat baseline the
    forward is rebuilt here from the same parts (embedding, network.layer_fns,
    reversible.remat_stack, final norm, output kernel; parameters from Olmax.init):
    the same cross-entropy as DecoderOnlyLM.loss_fn, without its z-loss and metrics.
    """
    fns = network.layer_fns(cfg)
    final_norm = layers.Norm(cfg)

    def loss(params, batch):
        tokens = batch["decoder_input_tokens"]
        b, t = tokens.shape
        ctx = layers.Context(jnp.ones((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t)))
        x = jnp.take(params["embedding"], tokens, axis=0)  # [b,t] -> [b,t,d]
        rngs = jax.random.split(jax.random.PRNGKey(0), cfg.depth)
        x, _ = reversible.remat_stack(fns, params["decoder"]["layers"], x, ctx, rngs, layers.zero_aux(), remat=remat)
        x = final_norm.apply({"params": params["final_norm"]}, x)
        logits = jnp.einsum("btd,dv->btv", x, params["logits_kernel"])  # [b,t,d] -> [b,t,v]
        ce, _ = models.cross_entropy(logits, batch["decoder_target_tokens"])
        return jnp.mean(ce)

    return loss


def lower_grad(loss: Callable, params, batch: int, length: int):
    """jit(grad(loss)) lowered on abstract parameters and tokens (nothing is allocated)."""
    tok = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(params, {"decoder_input_tokens": tok, "decoder_target_tokens": tok})


# Buffer assignment (hence memory_analysis) does not depend on LLVM's optimizations; this
# cuts compile time ~3x where the program is analysed but never run.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_all(lowered: dict, options: dict | None = None) -> dict:
    """Compile in 2 threads (XLA compiles one program on one core, and releases the GIL)."""
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(lowered, pool.map(lambda low: low.compile(compiler_options=options), lowered.values())))


def memory(s: Sizes, out: str) -> Section:
    variants = ("reversible", "remat", "plain")
    lowered, n_params = {}, {}
    for depth in s.mem_depths:
        cfg = common.olmax_config(s.mem_features, depth, s.mem_length)
        params = common.param_shapes(cfg, (s.mem_batch, s.mem_length))  # the same for every stack
        n_params[depth] = models.param_count(params)
        for v in variants:
            c = dataclasses.replace(cfg, reversible=v == "reversible")
            if v == "plain":
                loss = stack_loss(c, remat=False)
            else:
                lm = models.DecoderOnlyLM(network.Olmax(c))
                loss = lambda p, b, lm=lm: lm.loss_fn(p, b, None)[0]  # noqa: E731
            lowered[v, depth] = lower_grad(loss, params, s.mem_batch, s.mem_length)
        if s.mem_check_rebuild and depth == s.mem_depths[0]:  # the rebuilt forward with remat vs the model's
            lowered["rebuilt", depth] = lower_grad(stack_loss(c, remat=True), params, s.mem_batch, s.mem_length)
    temp = {k: c.memory_analysis().temp_size_in_bytes / MiB for k, c in compile_all(lowered, FAST_COMPILE).items()}
    mib = {v: {d: temp[v, d] for d in s.mem_depths} for v in variants}
    d0 = s.mem_depths[0]
    rebuilt = temp.get(("rebuilt", d0), float("nan"))
    rows = []
    for depth in s.mem_depths:
        rows.append([depth, n_params[depth]] + [mib[v][depth] for v in variants])
        log(f"  depth {depth:3d}: " + "  ".join(f"{v} {mib[v][depth]:8.1f} MiB" for v in variants))

    ref, top = s.mem_ref_depth, max(s.mem_depths)
    ratio = {v: mib[v][top] / mib[v][ref] for v in variants}
    slope = {v: (mib[v][top] - mib[v][ref]) / (top - ref) for v in variants}
    extra = [[v, ratio[v], slope[v]] for v in variants]
    fig, (ax,) = common.figure()
    for v, marker in zip(variants, "os^"):
        ax.plot(s.mem_depths, [mib[v][d] for d in s.mem_depths], marker=marker, label=v)
    ax.set_xscale("log", base=2)
    ax.set_xticks(s.mem_depths, [str(d) for d in s.mem_depths])
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("compiled temp memory of loss + grad (MiB)")
    ax.set_yscale("log")
    ax.set_title(f"Memory vs depth (batch {s.mem_batch}, length {s.mem_length}, d {s.mem_features})")
    ax.grid(alpha=0.3)
    ax.legend()
    plot = common.save_figure(fig, out, "memory.png")
    cfg = common.olmax_config(s.mem_features, 1, s.mem_length)
    return Section(
        name="memory",
        title="Memory vs depth: reversible vs remat vs plain",
        header=["depth", "params", "reversible MiB", "remat MiB", "plain MiB"],
        rows=rows,
        extra_tables=[
            (f"Growth from depth {ref} to {top}:", ["stack", f"depth {top} / depth {ref}", "MiB per extra layer"], extra)
        ],
        targets=[Target("reversible: memory independent of depth", f"depth {top} / depth {ref} <= 1.3",
                        f"{ratio['reversible']:.2f}", ratio["reversible"] <= 1.3)],
        notes=[
            "`jax.jit(jax.grad(loss)).lower(...).compile().memory_analysis().temp_size_in_bytes`: the temporary "
            "buffers of one loss + gradient computation (parameters, inputs and gradients excluded), exact and "
            "deterministic; nothing is run (so the programs are compiled without LLVM's optimizations, which "
            "do not change buffer assignment).",
            f"Model: features {s.mem_features}, conv_features {cfg.conv_features}, mixer_block {cfg.block_size}, "
            f"4 heads, {cfg.mixer} mixer, byte vocabulary; batch {s.mem_batch} x length {s.mem_length}, fp32.",
            "reversible and remat: `DecoderOnlyLM.loss_fn` with `reversible=True` / `False` (network.Stack remats "
            "each layer). plain: the same forward rebuilt from `network.layer_fns` and "
            "`reversible.remat_stack(..., remat=False)` (plain autodiff, every activation stored), since the "
            "network offers no switch for it." + (
                f" Check of the rebuild: with remat on, at depth {d0}, it needs {rebuilt:.1f} MiB vs the "
                f"model's {mib['remat'][d0]:.1f} MiB." if s.mem_check_rebuild else ""),
            "The constant part (~one layer's working set, logits and the cross-entropy) is what every stack "
            "pays once; remat adds one residual-stream copy per layer, plain every intermediate of every layer.",
        ],
        plots=[plot],
        data={"mib": {v: {str(d): x for d, x in m.items()} for v, m in mib.items()}, "rebuilt_remat_mib": rebuilt},
    )


# --------------------------------------------------------------- 2. throughput


TP_MIXERS = ("recall", "axial", "attention")


def throughput(s: Sizes, out: str) -> Section:
    cap = s.tp_max_temp_gib * 2**30
    res: dict[tuple[int, str], dict] = {}
    params: dict[str, int] = {}
    rows = []
    for length in s.tp_lengths:
        batch = max(1, s.tp_tokens // length)
        olmax = common.olmax_config(s.tp_features, s.tp_depth, length, mixer="recall")
        cfgs = {"recall": olmax, "axial": dataclasses.replace(olmax, mixer="axial"),
                "attention": common.attention_twin(olmax)}
        data = common.token_batch(batch, length)
        runs: dict[str, Callable] = {}
        ps, lowered = {}, {}
        for mixer, cfg in cfgs.items():
            lm = models.DecoderOnlyLM(network.Olmax(cfg))
            ps[mixer] = common.random_params(cfg, (batch, length))
            params[mixer] = models.param_count(ps[mixer])
            lowered[mixer] = jax.jit(jax.grad(lambda p, b, lm=lm: lm.loss_fn(p, b, None)[0])).lower(ps[mixer], data)
        compiled_all = compile_all(lowered)
        for mixer, cfg in cfgs.items():
            compiled, p = compiled_all[mixer], ps[mixer]
            r = {
                "temp_mib": compiled.memory_analysis().temp_size_in_bytes / MiB,
                "flops_per_token": compiled.cost_analysis()["flops"] / (batch * length),
                "model_flops_per_token": perf.train_flops_per_token(cfg, length),
                "tok_s": None,
                "why": "",
            }
            res[length, mixer] = r
            if r["temp_mib"] * MiB > cap:
                r["why"] = f"needs {r['temp_mib'] / 1024:.1f} GiB temp memory > the {s.tp_max_temp_gib:g} GiB cap"
                continue
            first = common.timed(lambda c=compiled, p=p: c(p, data))  # warm-up, and a first estimate
            r["first_s"] = first
            if first > s.tp_max_step_s:
                r["times"] = [first]
                r["why"] = f"one step only ({first:.0f} s > {s.tp_max_step_s:g} s)"
            else:
                runs[mixer] = lambda c=compiled, p=p: c(p, data)
        times = common.interleaved(runs, s.tp_repeats)
        for mixer in cfgs:
            r = res[length, mixer]
            if mixer in times:
                r["times"] = times[mixer]
            if r.get("times"):
                r["step_s"] = min(r["times"])
                r["tok_s"] = batch * length / r["step_s"]
        tok = {m: res[length, m]["tok_s"] for m in TP_MIXERS}
        ratio = {m: tok[m] / tok["attention"] if tok[m] and tok["attention"] else None for m in ("recall", "axial")}
        rows.append([length, olmax.block_size, batch] + [tok[m] for m in TP_MIXERS] + [ratio["recall"], ratio["axial"]]
                    + [res[length, m]["flops_per_token"] / 1e6 for m in TP_MIXERS]
                    + [res[length, m]["temp_mib"] for m in TP_MIXERS])
        log(f"  N={length:6d} batch {batch:3d}: " + ", ".join(f"{m} {common.cell(tok[m])} tok/s" for m in TP_MIXERS)
            + f" {res[length, 'attention']['why']} (load {common.load():.1f})")

    fig, (ax1, ax2) = common.figure(2)
    for mixer, marker in zip(TP_MIXERS, "o^s"):
        xs = [n for n in s.tp_lengths if res[n, mixer]["tok_s"]]
        ax1.plot(xs, [res[n, mixer]["tok_s"] for n in xs], marker=marker, label=mixer)
        compiled = ax2.plot(s.tp_lengths, [res[n, mixer]["flops_per_token"] for n in s.tp_lengths], marker=marker,
                            label=f"{mixer} (compiled)")[0]
        ax2.plot(s.tp_lengths, [res[n, mixer]["model_flops_per_token"] for n in s.tp_lengths], ls=":",
                 color=compiled.get_color(), label=f"{mixer} (model)")
    for ax, ylabel in ((ax1, "forward + backward tokens/s"), (ax2, "FLOPs per token (fwd + bwd)")):
        plots.log_axes(ax, "sequence length", ylabel)
    not_run = [f"{m}, N={n}: not run ({r['why']})" for (n, m), r in res.items() if r["tok_s"] is None]
    if not_run:  # said below the lowest point
        ax1.set_ylim(bottom=min(r["tok_s"] for r in res.values() if r["tok_s"]) / 3)
        ax1.text(0.02, 0.03, "\n".join(not_run), transform=ax1.transAxes, ha="left", va="bottom", fontsize=7)
    ax1.set_title("Throughput vs length")
    ax2.set_title("FLOPs vs length")
    plot = common.save_figure(fig, out, "throughput.png")

    targets = throughput_targets(s, res)
    skipped = [f"N={n} {m}: {res[n, m]['why']}" for (n, m) in res if res[n, m]["why"]]
    cfg = common.olmax_config(s.tp_features, s.tp_depth, s.tp_lengths[-1], mixer="recall")
    att = common.attention_twin(cfg)
    return Section(
        name="throughput",
        title="Throughput vs sequence length: recall mixer, axial MLP-Mixer, attention",
        header=["length", "K", "batch"] + [f"{m} tok/s" for m in TP_MIXERS] + ["recall / attention",
                "axial / attention"] + [f"{m} MFLOP/tok" for m in TP_MIXERS] + [f"{m} temp MiB" for m in TP_MIXERS],
        rows=rows,
        targets=targets,
        notes=[
            f"Forward + backward (jit(grad(loss_fn))) of one batch of {s.tp_tokens} tokens (batch = "
            f"{s.tp_tokens} / length, at least 1); tokens/s from the min over {s.tp_repeats} runs, the "
            "mixers alternating, after a warm-up run.",
            f"Model: features {s.tp_features}, depth {s.tp_depth}, conv then mixer, reversible, fp32; "
            f"mixer block K = network.mixer_block_for(N) (both mixers); 4 heads (recall: {cfg.recall_features} recall "
            "features per head) / 4 axial groups; attention 4 heads with rotary.",
            f"Equal parameters: the attention model's conv width is {att.conv_features} instead of "
            f"{cfg.conv_features} so that it has the recall model's parameter count: "
            + ", ".join(f"{params[m]:,} ({m})" for m in TP_MIXERS) + " at the longest length (the axial "
            "mixer's block filter grows with max_length).",
            "MFLOP/tok: `compiled.cost_analysis()['flops']` per token (what XLA runs, including the "
            "reversible backward's recomputation; depth 1 because XLA counts a scan body once, whatever the "
            "number of layers). Dotted lines in the plot: olmax.perf.train_flops_per_token (model FLOPs). "
            "XLA counts a loop body once too: the blockwise attention kernel's tile loops and the recall "
            "mixer's and the conv block's scans over chunks (rows > recall_chunk, > conv_chunk) are under-counted "
            "there; the model FLOPs are not.",
            "attention: olmax/attention.py's blockwise (flash-style) kernel, the baseline a user would run off "
            "GPU: an online softmax over 512 x 512 tiles with a custom VJP, nothing N x N in forward or backward. "
            "(Before it, the baseline materialized [heads, N, N] fp32 scores: 4.1 GiB at 8192, 16 GiB at 16384.)",
            "temp MiB: compiled temp memory of the step (XLA's buffer assignment).",
        ] + ([f"Not run: {'; '.join(skipped)}."] if skipped else []),
        plots=[plot],
        data={"results": {f"{n}/{m}": r for (n, m), r in res.items()}, "params": params},
    )


def throughput_targets(s: Sizes, res: dict) -> list[Target]:
    """The attention baseline's memory grows linearly; the recall mixer's is at most its; the speed ratio."""
    short, long = s.tp_mem_lengths
    mib = {(n, m): res[n, m]["temp_mib"] for n in (short, long) for m in ("recall", "attention") if (n, m) in res}
    targets = []
    if len(mib) == 4:
        growth = mib[long, "attention"] / mib[short, "attention"]
        targets.append(Target(f"attention step memory grows linearly: N={short} -> {long}",
                              f"<= {s.tp_mem_growth:g}x", f"{growth:.2f}x ({mib[short, 'attention']:.0f} -> "
                              f"{mib[long, 'attention']:.0f} MiB)", growth <= s.tp_mem_growth))
        targets.append(Target(f"recall mixer step memory <= attention's at N={long}", "<= 1x",
                              f"{mib[long, 'recall'] / mib[long, 'attention']:.2f}x ({mib[long, 'recall']:.0f} vs "
                              f"{mib[long, 'attention']:.0f} MiB)", mib[long, "recall"] <= mib[long, "attention"]))
    n = s.tp_ratio_length
    if (n, "recall") in res:
        a, t = res[n, "recall"]["tok_s"], res[n, "attention"]["tok_s"]
        measured = f"{a / t:.2f}x ({a:.0f} vs {t:.0f} tokens/s)" if a and t else "not run"
        targets.append(Target(f"recall mixer vs attention tokens/s at N={n} (reported)", "reported", measured,
                              bool(a and t)))
    return targets


# ------------------------------------------------------------------ 3. quality


@functools.lru_cache(maxsize=None)
def _stdlib_data(s: Sizes):
    train_batches = common.stdlib_batches("train", s.q_batch, s.q_length, shuffle=True)
    val = common.stdlib_batches("validation", s.q_batch, s.q_length, shuffle=False).take(s.q_val_batches)
    return train_batches.__getitem__, val


def quality(s: Sizes, out: str) -> Section:
    data, val = _stdlib_data(s)
    olmax_cfg = common.olmax_config(s.q_features, s.q_depth, s.q_length, conv_features=s.q_conv_features)
    cfgs = {f"olmax ({olmax_cfg.mixer})": olmax_cfg, "attention": common.attention_twin(olmax_cfg)}
    trainees = [common.Trainee(n, c, (s.q_batch, s.q_length), data, val) for n, c in cfgs.items()]
    common.race_by_time(trainees, s.q_chunk, s.q_budget_s, log)
    ol, at = trainees
    steps = min(t.step for t in trainees)
    seconds = min(t.seconds for t in trainees)
    rows = []
    for t in trainees:
        rows.append([t.name, t.params, t.step, t.seconds, float(np.median(t.step_times)), t.bpb_at_step(steps),
                     t.bpb_at_seconds(seconds), t.curve[-1].bpb])
    at_time = (ol.bpb_at_seconds(seconds), at.bpb_at_seconds(seconds))
    at_steps = (ol.bpb_at_step(steps), at.bpb_at_step(steps))

    fig, (ax1, ax2) = common.figure(2)
    for t in trainees:
        pts = t.curve[1:]  # step 0 (~8 bits) would flatten the curves
        ax1.plot([p.step for p in pts], [p.bpb for p in pts], marker=".", label=t.name)
        ax2.plot([p.seconds for p in pts], [p.bpb for p in pts], marker=".", label=t.name)
    ax1.set_xlabel("training steps")
    ax2.set_xlabel("training seconds (jitted steps only)")
    for ax in (ax1, ax2):
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_title("Quality at equal steps")
    ax2.set_title("Quality at equal wall-clock")
    plot = common.save_figure(fig, out, "quality.png")
    return Section(
        name="quality",
        title="Quality: Olmax vs the attention baseline on olmax_stdlib",
        header=["model", "params", "steps", "train s", "s/step (median)", f"val bpb @ step {steps}",
                f"val bpb @ {seconds:.0f} s", "final val bpb"],
        rows=rows,
        targets=[Target(
            f"Olmax no worse than attention at equal wall-clock (length {s.q_length})", "olmax bpb <= attention bpb",
            f"{at_time[0]:.3f} vs {at_time[1]:.3f} bpb at {seconds:.0f} s", at_time[0] <= at_time[1],
        )],
        notes=[
            f"Both models: features {s.q_features}, conv_features {s.q_conv_features}, depth {s.q_depth}, mixer "
            f"block {olmax_cfg.block_size}, 4 groups / heads, conv then mixer, reversible, SandwichLN + "
            f"RMSNorm; sequences of {s.q_length} bytes, batch {s.q_batch}, packed; AdamW + AGC "
            "(olmax.optim.create_optimizer defaults) at LR 3e-3, 20 warm-up steps then constant; the same "
            "initialization seed and the same batches in the same order.",
            f"Equal parameters: the attention model's conv width is {cfgs['attention'].conv_features} (vs "
            f"{olmax_cfg.conv_features}): the mixers' difference in parameters goes into its conv width.",
            f"Training interleaved in chunks of {s.q_chunk} steps (the model behind in training time runs "
            f"next) until each has {s.q_budget_s:g} s of step time; validation bits per byte on "
            f"{len(val)} batches of the validation split (files never trained on) after every chunk. "
            "Wall-clock counts the jitted train steps only (no compile, data loading or evaluation).",
            f"Equal steps: step {steps} ({at_steps[0]:.3f} vs {at_steps[1]:.3f} bpb); equal wall-clock: "
            f"{seconds:.0f} s, linear between evaluations ({at_time[0]:.3f} vs {at_time[1]:.3f} bpb).",
        ],
        plots=[plot],
        data={"curves": {t.name: [dataclasses.asdict(p) for p in t.curve] for t in trainees}},
    )


# ---------------------------------------------------------------- 4. ablations


def ablations(s: Sizes, out: str) -> Section:
    data, val = _stdlib_data(s)
    base = common.olmax_config(s.q_features, s.q_depth, s.q_length, conv_features=s.q_conv_features)
    specs = {  # name: (config, initialization seed)
        "sandwich + rms (Olmax)": (base, 0),
        "pre + rms": (dataclasses.replace(base, placement="pre"), 0),
        "sandwich + layer": (dataclasses.replace(base, norm="layer"), 0),
        "sandwich + rms, seed 1": (base, 1),  # the noise floor: the same model from another initialization
    }
    trainees = [common.Trainee(n, c, (s.q_batch, s.q_length), data, val, seed=seed) for n, (c, seed) in specs.items()]
    for t in trainees:  # a first chunk each tells how many steps fit the budget
        t.train(s.abl_chunk)
    per_round = sum(float(np.median(t.step_times)) for t in trainees)
    steps = int(min(s.abl_max_steps, s.abl_budget_s / per_round) // s.abl_chunk * s.abl_chunk)
    steps = max(steps, 2 * s.abl_chunk)
    log(f"  {steps} steps each (~{per_round:.2f} s per round of one step each)")
    for t in trainees:
        t.step_times.clear()  # step times come from the interleaved chunks below only
    common.race_by_steps(trainees, s.abl_chunk, steps, log)
    b, pre, layer, twin = trainees
    bpb = {t.name: t.bpb_at_step(steps) for t in trainees}
    fast = {t.name: min(t.step_times) for t in trainees}  # the least disturbed step
    med = {t.name: float(np.median(t.step_times)) for t in trainees}
    tail = {t.name: float(np.mean([p.train_loss for p in t.curve[-2:]])) for t in trainees}
    rows = [[t.name, t.cfg.placement, t.cfg.norm, t.seed, t.params, bpb[t.name], tail[t.name], fast[t.name],
             med[t.name], fast[t.name] / fast[b.name]] for t in trainees]
    # The twin runs the very program of the baseline: its differences are noise.
    noise = abs(bpb[twin.name] - bpb[b.name])
    time_noise = abs(fast[twin.name] / fast[b.name] - 1)
    d_pre, d_layer = bpb[pre.name] - bpb[b.name], bpb[layer.name] - bpb[b.name]
    speed_layer, speed_pre = fast[layer.name] / fast[b.name] - 1, fast[pre.name] / fast[b.name] - 1

    fig, (ax1, ax2) = common.figure(2)
    for t in trainees:
        pts = [p for p in t.curve if p.step >= 2 * s.abl_chunk]
        ax1.plot([p.step for p in pts], [p.bpb for p in pts], marker=".", ls="--" if t is twin else "-", label=t.name)
    ax1.set_xlabel("training steps")
    ax1.set_ylabel("validation bits per byte")
    ax1.set_title("Ablations: loss at equal steps")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    names = [t.name.replace(" (Olmax)", "\n(Olmax)").replace(", seed", "\nseed") for t in trainees]
    ax2.bar(range(len(names)), [1e3 * fast[t.name] for t in trainees], color=["C0", "C1", "C2", "C3"], label="min")
    ax2.plot(range(len(names)), [1e3 * med[t.name] for t in trainees], "ko", label="median")
    ax2.set_xticks(range(len(names)), names, fontsize=7)
    ax2.set_ylabel("train step (ms)")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.set_title("Ablations: step time")
    ax2.grid(alpha=0.3, axis="y")
    plot = common.save_figure(fig, out, "ablations.png")
    base_bpb = bpb[b.name]
    return Section(
        name="ablations",
        title="The seed's ablations: SandwichLN vs PreNorm, RMSNorm vs LayerNorm",
        header=["variant", "placement", "norm", "init seed", "params", f"val bpb @ step {steps}",
                "train loss (last chunks)", "step s (min)", "step s (median)", "step time / Olmax (min)"],
        rows=rows,
        targets=[
            Target("SandwichLN beats PreNorm in loss (seed README: 1.43 vs 1.516)",
                   "pre - sandwich > 2x seed-to-seed",
                   f"{base_bpb:.3f} vs {bpb[pre.name]:.3f} bpb ({d_pre:+.3f}; seeds differ by {noise:.3f})",
                   d_pre > 2 * noise),
            Target("RMSNorm beats LayerNorm in loss (seed README: ~3%)", "layer - rms > 2x seed-to-seed",
                   f"{base_bpb:.3f} vs {bpb[layer.name]:.3f} bpb ({d_layer:+.3f}, {100 * d_layer / base_bpb:+.1f}%; "
                   f"seeds differ by {noise:.3f})", d_layer > 2 * noise),
            Target("RMSNorm faster than LayerNorm (seed README: 27%)", "LayerNorm step slower by > 2x seed-to-seed",
                   f"LayerNorm step {100 * speed_layer:+.1f}% (the same program, other seed: "
                   f"{100 * time_noise:+.1f}%)", speed_layer > 2 * time_noise),
        ],
        notes=[
            f"The quality section's Olmax model (features {s.q_features}, conv_features {s.q_conv_features}, depth "
            f"{s.q_depth}, {base.mixer} mixer, sequences {s.q_length}, batch {s.q_batch}, same optimizer and batches), "
            "changing one "
            "thing at a time: `placement='pre'` (a norm before the block only) or `norm='layer'` (mean-centred, "
            "with a bias); and the unchanged model from another initialization seed: its distance to the first "
            "(one pair of seeds, a rough estimate of the noise) sets the bar, a difference counts when it is "
            "more than twice that.",
            f"Each variant trains {steps} steps, in chunks of {s.abl_chunk} round-robin (order reversed every "
            "round), evaluated after each chunk; step time: the fastest and the median of its interleaved steps "
            "(the ratio and the speed target use the fastest, the least disturbed by other jobs).",
            f"PreNorm drops one norm per branch: its step is {100 * speed_pre:+.1f}% vs SandwichLN.",
            "The seed README's figures come from ~6k steps of a larger model on the Pile, with its L2 norm "
            f"(not a true RMSNorm); {steps} CPU steps of a {b.params / 1e6:.2g}M-parameter model can only show "
            "large effects.",
        ],
        plots=[plot],
        data={"curves": {t.name: [dataclasses.asdict(p) for p in t.curve] for t in trainees}},
    )


# ---------------------------------------------------------------------- 5. mfu


def mfu(s: Sizes, out: str) -> Section:
    cfg = common.olmax_config(
        s.mfu_features, s.mfu_depth, s.mfu_length, conv_features=s.mfu_conv_features, mixer_block=s.mfu_mixer_block,
        mixer_heads=s.mfu_mixer_heads, num_heads=s.mfu_mixer_heads,
    )
    batch = common.token_batch(s.mfu_batch, s.mfu_length, packed=True)
    trainee = common.Trainee("small", cfg, (s.mfu_batch, s.mfu_length), lambda i: batch, [])
    trainee.train(1)  # warm-up
    trainee.step_times.clear()
    def peak() -> float:
        return max(perf.measure_matmul_peak(n) for n in s.peak_sizes)

    peaks = [peak()]
    for _ in range(s.mfu_steps):  # steps and peak measurements alternate
        trainee.train(1)
        peaks.append(peak())
    tokens = s.mfu_batch * s.mfu_length
    step_s = min(trainee.step_times)
    tok_s = tokens / step_s
    flops = perf.train_flops_per_token(cfg, s.mfu_length)
    peak = max(peaks)
    value = flops * tok_s / peak
    value_median = flops * tokens / float(np.median(trainee.step_times)) / float(np.median(peaks))
    rows = [[f"small (d {cfg.features}, depth {cfg.depth})", trainee.params, s.mfu_length, s.mfu_batch, step_s, tok_s,
             flops / 1e6, peak / 1e9, 100 * value, 100 * value_median]]

    fig, (ax,) = common.figure()
    ax.bar(["model FLOP/s\n(fastest step)", "executed, ~4/3 x\n(reversible recompute)", "fp32 matmul peak\n(best)"],
           [flops * tok_s / 1e9, 4 / 3 * flops * tok_s / 1e9, peak / 1e9], color=["C0", "C9", "C7"])
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"MFU {100 * value:.1f}% (small config, {s.mfu_batch} x {s.mfu_length})")
    ax.grid(alpha=0.3, axis="y")
    plot = common.save_figure(fig, out, "mfu.png")
    return Section(
        name="mfu",
        title="Model FLOPs utilization on this CPU",
        header=["config", "params", "length", "batch", "step s (min)", "tokens/s", "model MFLOP/token",
                "peak GFLOP/s", "MFU %", "MFU % (medians)"],
        rows=rows,
        targets=[Target("MFU at the small config", ">= 45%", f"{100 * value:.1f}%", value >= 0.45)],
        notes=[
            f"Model: gin/models/small.gin sizes (features {cfg.features}, depth {cfg.depth}, conv_features "
            f"{cfg.conv_features}, mixer_block {cfg.block_size}, mixer_heads {cfg.mixer_heads}), reversible, "
            f"fp32, max_length {s.mfu_length}; the full train step of olmax.train (AdamW + AGC).",
            "MFU = olmax.perf.train_flops_per_token (3 x the forward's multiply-adds x 2; the reversible "
            "backward's recomputation of the forward is not counted) x tokens/s / the fp32 matmul peak "
            f"(olmax.perf.measure_matmul_peak: the best of {' and '.join(f'{n}^2' for n in s.peak_sizes)} "
            f"matmuls, 5 repeats each), measured before and after each of the {s.mfu_steps} timed train steps "
            "(after a warm-up step): MFU % uses the fastest step over the highest peak, the last column the "
            "medians of both.",
            "The reversible backward recomputes the forward, so the machine executes about 4/3 of the model "
            f"FLOPs: the hardware utilization is about {400 * value / 3:.0f}%.",
            f"Peak measurements (GFLOP/s): {', '.join(f'{p / 1e9:.0f}' for p in peaks)}; step times (s): "
            f"{', '.join(f'{t:.2f}' for t in trainee.step_times)}.",
        ],
        plots=[plot],
        data={"peaks": peaks, "step_times": trainee.step_times, "flops_per_token": flops},
    )


# ------------------------------------------------------------------- 6. block


def grad_steps(cfgs: dict, batch: int, length: int, repeats: int) -> dict:
    """{key: config} -> {key: {tok_s, temp_mib}}: each config's forward + backward (jit(grad(loss_fn)))
    on one [batch, length] batch, compiled together, timed interleaved (the min of `repeats` runs
    after a warm-up), with the compiled step's temp memory."""
    data = common.token_batch(batch, length)
    lowered, ps = {}, {}
    for key, cfg in cfgs.items():
        lm = models.DecoderOnlyLM(network.Olmax(cfg))
        ps[key] = common.random_params(cfg, (batch, length))
        lowered[key] = jax.jit(jax.grad(lambda p, d, lm=lm: lm.loss_fn(p, d, None)[0])).lower(ps[key], data)
    compiled = compile_all(lowered)
    runs = {key: (lambda c=compiled[key], p=ps[key]: c(p, data)) for key in cfgs}
    for run in runs.values():
        common.timed(run)  # warm-up
    times = common.interleaved(runs, repeats)
    return {key: {"tok_s": batch * length / min(times[key]),
                  "temp_mib": compiled[key].memory_analysis().temp_size_in_bytes / MiB} for key in cfgs}


def block(s: Sizes, out: str) -> Section:
    """The recall mixer's step for each K at each length, against network.mixer_block_for's choice."""
    res: dict[tuple[int, int], dict] = {}
    for length in s.blk_lengths:
        batch = max(1, s.blk_tokens // length)
        blocks = [k for k in s.blk_blocks if 4 * k <= length]
        cfgs = {k: common.olmax_config(s.blk_features, 1, length, mixer="recall", mixer_block=k,
                                       conv_features=2 * s.blk_features) for k in blocks}
        for k, r in grad_steps(cfgs, batch, length, s.blk_repeats).items():
            res[length, k] = r
        log(f"  N={length:6d}: " + ", ".join(f"K {k} {res[length, k]['tok_s']:.0f} tok/s "
                                            f"{res[length, k]['temp_mib']:.0f} MiB" for k in blocks))
    return block_section(s, res, out)


def block_section(s: Sizes, res: dict[tuple[int, int], dict], out: str) -> Section:
    """The block section's tables, targets and plot from its measurements {(length, K): {tok_s, temp_mib}}."""
    rows, per_k, targets = [], [], []
    for length in s.blk_lengths:
        batch = max(1, s.blk_tokens // length)
        blocks = [k for k in s.blk_blocks if (length, k) in res]
        fastest = max(blocks, key=lambda k: res[length, k]["tok_s"])
        leanest = min(blocks, key=lambda k: res[length, k]["temp_mib"])
        rule = network.mixer_block_for(length)
        share = res[length, rule]["tok_s"] / res[length, fastest]["tok_s"] if rule in blocks else None
        rows.append([length, batch, fastest, res[length, fastest]["tok_s"], leanest, res[length, leanest]["temp_mib"],
                     rule, share])
        per_k.append([length] + [res[length, k]["tok_s"] if k in blocks else None for k in s.blk_blocks]
                     + [res[length, k]["temp_mib"] if k in blocks else None for k in s.blk_blocks])
        if share is not None:
            targets.append(Target(f"mixer_block_for({length}) = {rule}: tokens/s vs the fastest K ({fastest})",
                                  f">= {s.blk_slack:g}x", f"{share:.2f}x", share >= s.blk_slack))

    fig, (ax1, ax2) = common.figure(2)
    for length in s.blk_lengths:
        ks = [k for k in s.blk_blocks if (length, k) in res]
        ax1.plot(ks, [res[length, k]["tok_s"] for k in ks], marker="o", label=f"N={length}")
        ax2.plot(ks, [res[length, k]["temp_mib"] for k in ks], marker="o", label=f"N={length}")
    plots.log_axes(ax1, "mixer_block K", "forward + backward tokens/s")
    plots.log_axes(ax2, "mixer_block K", "step temp memory (MiB)")
    ax1.set_title("Recall mixer speed vs K")
    ax2.set_title("Recall mixer memory vs K")
    plot = common.save_figure(fig, out, "block.png")
    return Section(
        name="block",
        title="The recall mixer's block size K: speed and memory by length",
        header=["length", "batch", "fastest K", "its tok/s", "leanest K", "its temp MiB", "mixer_block_for",
                "its tok/s / fastest"],
        rows=rows,
        extra_tables=[("Every K:", ["length"] + [f"K={k} tok/s" for k in s.blk_blocks]
                       + [f"K={k} temp MiB" for k in s.blk_blocks], per_k)],
        targets=targets,
        notes=[
            f"Forward + backward (jit(grad(loss_fn))) of {s.blk_tokens} tokens per step (batch = tokens / length); "
            f"tokens/s from the min over {s.blk_repeats} runs, the K values alternating, after a warm-up run; "
            f"temp MiB: the compiled step's temp memory. K only where 4 K <= length.",
            f"Model: features {s.blk_features}, depth 1, conv {2 * s.blk_features}, 4 heads, "
            f"{network.OlmaxConfig.recall_features} recall features per head, reversible, fp32.",
            "Per token and head the mixer costs ~4 K c (window scores and values) + K (r + c) (the own block's "
            "recall pairs) + 2 F c (write and read a state) + F c / K (pass the block states on), F = r (r+1)/2: "
            "the far part is linear in N at any K. Memory per token: ~2 K window scores + F (c+1) / K block "
            "states. Small K is cheap in FLOPs and heavy in states; large K the other way round.",
        ],
        plots=[plot],
        data={"results": {f"{n}/{k}": r for (n, k), r in res.items()}},
    )


def far_block(s: Sizes, out: str) -> Section:
    """The recall mixer's step for each far block size B at each length, against recall_layout's default."""
    res: dict[tuple[int, int], dict] = {}
    for length in s.fb_lengths:
        batch = max(1, s.fb_tokens // length)
        k = network.mixer_block_for(length)
        chunk = network.OlmaxConfig.recall_chunk
        default = mixers.recall_layout(length, k, None, chunk)[0] * k
        # B as mixers.recall_layout lays it out (a multiple of K); the default is one of them.
        sizes = sorted({mixers.recall_layout(length, k, b, chunk)[0] * k for b in s.fb_blocks if b >= k} | {default})
        cfgs = {b: common.olmax_config(s.q_features, s.fb_depth, length, mixer="recall", recall_far_block=b,
                                       conv_features=s.q_conv_features) for b in sizes}
        for b, r in grad_steps(cfgs, batch, length, s.fb_repeats).items():
            res[length, b] = dict(r, default=b == default, K=k)
        log(f"  N={length:6d} K={k}: " + ", ".join(f"B {b}{'*' if b == default else ''} {res[length, b]['tok_s']:.0f} "
                                                  f"tok/s {res[length, b]['temp_mib']:.0f} MiB" for b in sizes))
    return far_block_section(s, res, out)


def far_block_section(s: Sizes, res: dict[tuple[int, int], dict], out: str) -> Section:
    """The far_block section's tables, targets and plot from {(length, B): {tok_s, temp_mib, default, K}}."""
    rows, every, targets = [], [], []
    for length in s.fb_lengths:
        sizes = sorted(b for n, b in res if n == length)
        fastest = max(sizes, key=lambda b: res[length, b]["tok_s"])
        default = next(b for b in sizes if res[length, b]["default"])
        share = res[length, default]["tok_s"] / res[length, fastest]["tok_s"]
        rows.append([length, max(1, s.fb_tokens // length), res[length, default]["K"], default,
                     res[length, default]["tok_s"], res[length, default]["temp_mib"], fastest,
                     res[length, fastest]["tok_s"], share])
        every += [[length, b, res[length, b]["tok_s"], res[length, b]["temp_mib"],
                   res[length, b]["tok_s"] / res[length, default]["tok_s"]] for b in sizes]
        targets.append(Target(f"default far block at N={length} (B={default}): tokens/s vs the fastest B ({fastest})",
                              f">= {s.fb_slack:g}x", f"{share:.2f}x", share >= s.fb_slack))
    fig, (ax,) = common.figure(1)
    for length in s.fb_lengths:
        sizes = sorted(b for n, b in res if n == length)
        ax.plot(sizes, [res[length, b]["tok_s"] for b in sizes], marker="o", label=f"N={length}")
    plots.log_axes(ax, "recall_far_block B", "forward + backward tokens/s")
    ax.set_title("Recall mixer speed vs far block size")
    plot = common.save_figure(fig, out, "far_block.png")
    return Section(
        name="far_block",
        title="The recall mixer's far block size B: speed and memory by length",
        header=["length", "batch", "K", "default B", "its tok/s", "its temp MiB", "fastest B", "its tok/s",
                "default / fastest"],
        rows=rows,
        extra_tables=[("Every B:", ["length", "B", "tok/s", "temp MiB", "tok/s / default's"], every)],
        targets=targets,
        notes=[
            f"Forward + backward (jit(grad(loss_fn))) of {s.fb_tokens} tokens per step (batch = tokens / length); "
            f"tokens/s from the min over {s.fb_repeats} runs, the sizes alternating, after a warm-up run; "
            "temp MiB: the compiled step's temp memory.",
            f"Model: features {s.q_features}, depth {s.fb_depth}, conv {s.q_conv_features}, 4 heads (the quality "
            f"section's model: tiny.gin's widths in a full run), K = mixer_block_for(length), recall_chunk {network.OlmaxConfig.recall_chunk}, reversible, fp32. "
            f"B = recall_far_block in {list(s.fb_blocks)} (those >= K) as mixers.recall_layout lays it out, and the "
            "default (None): one far block for a row of at most 512 tokens that fits one recall chunk, far blocks of "
            f"{mixers.FAR_BLOCK} beyond.",
            "Per far block and head the recall part costs one [B, B] pair matmul over the quadratic kernel "
            "(r + c multiply-adds per pair) and one state write and read (2 F c per position, F = r (r+1)/2): "
            "larger B trades quadratic pairs for fewer states.",
        ],
        plots=[plot],
        data={"results": {f"{n}/{b}": r for (n, b), r in res.items()}},
    )


# --------------------------------------------------------------------- driver


RUNNERS = {"memory": memory, "throughput": throughput, "quality": quality, "ablations": ablations, "mfu": mfu,
           "block": block, "far_block": far_block}


# Sections with their own commands (benchmarks/recall.py, t5x_peer.py, long_context.py), summarized too.
OTHER_SECTIONS = ("recall", "t5x_quality", "t5x_speed", "long_context_longest")


def write_summary(out: str) -> str:
    """summary.md: every target of every section whose json is in `out`."""
    sections = [s for s in (common.read_section(out, name) for name in SECTIONS + OTHER_SECTIONS) if s is not None]
    targets = [Target(**t) for s in sections for t in s["targets"]]
    machines = {common.hardware_line(s["context"]["hardware"]) for s in sections} or {common.hardware_line(common.hardware())}
    # Sections are rerun one at a time, so they may come from different machines: then each line names its own.
    one = len(machines) == 1
    lines = [
        "# Olmax benchmarks: summary", "",
        f"Hardware: {next(iter(machines))}." if one else "Hardware: differs by section; each line names its machine.", "",
        "Sections (each from its own command; see its .md for details):", "",
    ]
    for s in sections:
        c = s["context"]
        where = "" if one else f", on {common.hardware_line(c['hardware'])}"
        lines.append(f"- [{s['title']}]({s['name']}.md): `{c['command']}`, {c['seconds']:.0f} s, "
                     f"load {c['load'][0]:.1f} -> {c['load'][1]:.1f}{where}")
    lines += ["", common.targets_table(targets), ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


# --quick is compile-bound and its timings mean nothing: a second process runs these
# sections meanwhile (they import no tensorflow), to use both cores of a small machine.
SIDE_LANE = ("memory", "throughput")


def start_side_lane(names: list[str], out: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", ",".join(names), "--out", out, "--no_summary"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (< 60 s): checks that everything runs")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", default=None, help=f"output folder (default {os.path.relpath(RESULTS)}; "
                        "with --quick a temporary folder)")
    parser.add_argument("--no_summary", action="store_true", help=argparse.SUPPRESS)  # a --quick side lane
    args = parser.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in only if x not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.quick:  # compile faster (quick numbers only show that everything runs); before JAX starts
        flags = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())
        if flags not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    out = args.out or (tempfile.mkdtemp(prefix="olmax_benchmarks_") if args.quick else RESULTS)
    os.makedirs(out, exist_ok=True)
    names = [n for n in SECTIONS if n in only]
    side = [n for n in names if n in SIDE_LANE] if args.quick and not args.no_summary else []
    lane = start_side_lane(side, out) if side and len(side) < len(names) else None
    sizes = QUICK if args.quick else Sizes()
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "") + (
        f" --only {','.join(only)}" if only != list(SECTIONS) else "")
    hw = common.hardware()
    log(f"{common.hardware_line(hw)}; load {common.load():.1f}; writing to {out}")
    start = time.perf_counter()

    def run_section(name: str) -> str:
        log(f"== {name}")
        t0, cpu0, load0 = time.perf_counter(), common.cpu_seconds(), common.load()
        section = RUNNERS[name](sizes, out)
        context = {"command": command, "hardware": hw, "seconds": time.perf_counter() - t0,
                   "cpu_seconds": common.cpu_seconds() - cpu0, "load": [load0, common.load()], "quick": args.quick}
        text = common.write_section(out, section, context)
        log(text)
        return text

    for name in names:
        if lane is None or name not in side:
            run_section(name)
    if lane is not None:
        output, _ = lane.communicate()
        log(output)
        if lane.returncode:
            raise SystemExit(f"benchmark sections {','.join(side)} failed (exit {lane.returncode})")
    if not args.no_summary:
        log(write_summary(out))
    log(f"done in {time.perf_counter() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
