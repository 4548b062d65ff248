"""The language model around the network: loss, scoring, prediction, initialization.

`DecoderOnlyLM` follows the calling contract of T5X's decoder-only model
(`loss_fn`, `score_batch`, `predict_batch_with_aux`, `get_initial_variables`) without
its class hierarchy, and without optimizer state: the optimizer lives in
`olmax.optim` and the train state in the trainer.

A batch is what seqio.DecoderFeatureConverter produces:
  decoder_input_tokens, decoder_target_tokens, decoder_loss_weights: [batch, length]
  decoder_segment_ids, decoder_positions: [batch, length] (packed examples only)
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp

from olmax import decoding, network

Array = jax.Array
Batch = Mapping[str, Array]
LN2 = math.log(2.0)


def cross_entropy(logits: Array, targets: Array, label_smoothing: float = 0.0) -> tuple[Array, Array]:
    """Per-token cross-entropy and log-normalizer, in fp32.

    logits: [b, t, v], targets: [b, t] -> (loss [b, t], logsumexp [b, t]). With label
    smoothing the target distribution is (1 - a) one_hot + a / v; the loss is shifted by
    that distribution's entropy so a perfect prediction scores 0.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    lse = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - lse[..., None]
    target_logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if not label_smoothing:
        return -target_logp, lse
    on, off = 1.0 - label_smoothing, label_smoothing / vocab
    entropy = -((on + off) * math.log(on + off) + (vocab - 1) * off * math.log(off))
    loss = -(on * target_logp + off * jnp.sum(log_probs, axis=-1)) - entropy
    return loss, lse


class DecoderOnlyLM:
    """A decoder-only LM: `module` is an `olmax.network.Olmax`.

    Args:
      module: the network.
      vocabulary: a seqio vocabulary (used for bits per byte and decoding text).
      z_loss: weight of mean(logsumexp(logits)^2), keeps the softmax normalizer near 0.
      label_smoothing: mass spread uniformly over the vocabulary.
      moe_aux_loss: weight of the MoE load-balancing loss (mean over MoE branches).
      moe_z_loss: weight of the router z-loss (mean over MoE branches).
    """

    def __init__(
        self,
        module: network.Olmax,
        vocabulary: Any = None,
        z_loss: float = 1e-4,
        label_smoothing: float = 0.0,
        moe_aux_loss: float = 1e-2,
        moe_z_loss: float = 1e-3,
    ):
        self.module = module
        self.config: network.OlmaxConfig = module.config
        self.vocabulary = vocabulary
        self.z_loss = z_loss
        self.label_smoothing = label_smoothing
        self.moe_aux_loss = moe_aux_loss
        self.moe_z_loss = moe_z_loss
        if vocabulary is not None and vocabulary.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"The vocabulary has {vocabulary.vocab_size} ids but the model's vocab_size is "
                f"{self.config.vocab_size}; set OlmaxConfig.vocab_size >= {vocabulary.vocab_size}."
            )

    @property
    def is_byte_vocabulary(self) -> bool:
        return type(self.vocabulary).__name__ == "ByteVocabulary"

    @property
    def num_moe_branches(self) -> int:
        return self.config.depth * self.config.layer_blocks.count("moe")

    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple], input_types=None):
        """Variables (`params` and `params_axes`) for inputs of the given shapes."""
        shape = input_shapes["decoder_input_tokens"]
        dtype = (input_types or {}).get("decoder_input_tokens", jnp.int32)
        tokens = jnp.ones(shape, dtype)
        return self.module.init(rng, tokens, tokens, enable_dropout=False)

    def _logits_and_aux(self, params, batch: Batch, dropout_rng=None):
        enable_dropout = dropout_rng is not None
        logits, state = self.module.apply(
            {"params": params},
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            decoder_positions=batch.get("decoder_positions"),
            decoder_causal_attention=batch.get("decoder_causal_attention"),
            enable_dropout=enable_dropout,
            rngs={"dropout": dropout_rng} if enable_dropout else None,
            mutable=["intermediates"],
        )
        (aux,) = state["intermediates"]["moe_aux"]
        return logits, aux

    def loss_fn(self, params, batch: Batch, dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
        """Weighted token cross-entropy + z-loss (+ MoE losses) and metrics.

        The loss is normalized by the sum of `decoder_loss_weights` (all non-padding
        targets when absent). Metrics are per-batch means plus `tokens` (the weight
        sum) so that callers can aggregate over batches.
        """
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        weights = weights.astype(jnp.float32)
        logits, aux = self._logits_and_aux(params, batch, dropout_rng)
        ce, lse = cross_entropy(logits, targets, self.label_smoothing)
        total = jnp.maximum(jnp.sum(weights), 1e-8)
        ce_mean = jnp.sum(ce * weights) / total
        z = jnp.sum(jnp.square(lse) * weights) / total
        loss = ce_mean + self.z_loss * z
        metrics = {
            "cross_entropy": ce_mean,
            "z_loss": z,
            "accuracy": jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / total,
            "tokens": jnp.sum(weights),
        }
        if self.label_smoothing:  # report the unsmoothed cross-entropy too
            plain, _ = cross_entropy(logits, targets)
            metrics["nll"] = jnp.sum(plain * weights) / total
        nll = metrics.get("nll", ce_mean)
        metrics["perplexity"] = jnp.exp(nll)
        metrics["bits_per_token"] = nll / LN2
        if self.is_byte_vocabulary:
            metrics["bits_per_byte"] = nll / LN2
        if self.num_moe_branches:
            n = self.num_moe_branches
            loss = loss + self.moe_aux_loss * aux["moe_lb_loss"] / n + self.moe_z_loss * aux["moe_z_loss"] / n
            metrics.update({k: v / n for k, v in aux.items()})
        metrics["loss"] = loss
        return loss, metrics

    def score_batch(self, params, batch: Batch) -> Array:
        """Log-likelihood of each sequence's weighted targets: [batch] fp32."""
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        logits, _ = self._logits_and_aux(params, batch)
        ce, _ = cross_entropy(logits, targets)
        return -jnp.sum(ce * weights.astype(jnp.float32), axis=-1)

    def predict_batch_with_aux(
        self,
        params,
        batch: Batch,
        rng: Array | None = None,
        *,
        max_decode_length: int | None = None,
        prompt_lengths: Array | None = None,
        decoder_params: Mapping[str, Any] | None = None,
        num_decodes: int = 1,
        return_all_decodes: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        greedy: bool = False,
        eos_id: int | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """Sampled continuations of the prompts in `batch`, with the decode cache.

        The prompt of row b is its first prompt_lengths[b] decoder_input_tokens:
        by default sum(decoder_causal_attention[b]) (BOS + inputs, T5X's prefix-LM
        convention), or BOS alone without decoder_causal_attention. As in T5X, the
        prompt and the generation share max_decode_length positions (default: the
        batch's length); a row stops at EOS (the vocabulary's, else 1) or when full.
        `decoder_params` may hold T5X's names (temperature, topk, topp) or ours.

        Returns (tokens [b, max_decode_length] generated only, left-aligned, 0 after
        EOS; {'scores': [b] model log-likelihood of the generated tokens}). With
        num_decodes > 1 the best-scoring sample of each row, or all of them sorted by
        increasing score ([b, num_decodes, length]) when return_all_decodes.
        """
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        for key, value in (decoder_params or {}).items():
            options[{"topk": "top_k", "topp": "top_p"}.get(key, key)] = value
        tokens = jnp.asarray(batch["decoder_input_tokens"])
        bsz, width = tokens.shape
        length = width if max_decode_length is None else int(max_decode_length)
        if prompt_lengths is None:
            causal = batch.get("decoder_causal_attention")
            prompt_lengths = 1 if causal is None else jnp.sum(jnp.asarray(causal) > 0, axis=1)
        lengths = jnp.clip(jnp.broadcast_to(jnp.asarray(prompt_lengths, jnp.int32), (bsz,)), 1, length)
        prompt = tokens[:, :length]
        if eos_id is None:
            eos_id = getattr(self.vocabulary, "eos_id", None) if self.vocabulary is not None else 1
        if num_decodes > 1:
            prompt, lengths = jnp.repeat(prompt, num_decodes, axis=0), jnp.repeat(lengths, num_decodes, axis=0)
        out, scores = decoding.generate(
            self.module,
            params,
            prompt,
            lengths,
            jax.random.PRNGKey(0) if rng is None else rng,
            max_new_tokens=length,
            eos_id=eos_id,
            cache_length=length,
            return_scores=True,
            **options,
        )
        if num_decodes == 1:
            return out, {"scores": scores}
        out, scores = out.reshape(bsz, num_decodes, length), scores.reshape(bsz, num_decodes)
        order = jnp.argsort(scores, axis=1)
        out, scores = jnp.take_along_axis(out, order[..., None], axis=1), jnp.take_along_axis(scores, order, axis=1)
        if return_all_decodes:
            return out, {"scores": scores}
        return out[:, -1], {"scores": scores[:, -1]}


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(flax.core.unfreeze(params)))
