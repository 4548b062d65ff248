r"""Will it fit, and how fast? Compile the train step for a mesh before spending pod time.

    python -m olmax.plan --gin_file=gin/models/small.gin --mesh data=64,model=4 \
        [--batch_size 256 --length 2048 --device_kind "TPU v4" --peak_flops 275e12 \
         --device_memory_gb 32 --memory_bandwidth_gbs 1228 --utilization 0.6 --microbatches 1] \
        [--gin.KEY=VALUE ...]

The planner builds exactly what `olmax.train` builds (trainer.TrainSetup, trainer.make_steps,
PjitPartitioner with the Gin logical axis rules) on `data x model` simulated CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count, set before JAX starts),
and compiles the jitted, donated train step ahead of time from abstract shapes
(jax.ShapeDtypeStruct with shardings): no parameter is ever allocated, so a
multi-billion-parameter model plans on a laptop. It reports, per device:

  parameters / optimizer state / batch  from the sharded shapes (exact);
  temporaries (activations, gradients)  from compiled.memory_analysis(): XLA's
      buffer assignment for the CPU stand-in. TPU/GPU compilers fuse and lay out
      differently, so read it as an estimate (usually within tens of percent);
  model FLOPs per token                 olmax.perf.train_flops_per_token (the MFU numerator:
      3 x forward);
  XLA FLOPs and bytes per device        XLA's cost analysis of the compiled step, every layer
      counted (`compiled_cost`: the loops it would count once are unrolled at depth 1 and 2
      and extrapolated): what the program executes, the reversible stack's recomputed
      forward, gathers, pads and elementwise traffic included, so mixers, widths and meshes
      differ where they really differ;
  step time, tokens/s, expected MFU     a roofline: the slower of XLA FLOPs / (peak FLOP/s x
      --utilization) and XLA bytes / (memory bandwidth x --utilization), peak and
      bandwidth from the datasheet of --device_kind; MFU = model FLOPs / (step time x
      peak). The gradient all-reduce and the model-parallel collectives are listed
      (count and bytes per step, from the step's HLO, loops counted by their trip counts),
      not timed.
It exits with status 2 and a message naming the memory needed, the memory
available and what to change when the step does not fit in --device_memory_gb.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import re
import sys
from typing import Any, Callable

GIB = 1024**3

# HBM per chip (GiB), for --device_kind; the peak FLOP/s come from olmax.perf.DATASHEET_PEAK.
DEVICE_MEMORY_GB = {
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5e": 16,
    "TPU v5p": 95,
    "TPU v6e": 32,
    "NVIDIA H100": 80,
    "NVIDIA H200": 141,
    "NVIDIA A100": 80,
}


# More simulated CPU devices than this crash XLA's CPU client or take minutes to create.
MAX_SIMULATED_DEVICES = 8192

# HBM bandwidth per chip (bytes/s, datasheet), for --device_kind: the memory side of the roofline.
DEVICE_BANDWIDTH = {
    "TPU v4": 1228e9,
    "TPU v5 lite": 819e9,
    "TPU v5e": 819e9,
    "TPU v5p": 2765e9,
    "TPU v6e": 1640e9,
    "NVIDIA H100": 3350e9,
    "NVIDIA H200": 4800e9,
    "NVIDIA A100": 2039e9,
}


# Lanes of a TPU's matrix unit: every matmul dimension is padded up to a multiple of this.
TPU_LANES = 128


class DoesNotFit(ValueError):
    pass


def tile_use(config, lanes: int = TPU_LANES) -> dict[str, tuple[int, int]]:
    """{name: (width, padded width)} of the recall mixer's own matmul widths on `lanes`-wide
    tiles: F = feature_size(recall_features), the rows of each head's recall state that every
    read contracts; c, the head width; K, the window's keys per tile; B, the positions of a far block
    at max_length (each far block's pairs are one [B, B] matmul). A width just past a
    multiple of `lanes` (F = 136 at 16 recall features) costs nearly a whole tile more; XLA's
    CPU program, which the rest of the plan reads, does not show it. Empty for other mixers."""
    if config.mixer != "recall":
        return {}
    from olmax.mixers import feature_size, recall_layout

    m, _, _ = recall_layout(config.max_length, config.block_size, config.recall_far_block, config.recall_chunk)
    widths = {"F": feature_size(config.recall_features), "c": config.features // config.num_heads,
              "K": config.block_size, "B": m * config.block_size}
    return {name: (w, -(-w // lanes) * lanes) for name, w in widths.items()}


def _tile_advice(tiles: dict[str, tuple[int, int]]) -> str:
    """The tile row of `report`, with the recall_features whose F fits the tiles F now spills from."""
    from olmax.mixers import feature_size

    text = ", ".join(f"{n} {w}" + (f" -> {p} ({100 * w / p:.0f}%)" if p != w else " (100%)")
                     for n, (w, p) in tiles.items())
    width, padded = tiles["F"]
    fits = padded - TPU_LANES
    if width > fits > 0:
        r = max(r for r in range(1, fits + 1) if feature_size(r) <= fits)
        text += f"; recall_features={r} gives F={feature_size(r)} (a model change: retrain, re-measure recall)"
    return text


@dataclasses.dataclass
class Plan:
    """Per-device figures of one train step (bytes, FLOPs, seconds)."""

    mesh: dict[str, int]
    batch_size: int
    length: int
    microbatches: int
    param_count: int
    param_bytes: int  # per device, from the sharded shapes
    opt_state_bytes: int
    batch_bytes: int
    temp_bytes: int  # compiled temporaries: activations, gradients, workspace
    output_bytes: int  # compiled outputs not aliased to (donated) inputs
    argument_bytes: int  # compiled arguments: params + optimizer state + batch
    model_flops_per_token: float
    hardware_flops_per_token: float  # with the recomputed forward of the layers (analytic)
    peak_flops: float  # per device
    utilization: float  # assumed fraction of peak FLOP/s (and of memory bandwidth) sustained
    # XLA's cost analysis of the compiled step, per device, every layer counted (see `compiled_cost`).
    compiled_flops: float = 0.0
    compiled_bytes: float = 0.0  # bytes accessed (reads + writes of every op)
    memory_bandwidth: float | None = None  # per device, bytes/s; None: compute-bound estimate only
    device_memory_bytes: int | None = None
    total_param_bytes: int = 0  # unsharded, all devices together
    # Cross-device collectives of the compiled step: {op: (count, bytes per device)}; see `collectives`.
    # As written (a loop body once), and per step: every iteration of every loop, so a weight
    # gradient's all-reduce inside a scan over a row's chunks once per chunk, as the CPU
    # compiler leaves it.
    collectives: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    collectives_per_step: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Per step with each layer's collectives once per microbatch (the cost compiles, one chunk
    # per row): what the step moves when the accelerator's compiler sinks those per-chunk
    # all-reduces, whose results are only summed across the loop, out of it. Empty without `cost`.
    collectives_unchunked: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # The recall mixer's matmul widths on a TPU's tiles, `tile_use` (empty off TPU or for other mixers).
    tiles: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def devices(self) -> int:
        return self.mesh["data"] * self.mesh["model"]

    @property
    def needed_bytes(self) -> int:
        """Live at the peak: the step's arguments, its temporaries, outputs that do not reuse donated inputs."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.length

    @property
    def model_flops_per_device(self) -> float:
        return self.model_flops_per_token * self.tokens_per_step / self.devices

    @property
    def compute_seconds(self) -> float:
        """The step at `utilization` of peak FLOP/s, for the larger of XLA's FLOPs and the analytic
        count: XLA cannot count a loop whose trip count depends on its index (the attention
        baseline's tile loops; the analytic count has them, causal half only)."""
        analytic = self.hardware_flops_per_token * self.tokens_per_step / self.devices
        return max(self.compiled_flops, analytic) / (self.peak_flops * self.utilization)

    @property
    def memory_seconds(self) -> float:
        """The step at `utilization` of memory bandwidth: every byte XLA's ops read and write once."""
        if not self.memory_bandwidth or not self.compiled_bytes:
            return 0.0
        return self.compiled_bytes / (self.memory_bandwidth * self.utilization)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_seconds > self.compute_seconds else "compute"

    @property
    def step_seconds(self) -> float:
        """Roofline: the slower of compute and memory traffic (collectives not modeled)."""
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def expected_mfu(self) -> float:
        return self.model_flops_per_device / (self.step_seconds * self.peak_flops)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_seconds

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k in ("devices", "needed_bytes", "tokens_per_step", "model_flops_per_device", "compute_seconds",
                  "memory_seconds", "bound", "expected_mfu", "step_seconds", "tokens_per_second"):
            out[k] = getattr(self, k)
        return out


def _sharded_bytes(shapes: Any, shardings: Any) -> int:
    """Bytes one device holds of `shapes` laid out by `shardings` (the largest shard of each leaf)."""
    import jax
    import numpy as np

    def leaf(x, s):
        return int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(leaf, shapes, shardings)))


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"= (\S.*?) (%s)(?:-start)?\(" % "|".join(COLLECTIVES))
_ARRAY = re.compile(r"\b(pred|bf16|[suf]\d+)\[([\d,]*)\]")


_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) ")  # a computation's first line: [ENTRY] %name (params) -> ... {
_CALLEE = re.compile(r"\b(condition|body|to_apply|calls|branch_computations)=(\{[^}]*\}|%[^\s,)]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """({computation name: its instruction lines}, the entry computation's name) of HLO text."""
    bodies: dict[str, list[str]] = {}
    entry, lines = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m is not None and line.rstrip().endswith("{"):
            lines = bodies.setdefault(m.group(2), [])
            entry = m.group(2) if m.group(1) else entry
        elif line.startswith("}"):
            lines = None
        elif lines is not None:
            lines.append(line)
    return bodies, entry


def _executions(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of `entry`: a while loop's body runs its
    known trip count (XLA's `known_trip_count`; 1 where XLA does not know it) times per run of
    the computation holding the loop; a computation called from several places adds them up."""
    calls: dict[str, list[tuple[str, int]]] = {}
    for name, lines in bodies.items():
        for line in lines:
            trip = _TRIP_COUNT.search(line)
            for kind, callees in _CALLEE.findall(line):
                for callee in re.findall(r"%([^\s,}]+)", callees):
                    times = int(trip.group(1)) if trip and kind in ("body", "condition") else 1
                    calls.setdefault(name, []).append((callee, times))
    order: list[str] = []  # post-order, callees before their callers (HLO's call graph has no cycles)
    seen: set[str] = set()

    def visit(name: str) -> None:
        seen.add(name)
        for callee, _ in calls.get(name, ()):
            if callee not in seen:
                visit(callee)
        order.append(name)

    visit(entry)
    runs = {name: 0 for name in order}
    runs[entry] = 1
    for name in reversed(order):
        for callee, n in calls.get(name, ()):
            runs[callee] += runs[name] * n
    return runs


def collectives(hlo_text: str | tuple, per_step: bool = False) -> dict[str, tuple[int, int]]:
    """{op: (count, bytes)} of the cross-device collectives in a compiled program's HLO text
    (`compiled.as_text()`), bytes = the size of each op's result on one device, summed.

    per_step False: counted as written, an op inside a loop body (the scanned layer stack, a
    scan over chunks of a row) once, so compare programs of equal depth. per_step True: each op
    times the runs of its computation (`_executions`: the trip counts of the loops around it),
    the collectives of one call of the program. hlo_text may also be `_computations(hlo_text)`,
    parsed once for several counts.
    """
    bodies, entry = _computations(hlo_text) if isinstance(hlo_text, str) else hlo_text
    runs = _executions(bodies, entry) if per_step and entry else {}
    out: dict[str, list[int]] = {}
    for name, lines in bodies.items():
        times = runs.get(name, 0) if per_step else 1
        for line in lines:
            m = _COLLECTIVE.search(line)
            if m is None or not times:
                continue
            size = 0
            for dtype, dims in _ARRAY.findall(m.group(1)):
                bits = 8 if dtype == "pred" else 16 if dtype == "bf16" else int(dtype[1:])
                size += math.prod(int(n) for n in dims.split(",") if n) * bits // 8
            acc = out.setdefault(m.group(2), [0, 0])
            acc[0] += times
            acc[1] += times * size
    return {op: (n, b) for op, (n, b) in out.items()}


def abstract_batch(partitioner, batch_size: int, length: int) -> dict:
    """The packed batch the input pipeline feeds (seqio.DecoderFeatureConverter, pack=True), as shapes."""
    import jax
    import jax.numpy as jnp

    names = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_segment_ids",
             "decoder_positions")
    return {k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=partitioner.data_sharding) for k in names}


def compile_step(model, partitioner, batch_size: int, length: int, optimizer: Callable | None, microbatches: int):
    """(setup, abstract state, abstract batch, compiled train step) for `partitioner`'s mesh."""
    from olmax import optim, trainer

    setup = trainer.TrainSetup(model, partitioner, (batch_size, length), optimizer or optim.create_optimizer)
    state = setup.abstract_state()
    batch = abstract_batch(partitioner, batch_size, length)
    with partitioner.activate():
        compiled = trainer.make_steps(setup, microbatches).train.lower(state, batch).compile()
    return setup, state, batch, compiled


def _with_config(model, **changes):
    """`model` (a DecoderOnlyLM) with its network's config changed."""
    clone = copy.copy(model)
    clone.module = model.module.clone(config=dataclasses.replace(model.config, **changes))
    clone.config = clone.module.config
    return clone


def xla_cost(compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of a compiled program by XLA's cost analysis (a loop body once)."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis  # older jax: one per program
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def compiled_cost(model, partitioner, batch_size: int, length: int, optimizer: Callable | None = None,
                  microbatches: int = 1) -> tuple[float, float]:
    """(FLOPs, bytes accessed) per device of one train step, from XLA's cost analysis.

    XLA counts a loop body once, and the step has four loops: the scanned layers, the recall
    mixer's and the conv block's scans over chunks of long rows, and gradient accumulation. So the step is compiled
    twice more, at depth 1 and 2 with the layers unrolled (OlmaxConfig.scan_layers=False) and
    one chunk per row, for one microbatch; the whole step is then depth 1's cost + (depth - 1)
    x one layer's (depth 2's - depth 1's), times the microbatches. The optimizer update is
    counted once per microbatch (a few FLOPs per parameter), and a chunked row's recomputed
    chunks not at all: an estimate of what the accelerator executes, from the CPU compiler's
    program (the accelerator's compiler fuses differently, which moves the bytes more than the
    FLOPs). The attention baseline's blockwise kernel loops over tiles with index-dependent trip
    counts, which stay loops: its tiles are counted once, their traffic like a fused kernel's
    (which keeps tiles on chip) and their FLOPs by `Plan.compute_seconds`' analytic floor."""
    return _unrolled(model, partitioner, batch_size, length, optimizer, microbatches)[0]


def _unrolled(model, partitioner, batch_size: int, length: int, optimizer: Callable | None,
              microbatches: int) -> tuple[tuple[float, float], dict[str, tuple[int, int]]]:
    """`compiled_cost`, and the collectives of the step the same two compiles extrapolate to:
    {op: (count, bytes per device)} per step, each layer's once per microbatch (one chunk per
    row: no collective inside a scan over a row's chunks)."""
    cfg = model.config
    rows = batch_size // microbatches
    programs = [compile_step(_with_config(model, depth=n, scan_layers=False, recall_chunk=max(cfg.recall_chunk, length),
                                          conv_chunk=max(cfg.conv_chunk, length)),
                             partitioner, rows, length, optimizer, 1)[3] for n in (1, 2)]
    whole = lambda one, two: microbatches * (one + (cfg.depth - 1) * (two - one))  # noqa: E731
    (f1, b1), (f2, b2) = map(xla_cost, programs)
    c1, c2 = (collectives(p.as_text(), per_step=True) for p in programs)
    ops = {op: tuple(int(whole(c1.get(op, (0, 0))[i], c2.get(op, (0, 0))[i])) for i in (0, 1)) for op in {*c1, *c2}}
    return (whole(f1, f2), whole(b1, b2)), ops


def plan(model, partitioner, batch_size: int, length: int, optimizer: Callable | None = None, microbatches: int = 1,
         peak_flops: float = 275e12, utilization: float = 0.6, device_memory_bytes: int | None = None,
         memory_bandwidth: float | None = None, cost: bool = True, lanes: int | None = None,
         platform: str | None = None) -> Plan:
    """Compiles the train step for `partitioner`'s mesh from abstract shapes and measures it
    (`cost`: and XLA's FLOPs and bytes of it, `compiled_cost`: two more compiles; `lanes`: the
    matrix unit's tile width, for `tile_use`; `platform`: build the program as for that platform,
    `mixers.products_for`, e.g. "tpu" for a TPU step compiled here on the CPU)."""
    import jax
    import numpy as np

    from olmax import mixers, models, perf, trainer

    trainer.check_batch(batch_size, partitioner, microbatches)
    if length > model.config.max_length:
        raise ValueError(f"--length={length} exceeds the model's max_length={model.config.max_length}.")
    # Every program this plan compiles is traced here (the step, and `_unrolled`'s two for XLA's cost).
    with mixers.products_for(platform) if platform else contextlib.nullcontext():
        setup, state, batch, compiled = compile_step(model, partitioner, batch_size, length, optimizer, microbatches)
        (flops, accessed), unchunked = (_unrolled(model, partitioner, batch_size, length, optimizer, microbatches)
                                        if cost else ((0.0, 0.0), {}))
    mem = compiled.memory_analysis()
    param_bytes = _sharded_bytes(setup.param_shapes, setup.param_shardings)
    opt_bytes = _sharded_bytes(state["opt_state"], setup.state_shardings["opt_state"])
    batch_bytes = _sharded_bytes(batch, jax.tree.map(lambda x: x.sharding, batch))
    arg_bytes = int(mem.argument_size_in_bytes) if mem is not None else param_bytes + opt_bytes + batch_bytes
    out_bytes = int(mem.output_size_in_bytes - mem.alias_size_in_bytes) if mem is not None else 0
    hlo = _computations(compiled.as_text())  # the step's program, parsed once for its collectives
    return Plan(
        mesh=dict(partitioner.mesh.shape),
        batch_size=batch_size,
        length=length,
        microbatches=microbatches,
        param_count=models.param_count(setup.param_shapes),
        param_bytes=param_bytes,
        opt_state_bytes=opt_bytes,
        batch_bytes=batch_bytes,
        temp_bytes=int(mem.temp_size_in_bytes) if mem is not None else 0,
        output_bytes=max(out_bytes, 0),
        argument_bytes=arg_bytes,
        model_flops_per_token=perf.train_flops_per_token(model.config, length),
        hardware_flops_per_token=hardware_flops_per_token(model.config, length),
        peak_flops=float(peak_flops),
        utilization=float(utilization),
        device_memory_bytes=device_memory_bytes,
        total_param_bytes=sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                              for x in jax.tree.leaves(setup.param_shapes)),
        collectives=collectives(hlo),
        collectives_per_step=collectives(hlo, per_step=True),
        collectives_unchunked=unchunked,
        compiled_flops=flops,
        compiled_bytes=accessed,
        memory_bandwidth=memory_bandwidth,
        tiles=tile_use(model.config, lanes) if lanes else {},
    )


def hardware_flops_per_token(config, length: int) -> float:
    """Training FLOPs the chips execute per token: forward, backward (2x) and the layers' forward
    recomputed by the reversible stack or remat (the embedding and logits are not recomputed)."""
    from olmax import perf

    layers = perf.forward_flops_per_token(config, length) - 2 * config.features * config.vocab_size
    return perf.train_flops_per_token(config, length) + layers


def check_fits(p: Plan, device_memory_bytes: int | None = None) -> None:
    """Raises DoesNotFit, naming the memory needed and available and what to change."""
    available = device_memory_bytes if device_memory_bytes is not None else p.device_memory_bytes
    if available is None or p.needed_bytes <= available:
        return
    data, model = p.mesh["data"], p.mesh["model"]
    per_device_rows = p.batch_size // data
    hints = []
    if p.param_bytes + p.opt_state_bytes > 0.5 * available:
        hints.append(f"more model parallelism: --mesh data={max(data // 2, 1)},model={model * 2} "
                     f"(partitioning.PjitPartitioner.num_partitions={model * 2}) splits parameters and optimizer state")
    if per_device_rows > 1 or p.microbatches > 1:
        hints.append(f"a smaller batch per device ({per_device_rows} rows now): lower BATCH_SIZE, or set "
                     f"train.train.microbatches={p.microbatches * 2} (gradient accumulation, same global batch)")
    hints.append("keep network.OlmaxConfig.reversible = True (activation memory independent of depth) and "
                 "dtype = 'bfloat16'; a shorter --length / TASK_FEATURE_LENGTHS")
    if not any("model parallelism" in h for h in hints):
        hints.append(f"more model parallelism: --mesh data={max(data // 2, 1)},model={model * 2}")
    b = lambda n: _fmt_bytes(n).strip()  # noqa: E731
    raise DoesNotFit(
        f"Does not fit: the train step needs {b(p.needed_bytes)} per device (parameters {b(p.param_bytes)}, "
        f"optimizer state {b(p.opt_state_bytes)}, batch {b(p.batch_bytes)}, activations and other temporaries "
        f"{b(p.temp_bytes)}, outputs {b(p.output_bytes)}) but a device has {b(available)} "
        f"(mesh data={data}, model={model}; batch {p.batch_size} x {p.length}). Try:\n  - " + "\n  - ".join(hints)
    )


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:8.3f} GiB" if n >= 0.1 * GIB else f"{n / 1024**2:8.2f} MiB"


def report(p: Plan) -> str:
    """A human-readable table of the plan."""
    mesh = f"data={p.mesh['data']}, model={p.mesh['model']} ({p.devices} devices)"
    rows = [
        ("mesh", mesh),
        ("parameters", f"{p.param_count:,} ({_fmt_bytes(p.total_param_bytes).strip()} unsharded)"),
        ("global batch", f"{p.batch_size} x {p.length} = {p.tokens_per_step:,} tokens"
                         + (f", {p.microbatches} microbatches" if p.microbatches > 1 else "")),
        ("per device:", ""),
        ("  parameters", _fmt_bytes(p.param_bytes)),
        ("  optimizer state", _fmt_bytes(p.opt_state_bytes)),
        ("  batch", _fmt_bytes(p.batch_bytes)),
        ("  temporaries (activations, grads)", _fmt_bytes(p.temp_bytes)),
        ("  outputs not donated", _fmt_bytes(p.output_bytes)),
        ("  total needed", _fmt_bytes(p.needed_bytes)),
    ]
    if p.device_memory_bytes:
        rows.append(("  available", _fmt_bytes(p.device_memory_bytes)
                     + f"  ({100 * p.needed_bytes / p.device_memory_bytes:.0f}% used)"))
    rows += [
        ("model FLOPs per token", f"{p.model_flops_per_token:.4g}"),
        ("hardware FLOPs per token", f"{p.hardware_flops_per_token:.4g} (analytic, with the recomputed forward)"),
        ("model FLOPs per device per step", f"{p.model_flops_per_device:.4g}"),
    ]
    if p.compiled_flops:
        rows += [
            ("XLA FLOPs per device per step", f"{p.compiled_flops:.4g}"),
            ("XLA bytes accessed per device", f"{p.compiled_bytes:.4g} "
                                              f"({p.compiled_flops / max(p.compiled_bytes, 1):.0f} FLOPs per byte)"),
        ]
    bandwidth = f", {p.memory_bandwidth / 1e9:,.0f} GB/s" if p.memory_bandwidth else ""
    rows += [
        ("peak per device", f"{p.peak_flops:.4g} FLOP/s{bandwidth}, {100 * p.utilization:.0f}% sustained (assumed)"),
        ("step time", f"{p.step_seconds:.3g} s ({p.bound}-bound: compute {p.compute_seconds:.3g} s, "
                      f"memory {p.memory_seconds:.3g} s)"),
        ("expected MFU", f"{100 * p.expected_mfu:.1f}%"),
        ("tokens/s (whole mesh)", f"{p.tokens_per_second:,.0f}"),
        ("collectives per step", _fmt_collectives(p.collectives_per_step)
         + " (every loop iteration, as the CPU program has them)"),
    ]
    if p.collectives_unchunked:
        rows.append(("  each layer's once", _fmt_collectives(p.collectives_unchunked)
                     + " (if the accelerator's compiler sinks the per-chunk gradient all-reduces, or with "
                     "network.OlmaxConfig.reduce_chunk_grads_once = True)"))
    if p.tiles:
        rows.append((f"recall widths on {TPU_LANES}-lane tiles", _tile_advice(p.tiles)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt_collectives(ops: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{op} {n:,}: {_fmt_bytes(b).strip()}" for op, (n, b) in sorted(ops.items()) if n) or "none"


def parse_mesh(text: str) -> dict[str, int]:
    """'data=64,model=4' -> {'data': 64, 'model': 4} (a missing axis is 1)."""
    mesh = {"data": 1, "model": 1}
    for part in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in mesh or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected data=D,model=M with positive integers, e.g. data=64,model=4.")
        mesh[name.strip()] = int(value)
    return mesh


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("mesh", "data=8,model=1", "Mesh shape, e.g. data=64,model=4 (data x model simulated devices).")
    flags.DEFINE_integer("batch_size", None, "Global batch size (default: the BATCH_SIZE macro).")
    flags.DEFINE_integer("length", None, "Sequence length (default: TASK_FEATURE_LENGTHS['targets'], else max_length).")
    flags.DEFINE_integer("microbatches", None, "Gradient accumulation (default: train.train.microbatches or 1).")
    flags.DEFINE_string("device_kind", "TPU v4", f"Target chip for peak FLOP/s and memory: one of {sorted(DEVICE_MEMORY_GB)}.")
    flags.DEFINE_float("peak_flops", None, "Peak FLOP/s per device (default: the datasheet figure of --device_kind).")
    flags.DEFINE_float("device_memory_gb", None, "Memory per device in GiB (default: that of --device_kind).")
    flags.DEFINE_float("memory_bandwidth_gbs", None, "Memory bandwidth per device in GB/s (default: that of --device_kind).")
    flags.DEFINE_float("utilization", 0.6, "Assumed fraction of peak FLOP/s and bandwidth the chips sustain (time, MFU).")
    flags.DEFINE_bool("json", False, "Print the figures as one JSON object instead of a table.")


def _macro(name: str, default=None):
    import gin

    try:
        value = gin.query_parameter(f"%{name}")
    except (ValueError, KeyError):
        return default
    return default if isinstance(value, gin.config.ConfigurableReference) else value  # e.g. %gin.REQUIRED


def main(argv) -> None:
    del argv
    from absl import flags

    fl = flags.FLAGS
    mesh = parse_mesh(fl.mesh)
    n = mesh["data"] * mesh["model"]
    if n > MAX_SIMULATED_DEVICES:
        raise SystemExit(
            f"olmax.plan: --mesh {fl.mesh} asks for {n:,} simulated devices; the planner simulates at most "
            f"{MAX_SIMULATED_DEVICES:,} (each is a thread of XLA's CPU client, and far more crash it). Per-device "
            f"figures depend on the model axis and the rows per device, not on the data axis: plan data="
            f"{max(1, MAX_SIMULATED_DEVICES // mesh['model'] // 8)},model={mesh['model']} with --batch_size scaled "
            "by the same factor.")
    for name in ("device_memory_gb", "memory_bandwidth_gbs", "peak_flops"):
        if getattr(fl, name) is not None and getattr(fl, name) <= 0:
            raise SystemExit(f"olmax.plan: --{name}={getattr(fl, name)} must be positive.")
    if not 0 < fl.utilization <= 1:
        raise SystemExit(f"olmax.plan: --utilization={fl.utilization} must be in (0, 1].")
    # Simulated devices: must be set before the JAX backend starts (olmax.* imports jax, lazily here).
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from olmax import gin_utils, optim, partitioning, perf

    if jax.device_count() < n:
        raise SystemExit(f"The mesh needs {n} devices but JAX has {jax.device_count()}; run the planner in a fresh "
                         "process (it sets XLA_FLAGS=--xla_force_host_platform_device_count itself).")
    gin_utils.parse_from_flags(run_file="runs/pretrain.gin")
    model = _model_from_gin()
    batch_size = fl.batch_size or _macro("BATCH_SIZE", 128)
    lengths = _macro("TASK_FEATURE_LENGTHS")
    length = fl.length or (lengths.get("targets") if isinstance(lengths, dict) else None) or model.config.max_length
    microbatches = fl.microbatches or _bound("train.train.microbatches", 1)
    if fl.device_kind not in DEVICE_MEMORY_GB and (fl.peak_flops is None or fl.device_memory_gb is None):
        raise SystemExit(f"--device_kind={fl.device_kind!r} is not one of {sorted(DEVICE_MEMORY_GB)}; "
                         "give --peak_flops and --device_memory_gb instead.")
    peak = fl.peak_flops or perf.DATASHEET_PEAK[fl.device_kind]
    memory_gb = fl.device_memory_gb if fl.device_memory_gb is not None else DEVICE_MEMORY_GB[fl.device_kind]
    bandwidth = fl.memory_bandwidth_gbs * 1e9 if fl.memory_bandwidth_gbs else DEVICE_BANDWIDTH.get(fl.device_kind)
    partitioner = partitioning.PjitPartitioner(mesh_shape=mesh, devices=jax.devices()[:n])
    total_steps = _macro("TRAIN_STEPS", None) or 10000  # shapes the LR schedule only, never the memory
    optimizer = functools.partial(optim.create_optimizer, total_steps=total_steps)
    try:
        p = plan(model, partitioner, int(batch_size), int(length), optimizer, int(microbatches), peak,
                 fl.utilization, int(memory_gb * GIB), bandwidth,
                 lanes=TPU_LANES if fl.device_kind.startswith("TPU") else None,
                 platform="tpu" if fl.device_kind.startswith("TPU") else "gpu")
    except ValueError as e:
        raise SystemExit(f"olmax.plan: {e}") from None
    print(json.dumps(p.as_dict()) if fl.json else report(p), flush=True)
    try:
        check_fits(p)
    except DoesNotFit as e:
        print(f"\nolmax.plan: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if not fl.json:
        print(f"\nFits: {_fmt_bytes(p.needed_bytes).strip()} of {memory_gb:g} GiB per device.", flush=True)


def _bound(name: str, default):
    import gin

    try:
        return gin.query_parameter(name)
    except (ValueError, KeyError):
        return default


def _model_from_gin():
    """Evaluates %MODEL from the user's Gin files (registered here, not at import: `python -m`
    runs this file twice, as __main__ and as olmax.plan, and Gin names must be unique)."""
    import gin

    @gin.configurable("olmax_plan_model")
    def bound(model=None):
        return model

    gin.parse_config("olmax_plan_model.model = %MODEL")
    return bound()


def console_main():
    from olmax import gin_utils

    _define_flags()
    gin_utils.run(main)


if __name__ == "__main__":
    from olmax import plan as _plan

    _plan.console_main()
