"""The closed vocabulary of logical axis names, and the default rules mapping them to mesh axes.

Every parameter of the network is declared with one of PARAM_AXES per dimension
(recorded in the `params_axes` collection, which T5X reads); every activation
sharding constraint uses ACTIVATION_AXES. Parameter and activation names are kept
apart (as in MaxText) so that, e.g., the `embed` dimension of a kernel and the
feature dimension of the residual stream can be sharded differently.

A test asserts that every parameter is annotated with names from this module and
that every name has a rule in DEFAULT_RULES.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
from flax.linen import partitioning as nn_partitioning

# Parameter axes.
PARAM_AXES = (
    "vocab",  # vocabulary rows of the embedding / columns of the output layer
    "embed",  # model width (OlmaxConfig.features)
    "mlp",  # hidden width of conv and expert feed-forwards
    "heads",  # attention heads (flattened with the head dim) or mixer channel groups
    "kv",  # per-head width of a projection declared [embed, heads, kv] (the recall mixer's)
    "conv_window",  # taps of a causal convolution
    "mix_lag",  # lags of an axial-mixer token-mixing filter
    "expert",  # experts of a mixture of experts
    "layers",  # the scanned depth axis of stacked layer parameters
    "norm",  # the feature axis of a norm scale or bias
)

# Activation axes.
ACTIVATION_AXES = (
    "activation_batch",
    "activation_length",
    "activation_embed",
    "activation_mlp",
    "activation_heads",
    "activation_vocab",
    "activation_expert",
    "activation_capacity",
)

# Logical name -> mesh axis (or None: replicated). Mesh axes are `data` and `model`.
# Order matters where two names could claim the same mesh axis on one array: flax
# gives a mesh axis to the first name that asks for it.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", "data"),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "model"),
    ("activation_heads", "model"),
    ("activation_vocab", "model"),
    ("activation_expert", "model"),
    ("activation_capacity", None),
    ("expert", "model"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("embed", None),
    ("conv_window", None),
    ("mix_lag", None),
    ("layers", None),
    ("norm", None),
)


def t5x_additional_rules() -> list[tuple[str, Any]]:
    """Olmax's rules for upstream T5X: `partitioning.standard_logical_axis_rules.additional_rules`.

    T5X appends them to its own standard rules and flax uses the first rule that
    names an axis, so names T5X already maps (vocab, embed, mlp, heads, layers) keep
    T5X's mesh axes; the rest (activation_*, conv_window, mix_lag, expert, norm)
    get Olmax's. Without them those axes would silently stay replicated, the
    batch of every activation and decode-cache leaf included.
    """
    return [tuple(rule) for rule in DEFAULT_RULES]


def logical_axes(variables: Any) -> Any:
    """Tree of logical PartitionSpecs for `variables['params']`, read from `params_axes`.

    Works on the output of `module.init(...)` (or anything holding a `params_axes`
    collection); the result has the same structure as `variables['params']` and is
    what `nn.logical_to_mesh_sharding` and `optim.adaptive_grad_clip(axes=...)` take.
    """
    variables = flax.core.unfreeze(variables)
    if "params_axes" not in variables:
        raise ValueError(
            "No 'params_axes' collection: pass the variables returned by module.init(...) "
            "(not only variables['params']) so that the logical axis names are available."
        )
    return flax.core.unfreeze(nn_partitioning.get_axis_names(variables["params_axes"]))


def is_spec(x: Any) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


def param_axes(config, length: int = 16) -> Any:
    """Logical PartitionSpecs of an Olmax model's params, from its config alone.

    For callers that only see parameters (e.g. an optimizer built by upstream T5X's
    Gin files): `optim.adaptive_grad_clip.axes = @axes.param_axes()` with
    `axes.param_axes.config = @network.OlmaxConfig()`. Abstract: allocates nothing.
    """
    import jax.numpy as jnp

    from olmax import network  # network imports layers which would import this module

    module = network.Olmax(config)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    variables = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t, t, enable_dropout=False), tokens)
    return logical_axes(variables)
