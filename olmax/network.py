"""The Olmax network: its config and the decoder-only flax module (T5X calling convention).

    tokens [b, t] -> embedding [b, t, d] -> depth x layer -> norm -> logits [b, t, vocab] (fp32)

A layer is a sequence of residual branches (`OlmaxConfig.blocks`, default conv then
mixer), each branch a Block: SandwichLN(inner) with RMSNorm. The stack is reversible
(activation memory independent of depth) or plain residual with remat.

Cached decoding follows T5X's contract (see `Olmax`): the cache lives in the `cache`
collection as {'cache_index', 'decoder': {'layers_<i>': {<branch>: {<block>: leaves}}}},
one entry per layer, batch on axis 0 of every leaf; creating it with `cache_axes`
mutable also returns the same tree of logical axis names there.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import partitioning as nn_partitioning

from olmax import layers
from olmax import mixers
from olmax import reversible
# Re-exported: the gin files bind network.OlmaxConfig, and callers use network.mixer_block_for.
from olmax.config import OlmaxConfig, mixer_block_for  # noqa: F401

Array = jax.Array

BLOCKS = {"conv": layers.ConvBlock, "moe": layers.MoE}


class Block(nn.Module):
    """One residual branch f(x): the inner block wrapped in its norms.

    placement="sandwich": post_norm(inner(pre_norm(x))); placement="pre": inner(pre_norm(x)).
    """

    config: OlmaxConfig
    kind: str

    @nn.compact
    def __call__(
        self, x: Array, ctx: layers.Context, enable_dropout: bool = False, decode: str | None = None
    ) -> tuple[Array, dict]:
        cfg = self.config
        if decode not in layers.DECODE_MODES:
            raise ValueError(f"decode={decode!r} is not one of {layers.DECODE_MODES}.")
        inner = mixers.MIXERS[cfg.mixer] if self.kind == "mixer" else BLOCKS[self.kind]
        y = layers.Norm(cfg, name="pre_norm")(x.astype(cfg.dtype))
        y, aux = inner(cfg, name=self.kind)(y, ctx, decode)
        if cfg.placement == "sandwich":
            y = layers.Norm(cfg, name="post_norm")(y)
        y = nn.Dropout(cfg.dropout_rate, deterministic=not enable_dropout)(y)
        y = nn.with_logical_constraint(y, ("activation_batch", "activation_length", "activation_embed"))
        return y.astype(jnp.float32), aux


def branch_names(config: OlmaxConfig) -> tuple[str, ...]:
    """Stable parameter names of a layer's branches, e.g. ('conv_0', 'mixer_1')."""
    return tuple(f"{kind}_{i}" for i, kind in enumerate(config.layer_blocks))


def layer_fns(config: OlmaxConfig, enable_dropout: bool = False) -> reversible.LayerFns:
    """One layer's branches as pure functions (branch params, x, ctx, rng) -> (f(x), aux)."""

    def branch(kind: str):
        module = Block(config, kind)

        def fn(p, x, ctx, rng):
            return module.apply({"params": p}, x, ctx, enable_dropout, rngs={"dropout": rng})

        return fn

    return reversible.LayerFns(branch_names(config), tuple(branch(k) for k in config.layer_blocks),
                               unroll=not config.scan_layers)


def cached_layer_fns(config: OlmaxConfig, decode: str) -> reversible.LayerFns:
    """One layer's branches for cached decoding: (branch params, cache, x, ctx) -> (f(x), aux, cache)."""

    def branch(kind: str):
        module = Block(config, kind)

        def fn(p, cache, x, ctx):
            variables = {"params": p, "cache": cache} if cache else {"params": p}
            (y, aux), state = module.apply(variables, x, ctx, False, decode, mutable=["cache"])
            return y, aux, state.get("cache", {})

        return fn

    return reversible.LayerFns(branch_names(config), tuple(branch(k) for k in config.layer_blocks))


class Layer(nn.Module):
    """One layer's branches as a module: used to create (and name) the stacked parameters."""

    config: OlmaxConfig

    @nn.compact
    def __call__(self, x: Array, ctx: layers.Context) -> tuple[Array, None]:
        for name, kind in zip(branch_names(self.config), self.config.layer_blocks):
            y, _ = Block(self.config, kind, name=name)(x, ctx)
            x = x + y
        return x, None


class Stack(nn.Module):
    """`depth` layers with parameters stacked on a leading `layers` axis."""

    config: OlmaxConfig

    @nn.compact
    def __call__(
        self, x: Array, ctx: layers.Context, enable_dropout: bool, decode: str | None = None
    ) -> tuple[Array, dict]:
        cfg = self.config
        if self.is_initializing():
            # Creates params [depth, ...] and their `params_axes` (with 'layers' prepended).
            scanned = nn_partitioning.scan_with_axes(
                Layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,),
                length=cfg.depth,
                axis_name="layers",
            )
            scanned(cfg, name="layers")(x, ctx)
        params = self.variables["params"]["layers"]

        if decode == "init":  # zero caches; the output is the plain forward's
            self._create_caches(params, x, ctx)
        elif decode is not None:  # one cache per layer (see reversible.cached_stack for why)
            caches = [self.variable("cache", f"layers_{i}", dict) for i in range(cfg.depth)]
            fns = cached_layer_fns(cfg, decode)
            y, aux, new = reversible.cached_stack(
                fns, params, [c.value for c in caches], x, ctx, layers.zero_aux(), cfg.reversible
            )
            for c, value in zip(caches, new):
                c.value = value
            return y, aux

        use_dropout = enable_dropout and cfg.dropout_rate > 0
        key = self.make_rng("dropout") if use_dropout else jax.random.PRNGKey(0)
        rngs = jax.random.split(key, cfg.depth)
        fns = layer_fns(cfg, use_dropout)
        if cfg.reversible:
            return reversible.reversible_stack(fns, params, x, ctx, rngs, layers.zero_aux())
        return reversible.remat_stack(fns, params, x, ctx, rngs, layers.zero_aux())

    def _create_caches(self, params, x: Array, ctx: layers.Context) -> None:
        """Creates cache `layers_<i>` = {branch: the block's zero cache} for every layer, and,
        when `cache_axes` is mutable, the same tree of the leaves' logical axes there."""
        cfg = self.config
        collections = ["cache", layers.CACHE_AXES_COLLECTION]
        for i in range(cfg.depth):
            caches, axes = {}, {}
            for name, kind in zip(branch_names(cfg), cfg.layer_blocks):
                p = jax.tree.map(lambda a, i=i: a[i], params[name])
                _, state = Block(cfg, kind).apply({"params": p}, x, ctx, False, "init", mutable=collections)
                if state.get("cache"):
                    caches[name] = state["cache"]
                    axes[name] = state[layers.CACHE_AXES_COLLECTION]
            self.variable("cache", f"layers_{i}", dict).value = caches
            if self.is_mutable_collection(layers.CACHE_AXES_COLLECTION):
                self.put_variable(layers.CACHE_AXES_COLLECTION, f"layers_{i}", axes)


class Olmax(nn.Module):
    """Decoder-only Olmax with T5X's decoder-only call signature.

    Returns fp32 logits [batch, length, vocab_size]. MoE auxiliary losses and metrics
    (summed over layers) are sown to `intermediates/moe_aux`.

    Cached decoding, T5X's contract (every call with enable_dropout=False):
      1. create: `apply({'params'}, tokens [b, L], decode=True, mutable=['cache'])`
         (or `init(rng, tokens, tokens, decode=True)`) on a cache that does not exist
         yet returns the zero cache for sequences up to L (<= max_length) positions,
         `cache_index` a scalar 0; the logits are the plain forward's.
      2. prefill: `apply({'params', 'cache'}, prompt [b, P], prefill=True,
         prefill_lengths=[b], mutable=['cache'])` runs the plain forward over the
         prompt (P <= L) and keeps, for each row, the state after its own
         prefill_lengths[b] positions (default P); later positions are padding and
         are ignored. `cache_index` becomes prefill_lengths [b].
      3. step: `apply({'params', 'cache'}, token [b, 1], decode=True,
         max_decode_length=L, mutable=['cache'])` feeds each row's next token at its
         own position cache_index[b] and returns logits [b, 1, vocab]; cache_index += 1.
    Positions come from the cache (decoder_positions and decoder_segment_ids are
    ignored when decoding: one sequence per row). Every cache leaf has batch on
    axis 0, `cache_index` included once prefilled; T5X's decoding finds it by name.
    Rows may run past L (T5X lets finished rows idle): their writes are dropped and
    their logits are meaningless.
    """

    config: OlmaxConfig

    @nn.compact
    def __call__(
        self,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        decoder_causal_attention: Array | None = None,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
        prefill: bool = False,
        prefill_lengths: Array | None = None,
    ) -> Array:
        cfg = self.config
        del decoder_target_tokens, decoder_causal_attention  # every position is causal (LM)
        del max_decode_length  # the cache length is fixed when the cache is created
        tokens = jnp.asarray(decoder_input_tokens).astype(jnp.int32)  # T5X eval initializes with float tokens
        bsz, length = tokens.shape
        mode = self._decode_mode(decode, prefill, length)
        if length > cfg.max_length:
            raise ValueError(
                f"Input length {length} exceeds the model's max_length={cfg.max_length}; "
                "shorten TASK_FEATURE_LENGTHS or raise OlmaxConfig.max_length."
            )
        if mode is not None:
            # A scalar 0, then [b] after a prefill; T5X's beam search hands it back as
            # [b, beams] for rows flattened batch-major (as its decode attention reads it).
            index = nn_partitioning.variable_with_axes(
                "cache", "cache_index", lambda: jnp.zeros((), jnp.int32), axes=(), module=self
            )
        if mode == "step":  # each row's one new token, at its own position
            pos = jnp.broadcast_to(jnp.reshape(index.value, (-1,)), (bsz,)).astype(jnp.int32)
            ctx = layers.Context(segment_ids=jnp.ones((bsz, 1), jnp.int32), positions=pos[:, None], packed=False)
            index.value = index.value + 1
        elif mode == "prefill":
            lengths = length if prefill_lengths is None else prefill_lengths
            lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (bsz,))
            ctx = layers.Context(
                segment_ids=jnp.ones((bsz, length), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(length), (bsz, length)),
                prefill_lengths=lengths,
                packed=False,
            )
            index.value = lengths
        else:
            seg = jnp.ones((bsz, length), jnp.int32) if decoder_segment_ids is None else decoder_segment_ids
            pos = decoder_positions
            pos = jnp.broadcast_to(jnp.arange(length), (bsz, length)) if pos is None else pos
            ctx = layers.Context(segment_ids=jnp.asarray(seg, jnp.int32), positions=jnp.asarray(pos, jnp.int32),
                                 packed=decoder_segment_ids is not None)

        embedding = nn_partitioning.param_with_axes(
            "embedding", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.features), axes=("vocab", "embed")
        )
        # fp32 streams even when the parameters come in bf16 (T5X's infer restores them so).
        x = jnp.take(embedding, tokens, axis=0).astype(jnp.float32)  # [b,t] -> [b,t,d]
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        x, aux = Stack(cfg, name="decoder")(x, ctx, enable_dropout and mode is None, mode)
        self.sow("intermediates", "moe_aux", aux)
        x = layers.Norm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            kernel = embedding.T / jnp.sqrt(cfg.features).astype(jnp.float32)
        else:
            kernel = nn_partitioning.param_with_axes(
                "logits_kernel", layers.fan_in_normal((0,)), (cfg.features, cfg.vocab_size), axes=("embed", "vocab")
            )
        logits = layers.matmul(x.astype(jnp.float32), kernel)  # [b,t,d] -> [b,t,v] fp32
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def _decode_mode(self, decode: bool, prefill: bool, length: int) -> str | None:
        """None (plain forward), "init" (create the cache), "prefill" or "step"."""
        if not (decode or prefill):
            return None
        has_cache = self.has_variable("cache", "cache_index")
        if not has_cache and prefill:
            raise ValueError(
                "prefill=True needs a decode cache: create it first with module.apply({'params': params}, "
                "tokens[batch, max_decode_length], decode=True, mutable=['cache'])."
            )
        if prefill:
            return "prefill"
        if not has_cache:
            return "init"
        if length != 1:
            raise ValueError(
                f"A decode step takes one token per row, tokens [batch, 1]; got length {length}. "
                "Use prefill=True for a prompt."
            )
        return "step"
