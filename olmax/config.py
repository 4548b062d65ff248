"""OlmaxConfig: the network's hyperparameters, in a module of its own.

Every part of the network (layers, mixers, network) imports it; it imports only the
attention kernel's list of implementations, so the package has no import circle.
`network.OlmaxConfig` is the same class (the name the gin files use).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from olmax import attention

# The longest far block of the recall mixer (`recall_far_block`): the recall decay across a far block
# must stay within fp32's range when `mixers._own_pairs` splits it (see mixers.MAX_FORGET_RATE).
MAX_FAR_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class OlmaxConfig:
    """Global hyperparameters of the network (one object instead of kwarg plumbing)."""

    vocab_size: int = 384  # 256 bytes + specials, padded to a multiple of 128
    features: int = 256  # d: width of the residual stream
    depth: int = 8  # number of layers; each has len(blocks) residual branches
    max_length: int = 2048  # longest sequence the mixer has filters for
    # "recall" (Olmax: axial recall mixer), "axial" (the seed's MLP-Mixer, fixed filters)
    # or "attention" (transformer baseline).
    mixer: str = "recall"
    reversible: bool = True  # False: plain residual + remat
    # False: the layers are unrolled in the compiled step instead of scanned (compiles once per
    # layer; olmax.plan uses it so that XLA's cost analysis, which counts a loop body once, sees
    # every layer). Same function and parameters either way.
    scan_layers: bool = True
    norm: str = "rms"  # "rms" or "layer"
    placement: str = "sandwich"  # "sandwich" (norm before and after f) or "pre"
    num_experts: int = 0  # 0: no mixture of experts
    dtype: Any = jnp.float32  # compute dtype; parameters and residual streams stay fp32
    # Per-layer pattern of branches: "conv", "mixer", "moe". None: conv, mixer
    # (conv, moe, mixer when num_experts > 0).
    blocks: tuple[str, ...] | None = None
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    tie_embeddings: bool = False
    # Causal convolution block.
    conv_kernel: int = 5
    conv_features: int = 512
    # Rows longer than this many tokens run the conv block chunk by chunk, recomputed in the
    # backward pass: its step memory is that of batch x conv_chunk tokens (its stacked
    # [.., conv_kernel, features] windows and hidden activations), not of the whole row.
    conv_chunk: int = 2048
    # Data parallel with rows longer than recall_chunk or conv_chunk: the weights used inside those
    # chunk loops (the recall projection, the conv kernels) get one copy per data shard, so their
    # gradients are all-reduced once a step instead of once a chunk (layers.per_data_shard). Off by
    # default: the CPU-compiled 1b step then moves 6-66% fewer all-reduce bytes but reads and writes
    # 2.5-12% more memory (README, "Plan the pod"), and an accelerator compiler that sinks those
    # all-reduces out of the loops itself gains nothing from it. Same function either way.
    reduce_chunk_grads_once: bool = False
    # Block size K of the recall and axial mixers (the recall mixer's softmax window); None:
    # mixer_block_for(max_length), the measured fastest K for rows that long. Read `block_size`.
    mixer_block: int | None = None
    mixer_heads: int = 4
    # Heads of the attention baseline and of the recall mixer.
    num_heads: int = 4
    # Attention baseline's kernel (olmax/attention.py): "auto" (cuDNN on GPU for unpacked
    # rows, else blockwise), "blockwise" (flash-style, any platform), "cudnn", or
    # "materialized" (the O(N^2)-memory test reference); its tile size for blockwise.
    attention_impl: str = "auto"
    attention_block: int = 512
    # Recall mixer: features per head of its linear-attention (quadratic) kernel, and the
    # tokens per row of one step of its scan over the row (longer rows run chunk by chunk,
    # projected and recomputed in the backward pass chunk by chunk: the mixer's step memory
    # is that of batch x recall_chunk tokens plus the row's input and output). 512: on CPU the
    # leanest and fastest of 256-4096 from 1k to 32k tokens (README, "Long context").
    recall_features: int = 16
    recall_chunk: int = 512
    # Positions per far block of the recall part (its pairs within a far block as one [B, B] matmul,
    # earlier far blocks through their states; at most MAX_FAR_BLOCK = 512). None: a row of at
    # most 512 positions (and one recall_chunk) is one far block, longer rows far blocks of 128, the
    # fastest measured (README, "Long context"). Same function at any value.
    recall_far_block: int | None = None
    # Mixture of experts.
    expert_top_k: int = 2
    expert_features: int = 512
    capacity_factor: float = 1.25
    expert_group_size: int = 512

    def __post_init__(self):
        _choice("mixer", self.mixer, ("recall", "axial", "attention"))
        _choice("attention_impl", self.attention_impl, attention.IMPLEMENTATIONS)
        _choice("norm", self.norm, ("rms", "layer"))
        _choice("placement", self.placement, ("sandwich", "pre"))
        _choice("activation", self.activation, ("gelu", "relu", "silu", "leaky_relu"))
        for kind in self.layer_blocks:
            _choice("blocks entry", kind, ("conv", "mixer", "moe"))
        if "moe" in self.layer_blocks and self.num_experts < 2:
            raise ValueError(f"blocks={self.layer_blocks} has a 'moe' branch but num_experts={self.num_experts}; set num_experts >= 2.")
        if self.num_experts and not 1 <= self.expert_top_k <= self.num_experts:
            raise ValueError(f"expert_top_k={self.expert_top_k} must be in [1, num_experts={self.num_experts}].")
        if self.features % self.mixer_heads:
            raise ValueError(f"features={self.features} must be divisible by mixer_heads={self.mixer_heads}.")
        if self.features % self.num_heads or (self.features // self.num_heads) % 2:
            raise ValueError(f"features={self.features} / num_heads={self.num_heads} must be an even head size.")
        for name in ("vocab_size", "features", "depth", "max_length", "conv_kernel", "conv_features",
                     "conv_chunk", "recall_features", "recall_chunk", "attention_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        if self.conv_chunk < 2 * (self.conv_kernel - 1):
            raise ValueError(f"conv_chunk={self.conv_chunk} must be >= 2 (conv_kernel - 1) = {2 * (self.conv_kernel - 1)}, "
                             "the positions before a chunk that the conv block reads.")
        if self.recall_far_block is not None and not 1 <= self.recall_far_block <= MAX_FAR_BLOCK:
            raise ValueError(f"recall_far_block={self.recall_far_block} must be in [1, {MAX_FAR_BLOCK}] (or None: "
                             "chosen by the row's length); the recall decay across a far block must stay within "
                             "fp32's range.")
        if self.mixer_block is not None and self.mixer_block < 1:
            raise ValueError(f"mixer_block={self.mixer_block} must be positive (or None: chosen by max_length).")

    @property
    def block_size(self) -> int:
        """K, the mixers' block size: mixer_block, or mixer_block_for(max_length) when it is None."""
        return self.mixer_block if self.mixer_block is not None else mixer_block_for(self.max_length)

    @property
    def layer_blocks(self) -> tuple[str, ...]:
        if self.blocks is not None:
            return tuple(self.blocks)
        return ("conv", "moe", "mixer") if self.num_experts else ("conv", "mixer")


def mixer_block_for(length: int) -> int:
    """K for rows of `length` tokens: the largest power of two in [8, 64] with 16 K <= length.

    Measured (benchmarks.run --only block: tiny widths, forward + backward, 2-core CPU): at
    1k-32k tokens K = 32 or 64 is fastest and leanest, within 7% of each other (64 at 1k, 32
    from 4k); K = 16 and K >= 128 lose 5-35%. 64 over 32: a softmax window twice as wide for
    at most 7% of speed. Since the far part runs on far blocks of its own (128 positions in long
    rows, `mixers.recall_layout`), K sets only the window's width and cost: K = 64 now trains at
    0.90-0.94x the tokens/s of the fastest K (16 or 32) from 1k to 32k (same CPU, `--only block`);
    64 is kept for its exact window twice as wide, and changing it changes the model. The recall mixer's far part is
    linear in N at any K, so the best K does not grow with N; below 1024 tokens K shrinks so that
    a row still has >= 16 blocks. (The axial mixer, O(N (N/K + K)),
    would rather have K ~ sqrt(N): set mixer_block for it.)"""
    k = 8
    while k < 64 and 32 * k <= length:
        k *= 2
    return k


def _choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"OlmaxConfig.{name}={value!r} is not one of {valid}.")
