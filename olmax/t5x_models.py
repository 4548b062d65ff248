"""Olmax's model class for upstream T5X: T5X's DecoderOnlyModel plus the MoE losses.

T5X's `models.DecoderOnlyModel` trains on cross-entropy (and its z-loss) only: the
load-balancing and router z-losses that Olmax's MoE blocks sow to
`intermediates/moe_aux` never reach its loss, so the router is not trained to
balance. `OlmaxDecoderOnlyModel` is the same model with them added:

    loss = T5X's weighted cross-entropy (+ z-loss)
         + tokens * (moe_aux_loss * lb_loss + moe_z_loss * router_z_loss)

where lb_loss and router_z_loss are means over the MoE branches and `tokens` is the
sum of the loss weights divided by T5X's loss normalizing factor (1 when None, T5X's
default, whose cross-entropy is a sum over tokens), so each MoE term has the same
per-token weight as in `olmax.models.DecoderOnlyLM`. Metrics gain `moe/lb_loss`,
`moe/z_loss`, `moe/dropped` (fraction of routed tokens over capacity) and
`moe/max_load` (busiest expert's load x num_experts; 1 is perfect balance). Without
MoE branches the class behaves exactly as T5X's.

This is the only module of Olmax that imports t5x; gin/t5x/olmax_moe.gin uses it.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics
from t5x import losses
from t5x import models

from olmax import network


class OlmaxDecoderOnlyModel(models.DecoderOnlyModel):
    """T5X's DecoderOnlyModel for an `olmax.network.Olmax` module, adding its MoE losses.

    Args (beyond T5X's DecoderOnlyModel's):
      moe_aux_loss: weight of the load-balancing loss (mean over MoE branches).
      moe_z_loss: weight of the router z-loss (mean over MoE branches).
    """

    def __init__(self, *args, moe_aux_loss: float = 1e-2, moe_z_loss: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(getattr(self.module, "config", None), network.OlmaxConfig):
            raise TypeError(
                f"OlmaxDecoderOnlyModel needs module = @network.Olmax(), got {type(self.module).__name__}; "
                "use t5x's models.DecoderOnlyModel for other modules."
            )
        self.moe_aux_loss = moe_aux_loss
        self.moe_z_loss = moe_z_loss

    @property
    def num_moe_branches(self) -> int:
        config = self.module.config
        return config.depth * config.layer_blocks.count("moe")

    def loss_fn(
        self, params: Any, batch: Mapping[str, jnp.ndarray], dropout_rng: jax.Array | None
    ) -> tuple[jnp.ndarray, dict[str, Any]]:
        """T5X's loss and metrics, plus the weighted MoE losses and their metrics."""
        if not self.num_moe_branches:
            return super().loss_fn(params, batch, dropout_rng)
        logits, state = self._compute_logits(params, batch, dropout_rng, mutable=["intermediates"])
        factor, weights = losses.get_loss_normalizing_factor_and_weights(self._loss_normalizing_factor, batch)
        targets = batch["decoder_target_tokens"]
        loss, z_loss, _ = losses.compute_weighted_cross_entropy(
            logits,
            targets=targets,
            weights=weights,
            label_smoothing=self._label_smoothing,
            z_loss=self._z_loss,
            loss_normalizing_factor=factor,
        )
        (aux,) = state["intermediates"]["moe_aux"]
        aux = {k: v / self.num_moe_branches for k, v in aux.items()}  # sums over branches -> means
        tokens = jnp.sum(jnp.asarray(targets > 0 if weights is None else weights, jnp.float32))
        if factor is not None:
            tokens = tokens / factor
        loss = loss + tokens * (self.moe_aux_loss * aux["moe_lb_loss"] + self.moe_z_loss * aux["moe_z_loss"])
        metrics = self._compute_metrics(
            logits=logits, targets=targets, mask=weights, loss=loss, z_loss=z_loss, segment_ids=_segments(batch)
        )
        for key, value in aux.items():
            metrics[f"moe/{key[len('moe_'):]}"] = clu_metrics.Average.from_model_output(value)
        return loss, metrics


def _segments(batch: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """The packing/padding masks T5X's base metrics expect: segment ids, else non-padding."""
    segments = {k[: -len("_segment_ids")]: v for k, v in batch.items() if k.endswith("_segment_ids")}
    return segments or {"decoder_target_tokens": batch["decoder_target_tokens"] != 0}
