"""Olmax on one GPU: training and cached decoding, recall mixer vs fused and materialized attention.

    python -m benchmarks.gpu                                # every row, one H200, < 5 min -> benchmarks/results/gpu
    python -m benchmarks.gpu --rows small-2048x32,decode    # rows whose names start so (--list prints them)
    python -m benchmarks.gpu --smoke --out /tmp/gpu         # tiny sizes on a CPU, < 45 s: the CI smoke run
    python -m benchmarks.gpu --plot benchmarks/results/gpu/gpu.json --out benchmarks/results/gpu   # gpu.png

Imports jax, flax, optax, numpy, olmax's network modules and benchmarks.plots only (the GPU machine has
nothing else); --plot imports matplotlib. Writes <out>/gpu.json (every number, the
hardware, the measured peak) and <out>/gpu.md (the tables, also printed).

Three mixers side by side, one process, equal widths (gin/models/small.gin and base.gin
sizes, bf16 compute, fp32 parameters), called without segment ids (unpacked rows, so
"auto" attention is cuDNN's fused kernel on a GPU, the blockwise kernel elsewhere):
  recall                     mixer='recall', mixer_block K = mixer_block_for(length);
  attention (fused)          mixer='attention', attention_impl='auto';
  attention (materialized)   attention_impl='materialized', the O(N^2)-memory baseline (short rows only).

  train    one jitted step: mean next-token cross-entropy on random tokens (fp32 logits),
           gradient and an optax.adamw update, (params, opt_state) donated. tokens/s: batch x
           length / the median of --steps timed steps after a warm-up step; temp memory:
           the compiled step's memory_analysis(); MFU: olmax.perf.train_flops_per_token x
           tokens/s / the bf16 matmul peak measured in this run. Rows: small 2048 x 32, base
           4096 x 8, small at batch 1 from 8k to 512k tokens.
  block    the recall mixer at small 32k x 1 with K = 64 ... 512: the data for a K-per-length rule.
  chunk    the recall mixer at small 2048 x 32 and 32k x 1 with recall_chunk 256 ... 4096: its
           memory against the loop's cost (a chunk is one step of a sequential scan over the row).
  decode   small, batch 32, greedy, after prompts of 8k and 32k tokens, recall vs attention:
           an init + prefill jit, then a jit whose lax.fori_loop runs a traced number of
           cached steps; tokens/s = batch x (144 - 16) / (time of 144 steps - time of 16),
           medians of --steps runs each (the difference removes fixed costs); cache bytes:
           the prefilled cache's leaves.

Every program is compiled first, in parallel threads; then the rows run one at a time.
A row that raises (out of memory, say) is recorded as failed with the error and the run
goes on; a row is skipped, with the reason, when its temp memory + arguments exceed the
device's free memory, when its step would take over half of --row_budget_s (20 s; predicted
from the last MFU of its mixer), or once --budget_s (240 s) has passed since the start; a
row whose warm-up step is slow times fewer steps, to stay within --row_budget_s. JAX may
take 90% of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import plots
from olmax import decoding, network, perf

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu")
GiB = 2**30
OPTIMIZER = optax.adamw(1e-4, weight_decay=0.01)
# A row's mixer -> (OlmaxConfig.mixer, OlmaxConfig.attention_impl), and its label in the tables.
MIXERS = {
    "recall": ("recall", "auto"),
    "fused": ("attention", "auto"),
    "materialized": ("attention", "materialized"),
    "attention": ("attention", "auto"),  # decoding reads a KV cache; "auto" is the prefill's kernel
}
LABELS = {"recall": "recall", "fused": "attention (fused)", "materialized": "attention (materialized)",
          "attention": "attention"}


mixer_block_for = network.mixer_block_for

# ----------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Plan:
    models: dict[str, network.OlmaxConfig]  # name -> sizes (mixer, dtype, max_length and K set per row)
    dtype: Any
    fixed: tuple[tuple[str, int, int], ...]  # training rows (model, length, batch)
    long_lengths: tuple[int, ...]  # training rows of small at batch 1
    materialized_max_length: int  # materialized attention only up to this length
    sweep_length: int  # the block sweep: small, batch 1, recall mixer
    sweep_blocks: tuple[int, ...]
    chunk_rows: tuple[tuple[int, int], ...]  # the recall_chunk sweep: small (length, batch), recall mixer
    sweep_chunks: tuple[int, ...]
    decode_prompts: tuple[int, ...]
    decode_batch: int
    decode_steps: tuple[int, int]  # (n1, n2): decode tokens/s from the time difference of n2 and n1 steps
    steps: int  # timed training steps per row; timed runs of each decode length
    peak_n: int  # matmul size of the measured peak
    budget_s: float  # no row starts later than this after the start
    row_budget_s: float  # a row's timed steps (after compiling) stay within about this
    compiler_options: dict | None = None  # XLA's, for every program


SMALL = network.OlmaxConfig(vocab_size=384, features=512, depth=12, max_length=2048, conv_features=768, conv_kernel=5,
                            mixer_block=64, mixer_heads=8, num_heads=8, reversible=True)
BASE = dataclasses.replace(SMALL, features=768, depth=24, max_length=4096, conv_features=1664, mixer_heads=12,
                           num_heads=12)
GPU = Plan(
    models={"small": SMALL, "base": BASE}, dtype=jnp.bfloat16,
    fixed=(("small", 2048, 32), ("base", 4096, 8)),
    long_lengths=(8192, 16384, 32768, 131072, 262144, 524288), materialized_max_length=8192,
    sweep_length=32768, sweep_blocks=(64, 128, 256, 512),
    chunk_rows=((2048, 32), (32768, 1)), sweep_chunks=(256, 512, 1024, 4096),
    decode_prompts=(8192, 32768), decode_batch=32, decode_steps=(16, 144),
    steps=5, peak_n=8192, budget_s=240.0, row_budget_s=20.0,
)
# The smoke run is compile-bound and its timings mean nothing: compile without LLVM's
# optimizations (~3x faster to compile; buffer assignment, hence temp memory, is the same).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Blockwise attention tiles of 64 so that, as at GPU lengths, a tile is a fraction of the row.
TINY = dataclasses.replace(SMALL, features=64, depth=2, conv_features=64, mixer_heads=4, num_heads=4,
                           attention_block=64)
SMOKE = dataclasses.replace(
    GPU, models={"small": TINY}, dtype=jnp.float32, fixed=(), long_lengths=(256, 512),
    materialized_max_length=512, sweep_length=512, sweep_blocks=(32, 128),
    chunk_rows=((512, 1),), sweep_chunks=(128, 512), decode_prompts=(128, 512),
    decode_batch=2, decode_steps=(4, 36), steps=3, peak_n=512, budget_s=120.0, row_budget_s=30.0,
    compiler_options=FAST_COMPILE,
)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "train", "block" (the block sweep), "chunk" (the recall_chunk sweep) or "decode"
    model: str
    mixer: str  # a MIXERS key
    length: int  # tokens per sequence; decode: the prompt
    batch: int
    block: int  # mixer_block K
    chunk: int | None = None  # recall_chunk (None: the model's)

    def config(self, plan: Plan) -> network.OlmaxConfig:
        mixer, impl = MIXERS[self.mixer]
        positions = self.length + (plan.decode_steps[1] if self.kind == "decode" else 0)
        cfg = dataclasses.replace(plan.models[self.model], mixer=mixer, attention_impl=impl, dtype=plan.dtype,
                                  max_length=positions, mixer_block=self.block)
        return cfg if self.chunk is None else dataclasses.replace(cfg, recall_chunk=self.chunk)


def plan_rows(plan: Plan) -> list[Row]:
    """Every row, in the order they run."""
    rows = []
    for model, length, batch in plan.fixed + tuple(("small", n, 1) for n in plan.long_lengths):
        for mixer in ("recall", "fused", "materialized"):
            if mixer != "materialized" or length <= plan.materialized_max_length:
                rows.append(Row(f"{model}-{length}x{batch}-{mixer}", "train", model, mixer, length, batch,
                                mixer_block_for(length)))
    for k in plan.sweep_blocks:
        rows.append(Row(f"block-{plan.sweep_length}-k{k}", "block", "small", "recall", plan.sweep_length, 1, k))
    for prompt in plan.decode_prompts:
        for mixer in ("recall", "attention"):
            rows.append(Row(f"decode-{prompt}-{mixer}", "decode", "small", mixer, prompt, plan.decode_batch,
                            mixer_block_for(prompt + plan.decode_steps[1])))
    # last: the sweep of a setting, after every row that measures a claim (the budget may cut it)
    for length, batch in plan.chunk_rows:
        for chunk in plan.sweep_chunks:
            rows.append(Row(f"chunk-{length}x{batch}-c{chunk}", "chunk", "small", "recall", length, batch,
                            mixer_block_for(length), chunk))
    return rows


# ----------------------------------------------------------------------- programs


def init_fn(cfg: network.OlmaxConfig) -> Callable[[], Any]:
    """() -> parameters (fp32; their shapes depend on neither the length nor K)."""
    module = network.Olmax(cfg)
    return lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), enable_dropout=False)["params"]


def train_step(cfg: network.OlmaxConfig) -> Callable:
    """(params, opt_state, tokens [b, t]) -> (params, opt_state, loss): next-token cross-entropy and adamw."""
    module = network.Olmax(cfg)

    def loss_fn(params, tokens):
        logits = module.apply({"params": params}, tokens, enable_dropout=False)  # [b, t, vocab] fp32
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def decode_fns(cfg: network.OlmaxConfig, batch: int, prompt_length: int) -> tuple[Callable, Callable]:
    """prefill(params, prompt [b, P]) -> the cache after the first P - 1 tokens (the last one is fed
    by the first step), and loop(params, cache, tokens [b], steps) -> tokens [b] after `steps` greedy steps."""
    module = network.Olmax(cfg)

    def prefill(params, prompt):
        cache = decoding.init_cache(module, params, batch, cfg.max_length)
        return decoding.prefill(module, params, cache, prompt, jnp.full((batch,), prompt_length - 1, jnp.int32))

    def loop(params, cache, tokens, steps):
        step = decoding.cached_step_fn(module, params, cfg.max_length)

        def body(_, carry):
            logits, cache = step(*carry)  # [b, vocab]
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, body, (tokens, cache))[0]

    return prefill, loop


def lower(row: Row, plan: Plan) -> list:
    """The row's programs lowered on abstract arguments (nothing is allocated)."""
    cfg = row.config(plan)
    params = jax.eval_shape(init_fn(cfg))
    tokens = jax.ShapeDtypeStruct((row.batch, row.length), jnp.int32)
    if row.kind != "decode":
        opt_state = jax.eval_shape(OPTIMIZER.init, params)
        return [jax.jit(train_step(cfg), donate_argnums=(0, 1)).lower(params, opt_state, tokens)]
    prefill, loop = decode_fns(cfg, row.batch, row.length)
    cache = jax.eval_shape(prefill, params, tokens)
    first, steps = jax.ShapeDtypeStruct((row.batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    return [jax.jit(prefill).lower(params, tokens), jax.jit(loop).lower(params, cache, first, steps)]


def compile_all(rows: list[Row], plan: Plan, pool: ThreadPoolExecutor) -> dict[str, Future]:
    """Row name -> future of its compiled programs. Lowering runs here (tracing holds the GIL),
    compiling in the pool (XLA releases it); a lowering error is the future's exception."""
    futures = {}
    for row in rows:
        try:
            lowered = lower(row, plan)
        except Exception as e:  # noqa: BLE001  (recorded as the row's failure)
            futures[row.name] = Future()
            futures[row.name].set_exception(e)
            continue
        options = plan.compiler_options
        futures[row.name] = pool.submit(lambda lowered=lowered: [low.compile(options) for low in lowered])
    return futures


# ------------------------------------------------------------------------ running


@dataclasses.dataclass
class Context:
    plan: Plan
    start: float  # time.perf_counter() at the start
    peak: float  # measured matmul FLOP/s
    params: dict = dataclasses.field(default_factory=dict)  # (model, mixer) -> initialized parameters
    last_mfu: dict = dataclasses.field(default_factory=dict)  # row mixer -> MFU of its last timed row

    def init_params(self, row: Row):
        key = (row.model, MIXERS[row.mixer][0])
        if key not in self.params:
            init = jax.jit(init_fn(row.config(self.plan))).lower().compile(self.plan.compiler_options)
            self.params[key] = init()
        return self.params[key]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def free_bytes() -> int | None:
    """Device memory not in use, where the platform reports it."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def run_train(row: Row, compiled: list, ctx: Context) -> dict:
    (step,) = compiled
    cfg, tokens_per_step = row.config(ctx.plan), row.batch * row.length
    memory = step.memory_analysis()
    flops = perf.train_flops_per_token(cfg, row.length)
    out = {"temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
           "flops_per_token": flops, "kb_per_token": memory.temp_size_in_bytes / tokens_per_step / 1024}
    need, free = memory.temp_size_in_bytes + memory.argument_size_in_bytes, free_bytes()
    if free is not None and need > free:
        return {**out, "status": "skipped", "reason": f"would not fit: temp + arguments {need / GiB:.1f} GiB > "
                                                      f"{free / GiB:.1f} GiB free"}
    if row.mixer in ctx.last_mfu:
        predicted = flops * tokens_per_step / (ctx.last_mfu[row.mixer] * ctx.peak)
        if predicted > ctx.plan.row_budget_s / 2:
            return {**out, "status": "skipped", "reason": f"predicted {predicted:.2g} s per step (from the last "
                                                          f"{row.mixer} row's MFU) > half the row budget of "
                                                          f"{ctx.plan.row_budget_s:g} s"}
    params = jax.tree.map(jnp.copy, ctx.init_params(row))  # the step consumes (donates) its state
    state = [params, OPTIMIZER.init(params)]
    tokens = jax.random.randint(jax.random.PRNGKey(1), (row.batch, row.length), 0, cfg.vocab_size, jnp.int32)

    def one_step():
        state[0], state[1], loss = step(*state, tokens)
        return state, loss

    warm_s = timed(one_step)
    n = max(1, min(ctx.plan.steps, int((ctx.plan.row_budget_s - warm_s) / warm_s)))
    times = [timed(one_step) for _ in range(n)]
    step_s = float(np.median(times))
    tokens_per_s = tokens_per_step / step_s
    ctx.last_mfu[row.mixer] = flops * tokens_per_s / ctx.peak
    return {**out, "status": "ok", "reason": "" if n == ctx.plan.steps else f"{n} timed steps (row budget)",
            "warmup_s": warm_s, "step_s": times, "tokens_per_s": tokens_per_s, "mfu": ctx.last_mfu[row.mixer]}


def run_decode(row: Row, compiled: list, ctx: Context) -> dict:
    prefill, loop = compiled
    params = ctx.init_params(row)
    cfg = row.config(ctx.plan)
    prompt = jax.random.randint(jax.random.PRNGKey(2), (row.batch, row.length), 2, cfg.vocab_size, jnp.int32)
    cache = jax.block_until_ready(prefill(params, prompt))
    out = {"cache_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(cache))}
    n1, n2 = ctx.plan.decode_steps
    last = prompt[:, -1]
    run = {n: (lambda n=n: loop(params, cache, last, jnp.int32(n))) for n in (n1, n2)}
    jax.block_until_ready(run[n1]())  # warm-up
    times = {n1: [], n2: []}
    for _ in range(ctx.plan.steps):
        for n in times:
            times[n].append(timed(run[n]))
    seconds = float(np.median(times[n2]) - np.median(times[n1]))
    out.update(run_s={str(n): t for n, t in times.items()})
    if seconds <= 0:
        return {**out, "status": "failed", "reason": f"time of {n2} steps <= time of {n1} steps (noise)"}
    return {**out, "status": "ok", "reason": "", "tokens_per_s": row.batch * (n2 - n1) / seconds}


def run_row(row: Row, future: Future, ctx: Context) -> dict:
    """The row's record: what it is, and its numbers or why there are none."""
    record = {**dataclasses.asdict(row), "label": LABELS[row.mixer], "tokens_per_s": None}
    if time.perf_counter() - ctx.start > ctx.plan.budget_s:
        return {**record, "status": "skipped", "reason": f"the total budget of {ctx.plan.budget_s:.0f} s is spent"}
    try:
        compiled = future.result()
        return {**record, **(run_decode if row.kind == "decode" else run_train)(row, compiled, ctx)}
    except Exception as e:  # noqa: BLE001  (out of memory and the like: recorded, the run goes on)
        first_line = (str(e).strip().splitlines() or [""])[0]
        return {**record, "status": "failed", "reason": f"{type(e).__name__}: {first_line[:300]}"}


def hardware(peak: float) -> dict:
    device = jax.devices()[0]
    datasheet = next((p for name, p in perf.DATASHEET_PEAK.items() if device.device_kind.startswith(name)), None)
    return {"device_kind": device.device_kind, "platform": device.platform, "devices": jax.device_count(),
            "bytes_limit": (device.memory_stats() or {}).get("bytes_limit"), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "python": sys.version.split()[0],
            "measured_peak_flops": peak, "datasheet_peak_flops": datasheet}


def benchmark(plan: Plan, rows: list[Row], command: str) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        futures = compile_all(rows, plan, pool)
        for future in futures.values():  # compiles (and GPU autotuning) done before anything is timed
            future.exception()
    log(f"compiled {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    dtype = plan.dtype if jax.default_backend() == "gpu" else jnp.float32
    peak = perf.measure_matmul_peak(n=plan.peak_n, dtype=dtype)
    ctx = Context(plan, start, peak)
    records = []
    for row in rows:
        records.append(run_row(row, futures[row.name], ctx))
        log(f"{row.name:32s} {cell(records[-1]['tokens_per_s'], '.0f'):>10s} tok/s  {records[-1]['status']}"
            f" {records[-1]['reason']}")
    return {
        "command": command, "seconds": time.perf_counter() - start, "hardware": hardware(peak),
        "peak_matmul": f"{plan.peak_n}^2 {jnp.dtype(dtype).name}",
        "mixer_block_rule": "olmax.network.mixer_block_for",
        "models": {name: {**dataclasses.asdict(cfg), "dtype": jnp.dtype(plan.dtype).name}
                   for name, cfg in plan.models.items()},
        "decode_steps": plan.decode_steps, "steps": plan.steps, "rows": records,
    }


# ------------------------------------------------------------------------ reports


def log(msg: str) -> None:
    print(msg, flush=True)


def cell(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(result: dict) -> str:
    """gpu.md from gpu.json's contents."""
    hw, rows = result["hardware"], result["rows"]
    tok = {(r["kind"], r["model"], r["length"], r["batch"], r["mixer"]): r["tokens_per_s"] for r in rows}
    datasheet = hw["datasheet_peak_flops"]
    lines = [
        "# Olmax on one GPU: recall mixer vs attention", "",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s). Hardware: {hw['device_kind']} "
        f"({hw['platform']}), jax {hw['jax']}, flax {hw['flax']}, optax {hw['optax']}. Peak: "
        f"{hw['measured_peak_flops'] / 1e12:.1f} TFLOP/s measured ({result['peak_matmul']} matmul)"
        + (f", datasheet {datasheet / 1e12:.0f} TFLOP/s." if datasheet else "; no datasheet figure."),
        f"Attention (fused) here: {'cuDNN' if hw['platform'] == 'gpu' else 'the blockwise kernel (no GPU)'}. "
        f"K (mixer_block) per length: {result['mixer_block_rule']}. See benchmarks/gpu.py's docstring for the method.",
        "", "## Training (loss + gradient + adamw, one jit)", "",
        "| model | length | batch | K | mixer | tokens/s | / fused attention | temp GiB | KB per token | MFU % "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["kind"] == "train"):
        fused = tok.get(("train", r["model"], r["length"], r["batch"], "fused"))
        lines.append(f"| {r['model']} | {r['length']} | {r['batch']} | {r['block']} | {r['label']} | "
                     f"{cell(r['tokens_per_s'], ',.0f')} | {ratio(r['tokens_per_s'], fused)} | "
                     + step_cells(r))
    lines += ["", "## Block size sweep (recall, small, batch 1)", "",
              "| length | K | tokens/s | temp GiB | KB per token | MFU % | note |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "block"):
        lines.append(f"| {r['length']} | {r['block']} | {cell(r['tokens_per_s'], ',.0f')} | "
                     + step_cells(r))
    lines += ["", "## recall_chunk sweep (recall, small): tokens per row per step of the scan over the row", "",
              "| length | batch | recall_chunk | tokens/s | temp GiB | KB per token | MFU % | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "chunk"):
        lines.append(f"| {r['length']} | {r['batch']} | {r['chunk']} | {cell(r['tokens_per_s'], ',.0f')} | "
                     + step_cells(r))
    n1, n2 = result["decode_steps"]
    lines += ["", f"## Cached greedy decoding (small; tokens/s from {n2} - {n1} steps)", "",
              "| prompt | batch | K | mixer | decode tokens/s | recall / attention | cache GiB | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "decode"):
        attention = tok.get(("decode", r["model"], r["length"], r["batch"], "attention"))
        lines.append(f"| {r['length']} | {r['batch']} | {r['block']} | {r['label']} | "
                     f"{cell(r['tokens_per_s'], ',.0f')} | {ratio(r['tokens_per_s'], attention)} | "
                     f"{cell(gib(r.get('cache_bytes')), '.3g')} | {r['reason']} |")
    lines += ["", "MFU counts olmax.perf's model FLOPs (attention: every key, where causal kernels skip half; "
              "the reversible backward's recomputation not counted) over the measured peak."]
    return "\n".join(lines) + "\n"


def step_cells(r: dict) -> str:
    """A training row's last cells: temp GiB, KB per token, MFU %, note."""
    return (f"{cell(gib(r.get('temp_bytes')), '.2f')} | {cell(r.get('kb_per_token'), '.1f')} | "
            f"{cell(percent(r.get('mfu')), '.1f')} | {r['reason']} |")


def gib(x: float | None) -> float | None:
    return None if x is None else x / GiB


def percent(x: float | None) -> float | None:
    return None if x is None else 100 * x


def plot(json_path: str, out: str) -> str:
    """gpu.png: tokens/s and temp memory per token vs length, small at batch 1, one line per mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        result = json.load(f)
    rows = [r for r in result["rows"] if r["kind"] == "train" and r["model"] == "small" and r["batch"] == 1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, ylabel in ((axes[0], "tokens_per_s", "training tokens/s"),
                            (axes[1], "kb_per_token", "compiled temp memory per token (KB)")):
        for mixer, marker in zip(("recall", "fused", "materialized"), "os^"):
            points = [(r["length"], r[key]) for r in rows if r["mixer"] == mixer and r.get(key)]
            if points:
                ax.plot(*zip(*points), marker=marker, label=LABELS[mixer])
        plots.log_axes(ax, "sequence length (batch 1)", ylabel)
    not_run = [f"{r['name']}: {r['reason']}" for r in rows if not r["tokens_per_s"]]
    if not_run:
        axes[0].text(0.02, 0.03, "\n".join(not_run), transform=axes[0].transAxes, fontsize=6, va="bottom")
    fig.suptitle(f"Olmax small, training at batch 1 on {result['hardware']['device_kind']}")
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "gpu.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------- driver


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU (< 45 s): checks every path")
    parser.add_argument("--rows", default="", help="comma list: run the rows whose names start with one of these")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument("--steps", type=int, help="timed steps per training row, timed runs per decode length")
    parser.add_argument("--budget_s", type=float, help="no row starts after this many seconds (default 240)")
    parser.add_argument("--row_budget_s", type=float, help="seconds of timed steps per training row (default 20)")
    parser.add_argument("--out", default=RESULTS, help="output folder (default %(default)s)")
    parser.add_argument("--plot", metavar="RESULTS_JSON", help="draw <out>/gpu.png from a gpu.json and exit")
    args = parser.parse_args(argv)
    if args.plot:
        return log(f"wrote {plot(args.plot, args.out)}")
    plan = SMOKE if args.smoke else GPU
    plan = dataclasses.replace(plan, steps=args.steps or plan.steps, budget_s=args.budget_s or plan.budget_s,
                               row_budget_s=args.row_budget_s or plan.row_budget_s)
    rows = plan_rows(plan)
    wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
    unknown = [w for w in wanted if not any(r.name.startswith(w) for r in rows)]
    if unknown:
        parser.error(f"--rows {unknown} match no row; the rows: {', '.join(r.name for r in rows)}")
    if args.list:
        return log("\n".join(r.name for r in rows))
    rows = [r for r in rows if not wanted or any(r.name.startswith(w) for w in wanted)]
    # Before the GPU backend starts: room for the long rows (JAX preallocates 75% by default).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    result = benchmark(plan, rows, " ".join(["python -m benchmarks.gpu"] + argv))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(text)
    log(text)
    log(f"wrote {args.out}/gpu.json and gpu.md")


if __name__ == "__main__":
    main(sys.argv[1:])
