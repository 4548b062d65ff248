"""Model FLOPs per token and peak FLOP/s, for MFU.

MFU = model FLOPs per token x tokens/s / (peak FLOP/s x devices). Model FLOPs count
the math the architecture needs (3 x forward for a training step: forward, and a
backward twice as costly); the reversible stack's recomputation and remat are not
counted, as usual for MFU.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from olmax import mixers, network

# Dense bf16 peak FLOP/s per chip from vendor datasheets.
DATASHEET_PEAK = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def forward_flops_per_token(cfg: network.OlmaxConfig, length: int) -> float:
    """Multiply-adds x 2 of one token's forward pass at sequence length `length`."""
    d = cfg.features
    per_layer = 0.0
    for kind in cfg.layer_blocks:
        if kind == "conv":
            per_layer += 2 * 2 * cfg.conv_kernel * d * cfg.conv_features
        elif kind == "moe":
            per_layer += 2 * d * cfg.num_experts + cfg.expert_top_k * 2 * 2 * d * cfg.expert_features
        elif cfg.mixer == "axial":
            n_blocks = -(-length // cfg.block_size)
            per_layer += 2 * d * (n_blocks + 2 * cfg.block_size)  # token mixing (both axes)
        elif cfg.mixer == "recall":
            k, h, r = cfg.block_size, cfg.num_heads, cfg.recall_features
            states = h * mixers.feature_size(r) * (d // h)  # one token into or out of a [F, c] state per head
            # The far part's layout (mixers.recall_layout): far blocks of B = m K positions, `per_step` of
            # them a scan step, their states passed along a step as one [G, G] matmul.
            m, per_step, steps = mixers.recall_layout(length, k, cfg.recall_far_block, cfg.recall_chunk)
            far = m * k
            per_layer += 2 * (4 * d * d + 2 * d * h * r + 2 * d * h)  # projections (q, k, v, out, recall q, k; gate, forget)
            per_layer += 2 * 2 * k * d  # window softmax: K keys a query (scores and values)
            per_layer += far * (h * r + d)  # own far block's pairs: about B / 2 keys a query
            if per_step * steps > 1:  # a row of one far block writes and reads no state
                per_layer += 2 * states * (2 + per_step / far)  # write, read, and pass the far blocks' states
        else:
            per_layer += 2 * 4 * d * d + 2 * 2 * length * d  # projections + scores and values
    return cfg.depth * per_layer + 2 * d * cfg.vocab_size


def train_flops_per_token(cfg: network.OlmaxConfig, length: int) -> float:
    return 3.0 * forward_flops_per_token(cfg, length)


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a large matmul on the default device (the CPU 'peak')."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device(override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if override:
        return float(override), "configured"
    kind = jax.devices()[0].device_kind
    for name, peak in DATASHEET_PEAK.items():
        if kind.startswith(name):
            return peak, f"datasheet ({kind})"
    return measure_matmul_peak(), f"measured fp32 matmul ({kind})"
