"""What the benchmark sections share: configs, interleaved timing, training, reports.

Timing on a shared, noisy machine: every comparison runs its variants in the same
process, interleaved (rounds that alternate their order, or training chunks that
go to whichever model is behind), and reports min or median times and ratios, so
that a load change hits both sides of a ratio alike.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import resource
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, safe in threads

from olmax import models, network, optim, partitioning

# olmax.trainer and olmax.utils import tensorflow and seqio (seconds): only the sections
# that train import them, inside the functions below.

matplotlib.use("Agg")

BYTE_VOCAB = 384  # olmax.tasks.BYTE_VOCAB_SIZE (importing olmax.tasks pulls in tensorflow)


# ----------------------------------------------------------------------- configs


mixer_block_for = network.mixer_block_for  # the model's own rule (max_length -> K)


def olmax_config(features: int, depth: int, length: int, **kw) -> network.OlmaxConfig:
    """The benchmarks' model family: conv width 4 d, 4 mixer channel groups / heads, K = mixer_block_for(N)."""
    kw.setdefault("conv_features", 4 * features)
    kw.setdefault("mixer_block", mixer_block_for(length))
    kw.setdefault("mixer_heads", 4)
    kw.setdefault("num_heads", 4)
    return network.OlmaxConfig(vocab_size=BYTE_VOCAB, features=features, depth=depth, max_length=length, **kw)


def attention_twin(cfg: network.OlmaxConfig) -> network.OlmaxConfig:
    """The transformer baseline at (nearly) equal parameters: the mixers' parameter
    difference is taken out of (or added to) the attention model's conv width (a conv
    branch has 2 k d f parameters)."""
    att = dataclasses.replace(cfg, mixer="attention")
    extra = models.param_count(param_shapes(att)) - models.param_count(param_shapes(cfg))
    per_conv_feature = 2 * cfg.conv_kernel * cfg.features * cfg.layer_blocks.count("conv") * cfg.depth
    return dataclasses.replace(att, conv_features=max(1, cfg.conv_features - round(extra / per_conv_feature)))


def param_shapes(cfg: network.OlmaxConfig, batch_shape: tuple[int, int] = (1, 8)):
    lm = models.DecoderOnlyLM(network.Olmax(cfg))
    init = lambda: lm.get_initial_variables(jax.random.PRNGKey(0), {"decoder_input_tokens": batch_shape})  # noqa: E731
    return jax.eval_shape(init)["params"]


def token_batch(batch: int, length: int, vocab: int = 256, seed: int = 0, packed: bool = False) -> dict[str, np.ndarray]:
    """Random byte tokens (shapes and speed do not depend on the values); `packed` adds
    the other features of a packed batch (one segment per row, all weights 1)."""
    tokens = np.random.RandomState(seed).randint(3, vocab, (batch, length)).astype(np.int32)
    out = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens}
    if packed:
        out["decoder_loss_weights"] = np.ones_like(tokens)
        out["decoder_segment_ids"] = np.ones_like(tokens)
        out["decoder_positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    return out


def random_params(cfg: network.OlmaxConfig, batch_shape: tuple[int, int], seed: int = 0):
    """Parameters of the right shapes, drawn by numpy (no compilation): enough for timing."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), param_shapes(cfg, batch_shape))


# ------------------------------------------------------------------------ timing


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each fn over `repeats` rounds; odd rounds run in reverse order."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name]))
    return times


def load() -> float:
    """1-minute load average (how busy the shared machine is)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system, all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": cores,
        "device": f"{dev.platform} ({dev.device_kind})",
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def hardware_line(hw: dict[str, Any]) -> str:
    return f"{hw['cpu']}, {hw['cores']} cores, {hw['device']}, jax {hw['jax']}, python {hw['python']}"


# ---------------------------------------------------------------------- training


class Batches:
    """A seeded stream of a split, cached, so every model sees the same batches in the same order."""

    def __init__(self, cfg, num_epochs: int | None = None):
        from olmax import utils

        self._it: Iterator[dict] = utils.batches(utils.get_dataset(cfg, 1, num_epochs=num_epochs))
        self._cache: list[dict] = []

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        while len(self._cache) <= i:
            self._cache.append(next(self._it))
        return self._cache[i]

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        out: list[dict[str, np.ndarray]] = []
        for i in range(n):
            try:
                out.append(self[i])
            except StopIteration:
                break
        return out


@functools.lru_cache(maxsize=None)
def task_batches(task: str, split: str, batch: int, length: int, shuffle: bool) -> Batches:
    from olmax import utils

    cfg = utils.DatasetConfig(
        mixture_or_task_name=task, task_feature_lengths={"targets": length}, split=split,
        batch_size=batch, shuffle=shuffle, seed=0,
    )
    return Batches(cfg, num_epochs=None if shuffle else 1)


def stdlib_batches(split: str, batch: int, length: int, shuffle: bool) -> Batches:
    return task_batches("olmax_stdlib", split, batch, length, shuffle)


@dataclasses.dataclass
class Point:
    step: int
    seconds: float  # training time so far (jitted steps only: no compile, data or eval)
    bpb: float  # validation bits per byte (nan when there is no validation set)
    train_loss: float  # mean training loss of the chunk that ended here


@dataclasses.dataclass(frozen=True, eq=False)
class _Program:
    """What trainees of one config share: the model, its setup and the compiled functions."""

    lm: models.DecoderOnlyLM
    partitioner: partitioning.PjitPartitioner
    optimizer: Callable
    batch_shape: tuple[int, int]
    step: Any  # compiled (state, batch) -> (state, metrics), donating the state
    evaluate: Any  # compiled (params, batch) -> metrics
    params: int


@functools.lru_cache(maxsize=None)
def _program(cfg: network.OlmaxConfig, batch_shape: tuple[int, int], learning_rate: float, warmup_steps: int) -> _Program:
    """Built once per config: sections that train the same model (quality's Olmax is the
    ablations' baseline, and the quick MFU model) share the compilation."""
    from olmax import tasks  # registers the tasks; its byte vocabulary gives bits per byte
    from olmax import trainer

    lm = models.DecoderOnlyLM(network.Olmax(cfg), tasks.byte_vocabulary())
    partitioner = partitioning.PjitPartitioner(devices=jax.devices()[:1])
    optimizer = functools.partial(
        optim.create_optimizer, learning_rate=learning_rate, schedule="constant", warmup_steps=warmup_steps
    )
    setup = trainer.TrainSetup(lm, partitioner, batch_shape, optimizer)
    state = setup.abstract_state()
    example = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=partitioner.data_sharding) for k in TRAIN_KEYS}
    jitted = trainer.make_steps(setup)
    with partitioner.activate():
        step = jitted.train.lower(state, example).compile()
        evaluate = jitted.eval.lower(state["params"], example).compile()
    return _Program(lm, partitioner, optimizer, batch_shape, step, evaluate, models.param_count(setup.param_shapes))


@functools.lru_cache(maxsize=None)
def _initial_state(program: _Program, seed: int):
    """The initial train state of `seed` on the host, and its shardings."""
    from olmax import trainer

    setup = trainer.TrainSetup(program.lm, program.partitioner, program.batch_shape, program.optimizer, random_seed=seed)
    return jax.device_get(setup.init_state()), setup.state_shardings


# The features of a packed batch (seqio.DecoderFeatureConverter) that the train step reads.
TRAIN_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_segment_ids",
              "decoder_positions")


def lm_batch(targets: np.ndarray, loss_weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Unpacked rows of token ids [b, t] -> the train step's features (TRAIN_KEYS): inputs shifted
    right with 0 first, one segment per row, positions 0..t-1, loss weights 1 unless given."""
    targets = np.asarray(targets, np.int32)
    b, t = targets.shape
    weights = np.ones((b, t), np.int32) if loss_weights is None else np.asarray(loss_weights, np.int32)
    return {"decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1),
            "decoder_target_tokens": targets, "decoder_loss_weights": weights,
            "decoder_segment_ids": np.ones((b, t), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


@functools.lru_cache(maxsize=None)
def target_logprobs(cfg: network.OlmaxConfig) -> Callable:
    """Compiled (params, batch) -> (log p(target) [b, t], argmax == target [b, t]) under the model."""
    module = network.Olmax(cfg)

    @jax.jit
    def fn(params, batch):
        logits = module.apply({"params": params}, batch["decoder_input_tokens"],
                              decoder_segment_ids=batch["decoder_segment_ids"],
                              decoder_positions=batch["decoder_positions"], enable_dropout=False)
        tgt = batch["decoder_target_tokens"]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tgt[..., None], axis=-1)[..., 0]
        return logp, jnp.argmax(logits, -1) == tgt

    return fn


class Trainee:
    """One model under training with Olmax's own train step (olmax.trainer.make_steps).

    Args:
      name: label in tables and plots.
      cfg: the network config.
      batch_shape: (batch, length).
      data: batch i of the training stream (the same for every trainee of a race); the
        keys of TRAIN_KEYS, [batch, length] int32.
      val: the validation batches (may be empty).
      learning_rate, warmup_steps: create_optimizer's, with a constant schedule after
        warmup, so the loss at a step does not depend on how long the run is planned.
      seed: the parameter initialization's.
    """

    def __init__(self, name: str, cfg: network.OlmaxConfig, batch_shape: tuple[int, int],
                 data: Callable[[int], dict], val: list[dict], learning_rate: float = 3e-3, warmup_steps: int = 20,
                 seed: int = 0):
        self.name, self.cfg, self.data, self.val, self.seed = name, cfg, data, val, seed
        self._optimizer_args = (learning_rate, warmup_steps)
        t = time.perf_counter()
        program = _program(cfg, tuple(batch_shape), learning_rate, warmup_steps)
        self.lm, self.partitioner, self.params = program.lm, program.partitioner, program.params
        self._step, self._eval = program.step, program.evaluate
        self.batch_shape = tuple(batch_shape)
        self.state = jax.device_put(*_initial_state(program, seed))  # a fresh copy: the step donates it
        self.compile_seconds = time.perf_counter() - t
        self.step = 0
        self.seconds = 0.0
        self.step_times: list[float] = []
        self.curve: list[Point] = []
        self._losses: list[float] = []

    def reshape(self, batch_shape: tuple[int, int]) -> None:
        """Go on training on batches of another (batch, length), as a length curriculum does:
        the step is compiled for the new shape; the state (parameters, optimizer moments, step
        count, hence the schedule) carries over unchanged."""
        if tuple(batch_shape) == self.batch_shape:
            return
        t = time.perf_counter()
        program = _program(self.cfg, tuple(batch_shape), *self._optimizer_args)
        self.partitioner, self._step, self._eval = program.partitioner, program.step, program.evaluate
        self.batch_shape = tuple(batch_shape)
        self.compile_seconds += time.perf_counter() - t

    def _batch(self, i: int) -> dict[str, jax.Array]:
        b = self.data(i)
        return self.partitioner.global_batch({k: b[k] for k in TRAIN_KEYS})

    def train(self, steps: int) -> None:
        for _ in range(steps):
            batch = self._batch(self.step)  # data time is not training time
            t = time.perf_counter()
            self.state, metrics = self._step(self.state, batch)
            loss = float(metrics["loss"])  # waits for the step
            dt = time.perf_counter() - t
            self.step += 1
            self.seconds += dt
            self.step_times.append(dt)
            self._losses.append(loss)

    def evaluate(self) -> Point:
        """Record (step, seconds, validation bits per byte, mean train loss since the last point)."""
        total = weight = 0.0
        with self.partitioner.activate():
            for b in self.val:
                m = jax.device_get(self._eval(self.state["params"], self.partitioner.global_batch(b)))
                total += float(m["bits_per_byte"]) * float(m["tokens"])
                weight += float(m["tokens"])
        loss = float(np.mean(self._losses)) if self._losses else float("nan")
        self._losses = []
        point = Point(self.step, self.seconds, total / weight if weight else float("nan"), loss)
        self.curve.append(point)
        return point

    def bpb_at_step(self, step: int) -> float:
        for p in self.curve:
            if p.step == step:
                return p.bpb
        raise KeyError(f"{self.name} has no evaluation at step {step}")

    def bpb_at_seconds(self, seconds: float) -> float:
        """Validation bpb at `seconds` of training, linear between evaluations."""
        xs = [p.seconds for p in self.curve]
        return float(np.interp(seconds, xs, [p.bpb for p in self.curve]))


def race_by_time(trainees: list[Trainee], chunk_steps: int, budget_s: float, log: Callable[[str], None]) -> None:
    """Train each for `budget_s` seconds of its own step time, in chunks of `chunk_steps`
    (evaluated after each), always running the trainee that is furthest behind in time."""
    for t in trainees:
        t.evaluate()
    while True:
        behind = [t for t in trainees if t.seconds < budget_s]
        if not behind:
            return
        t = min(behind, key=lambda t: (t.seconds, t.step))
        t.train(chunk_steps)
        p = t.evaluate()
        log(f"  {t.name:12s} step {p.step:5d}  {p.seconds:7.1f} s  val bpb {p.bpb:.3f}  (load {load():.1f})")


def race_by_steps(trainees: list[Trainee], chunk_steps: int, steps: int, log: Callable[[str], None]) -> None:
    """Train each for `steps` steps, in chunks of `chunk_steps` (evaluated after each),
    round-robin with the order reversed every round."""
    for t in trainees:
        t.evaluate()
    order = list(trainees)
    while any(t.step < steps for t in trainees):
        for t in order:
            if t.step < steps:
                t.train(min(chunk_steps, steps - t.step))
                p = t.evaluate()
                log(f"  {t.name:18s} step {p.step:5d}  {p.seconds:7.1f} s  val bpb {p.bpb:.3f}  (load {load():.1f})")
        order.reverse()


# ----------------------------------------------------------------------- reports


@dataclasses.dataclass
class Target:
    claim: str
    target: str
    measured: str
    met: bool


@dataclasses.dataclass
class Section:
    """What a benchmark section produces: a table (+ plots), notes, and the targets it checks."""

    name: str
    title: str
    header: list[str]
    rows: list[list[Any]]
    notes: list[str] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    plots: list[str] = dataclasses.field(default_factory=list)  # file names in the output folder
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # raw numbers (curves, ...)
    extra_tables: list[tuple[str, list[str], list[list[Any]]]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


MISSING = "—"  # a cell that could not be measured (does not fit, too slow); its row's notes say why


def cell(x: Any) -> str:
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return MISSING
        a = abs(x)
        if a >= 1000:
            return f"{x:,.0f}"
        if a >= 100:
            return f"{x:.1f}"
        if a >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def section_markdown(s: Section, context: dict[str, Any]) -> str:
    parts = [f"# {s.title}", ""]
    parts.append(f"Command: `{context['command']}` (section `{s.name}`, {context['seconds']:.0f} s; "
                 f"1-min load average {context['load'][0]:.1f} before, {context['load'][1]:.1f} after).")
    parts.append(f"Hardware: {hardware_line(context['hardware'])}.")
    parts += ["", markdown_table(s.header, s.rows)]
    for title, header, rows in s.extra_tables:
        parts += ["", title, "", markdown_table(header, rows)]
    if s.targets:
        parts += ["", targets_table(s.targets)]
    if s.notes:
        parts += [""] + [f"- {n}" for n in s.notes]
    parts += [""] + [f"![{s.name}]({p})" for p in s.plots]
    return "\n".join(parts) + "\n"


def targets_table(targets: list[Target]) -> str:
    return markdown_table(
        ["claim", "target", "measured", "met"], [[t.claim, t.target, t.measured, "met" if t.met else "MISSED"] for t in targets]
    )


def write_section(out: str, s: Section, context: dict[str, Any]) -> str:
    os.makedirs(out, exist_ok=True)
    text = section_markdown(s, context)
    with open(os.path.join(out, f"{s.name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{s.name}.json"), "w") as f:
        json.dump(dict(s.to_json(), context=context), f, indent=1, default=float)
    return text


def read_section(out: str, name: str) -> dict | None:
    """What write_section wrote for section `name` in `out` (its json), or None if absent."""
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.2 * ncols, 3.8))
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def save_figure(fig: Figure, out: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)  # PNG through the Agg canvas
    return name
