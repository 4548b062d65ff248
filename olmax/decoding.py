"""Cached incremental decoding and sampling.

    tokens = generate(model, params, prompt_tokens, prompt_lengths, rng, max_new_tokens=64,
                      temperature=0.8, top_p=0.95)

A prompt is decoder input tokens: for a model trained on seqio's decoder feature
converter they start with the BOS id 0, e.g. [0, t1, t2, t3] for the text t1 t2 t3.
Generation prefills the cache with all prompt positions but the last (T5X's
convention), then steps: each step feeds one token per row at that row's own
position and samples the next one. A step costs the work of one position
(`olmax.layers` describes the caches), not a forward pass over the prefix.

`generate(..., recompute=True)` is the reference path: the same loop, but each step
runs the full forward over the whole [batch, cache_length] buffer. Tests check the
two agree; benchmarks/decode_speed.py measures the difference.

The sampling loop is a `lax.while_loop` over at most `max_new_tokens` steps that
stops early once every row is done; its logits function is injectable
(`sample_loop(step_fn, ...)`), so the sampling logic can be tested on its own.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
# (tokens [b], state) -> (logits [b, vocab], state): one step of a decoder.
StepFn = Callable[[Array, Any], tuple[Array, Any]]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is drawn from fp32 logits [b, vocab].

    greedy (or temperature == 0): argmax. Otherwise logits / temperature, then keep
    the top_k largest (0: all), then the smallest set whose probability reaches
    top_p (1.0: all; the most likely token is always kept), and sample.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 means no top-k cut).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 means no nucleus cut).")


def sample_logits(logits: Array, rng: Array, sampler: Sampler) -> Array:
    """Next tokens [b] int32 from logits [b, vocab]."""
    logits = logits.astype(jnp.float32)
    if sampler.greedy or sampler.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampler.temperature
    if sampler.top_k:
        kth = jax.lax.top_k(logits, min(sampler.top_k, logits.shape[-1]))[0][:, -1:]  # [b, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampler.top_p < 1.0:
        ordered = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly better tokens
        kept = jnp.sum(mass_before < sampler.top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_loop(
    step_fn: StepFn,
    state: Any,
    first_tokens: Array,
    rng: Array,
    max_new_tokens: int,
    sampler: Sampler = Sampler(),
    eos_id: int | None = 1,
    limits: Array | None = None,
) -> tuple[Array, Array]:
    """Feed tokens, sample the next ones, until every row is done.

    Args:
      step_fn: (tokens [b], state) -> (logits [b, vocab], state).
      state: the decoder's initial state (a prefilled cache).
      first_tokens: [b] the first token each row feeds (its last prompt token).
      rng: a PRNG key; step i samples with fold_in(rng, i), so a fixed key gives
        the same tokens.
      max_new_tokens: the most tokens a row generates.
      eos_id: a row is done once it samples this id (kept in the output); None: never.
      limits: [b] optional per-row caps on the number of new tokens (<= max_new_tokens).

    Returns:
      tokens [b, max_new_tokens] int32 (0 after a row is done) and scores [b]: the
      sum of the model's log-probabilities (temperature 1, before any top-k / top-p
      cut) of each row's generated tokens.
    """
    bsz = first_tokens.shape[0]
    limits = jnp.full((bsz,), max_new_tokens, jnp.int32) if limits is None else limits.astype(jnp.int32)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tokens, state, out, done, scores = carry
        logits, state = step_fn(tokens, state)
        logits = logits.astype(jnp.float32)
        nxt = sample_logits(logits, jax.random.fold_in(rng, i), sampler)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=-1)[:, 0]
        nxt = jnp.where(done, 0, nxt)
        scores = scores + jnp.where(done, 0.0, logp)
        out = out.at[:, i].set(nxt)
        done = done | (i + 1 >= limits)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        return i + 1, nxt, state, out, done, scores

    carry = (
        jnp.zeros((), jnp.int32),
        first_tokens.astype(jnp.int32),
        state,
        jnp.zeros((bsz, max_new_tokens), jnp.int32),
        limits <= 0,
        jnp.zeros((bsz,), jnp.float32),
    )
    _, _, _, out, _, scores = jax.lax.while_loop(cond, body, carry)
    return out, scores


# --------------------------------------------------------------- the network's cache


def init_cache(module, params, batch_size: int, cache_length: int) -> Any:
    """The zero cache for `batch_size` rows of up to `cache_length` positions."""
    tokens = jnp.zeros((batch_size, cache_length), jnp.int32)
    _, state = module.apply({"params": params}, tokens, decode=True, enable_dropout=False, mutable=["cache"])
    return state["cache"]


def prefill(module, params, cache, prompt_tokens: Array, prefill_lengths: Array) -> Any:
    """The cache after the first prefill_lengths[b] tokens of each row of prompt_tokens [b, P]."""
    _, state = module.apply(
        {"params": params, "cache": cache},
        prompt_tokens,
        prefill=True,
        prefill_lengths=prefill_lengths,
        enable_dropout=False,
        mutable=["cache"],
    )
    return state["cache"]


def cached_step_fn(module, params, cache_length: int) -> StepFn:
    """One cached decode step: (tokens [b], cache) -> (logits [b, vocab], cache)."""

    def step(tokens, cache):
        logits, state = module.apply(
            {"params": params, "cache": cache},
            tokens[:, None],
            decode=True,
            max_decode_length=cache_length,
            enable_dropout=False,
            mutable=["cache"],
        )
        return logits[:, 0], state["cache"]

    return step


def recompute_step_fn(module, params) -> StepFn:
    """The reference step: write the token into the buffer, run the full forward.

    State: (buffer [b, L] tokens, positions [b]); logits are read at each row's position.
    """

    def step(tokens, state):
        buffer, pos = state
        rows = jnp.arange(buffer.shape[0])
        buffer = buffer.at[rows, pos].set(tokens, mode="drop")
        logits = module.apply({"params": params}, buffer, enable_dropout=False)  # [b, L, v]
        logits = logits[rows, jnp.minimum(pos, buffer.shape[1] - 1)]
        return logits, (buffer, pos + 1)

    return step


# ------------------------------------------------------------------------- generate


@functools.partial(
    jax.jit, static_argnames=("module", "max_new_tokens", "cache_length", "sampler", "eos_id", "recompute")
)
def _generate(
    module, params, prompt_tokens, prompt_lengths, rng, step_limit, *, max_new_tokens, cache_length, sampler, eos_id,
    recompute
):
    bsz, width = prompt_tokens.shape
    lengths = jnp.clip(jnp.asarray(prompt_lengths, jnp.int32), 1, width)
    prompt_tokens = jnp.where(jnp.arange(width)[None, :] < lengths[:, None], prompt_tokens, 0).astype(jnp.int32)
    first = jnp.take_along_axis(prompt_tokens, lengths[:, None] - 1, axis=1)[:, 0]
    # Generated token j of row r lands at position lengths[r] + j and is produced by
    # feeding position lengths[r] - 1 + j, which must lie inside the cache.
    limits = jnp.clip(cache_length - lengths + 1, 0, jnp.minimum(max_new_tokens, step_limit))
    if recompute:
        buffer = jnp.pad(prompt_tokens, ((0, 0), (0, cache_length - width)))
        step, state = recompute_step_fn(module, params), (buffer, lengths - 1)
    else:
        cache = init_cache(module, params, bsz, cache_length)
        state = prefill(module, params, cache, prompt_tokens, lengths - 1)
        step = cached_step_fn(module, params, cache_length)
    return sample_loop(step, state, first, rng, max_new_tokens, sampler, eos_id, limits)


def generate(
    model,
    params,
    prompt_tokens: Array,
    prompt_lengths: Array,
    rng: Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = 1,
    greedy: bool = False,
    *,
    cache_length: int | None = None,
    recompute: bool = False,
    return_scores: bool = False,
    step_limit: int | Array | None = None,
):
    """Sample continuations of a batch of prompts, jit-compiled, with the decode cache.

    Args:
      model: an `olmax.network.Olmax` or anything with one as `.module` (DecoderOnlyLM).
      params: its parameters.
      prompt_tokens: [b, P] int decoder input tokens, 0-padded after each prompt.
      prompt_lengths: [b] prompt length per row, >= 1 (the BOS counts).
      rng: PRNG key; the same key gives the same tokens.
      max_new_tokens: the output width and the most tokens a row generates.
      temperature, top_k, top_p, greedy: see `Sampler`.
      eos_id: a row stops after sampling it; None: rows run to max_new_tokens.
      cache_length: positions the cache holds (default P + max_new_tokens - 1, the
        least that lets every row generate max_new_tokens); a row also stops when
        its sequence fills the cache (T5X's meaning of max_decode_length).
      recompute: run the full forward at every step instead (the slow reference).
      return_scores: also return scores [b] (see `sample_loop`).
      step_limit: at most this many new tokens per row (<= max_new_tokens), a traced
        value: changing it does not recompile (benchmarks time n1 vs n2 steps this way).

    Returns:
      tokens [b, max_new_tokens] int32, 0 after a row stops (and scores if asked).
    """
    module = getattr(model, "module", model)
    prompt_tokens = jnp.asarray(prompt_tokens)
    width = prompt_tokens.shape[1]
    cache_length = width + max_new_tokens - 1 if cache_length is None else cache_length
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if not width <= cache_length <= module.config.max_length:
        raise ValueError(
            f"Prompt width {width} plus generation needs cache_length={cache_length} positions, which must be "
            f">= the prompt width and <= the model's max_length={module.config.max_length}; "
            "shorten the prompts or max_new_tokens."
        )
    sampler = Sampler(float(temperature), int(top_k), float(top_p), bool(greedy))
    tokens, scores = _generate(
        module,
        params,
        prompt_tokens,
        jnp.broadcast_to(jnp.asarray(prompt_lengths, jnp.int32), prompt_tokens.shape[:1]),
        rng,
        jnp.asarray(max_new_tokens if step_limit is None else step_limit, jnp.int32),
        max_new_tokens=int(max_new_tokens),
        cache_length=int(cache_length),
        sampler=sampler,
        eos_id=None if eos_id is None else int(eos_id),
        recompute=bool(recompute),
    )
    return (tokens, scores) if return_scores else tokens
