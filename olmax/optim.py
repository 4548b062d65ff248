"""Optimizer: unit-wise AGC -> Adam-family update -> weight decay -> LR schedule.

The chain built by `create_optimizer` (bound by Gin, e.g.
`optim.create_optimizer.learning_rate = 3e-4`):

    g -> adaptive_grad_clip  (unit-wise, Brock et al. 2021; optional)
      -> scale_by_adam | scale_by_factored_rms | scale_by_lion
      -> add_decayed_weights(weight_decay, mask=weight_decay_mask)
      -> scale_by_learning_rate(schedule)   # multiplies by -lr(step)

Every state in the chain is a registered optax state (EmptyState, MaskedState,
ScaleByAdamState, ...), so T5X-style checkpointing can save and restore it.

Logical axis names (`axes`): a pytree shaped like the params whose leaves are
tuples of names, one per array dimension (or `jax.sharding.PartitionSpec`s, as
`olmax.axes.logical_axes(variables)` returns). Two names matter here: 'layers' (a
scanned stack) and 'expert' (MoE experts) are batch-like axes, never reduced;
'vocab' marks the output-unit axis of embeddings and output kernels.
"""

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import PartitionSpec

from olmax import validation

Names = tuple[Any, ...]  # one logical name (or None) per array dimension
_BATCH_AXES = ("layers", "expert")  # each layer / expert has its own units
_UNIT_AXIS = "vocab"


def _is_named(entry, name: str) -> bool:
    """A PartitionSpec entry may be a name, None, or a tuple of names."""
    return entry == name or (isinstance(entry, tuple) and name in entry)


def agc_reduction_axes(names_or_ndim: int | Sequence[Any] | PartitionSpec) -> tuple[int, ...]:
    """Axes that the AGC unit norm reduces over.

    With an int (rank only): the last axis holds the units, every other axis is
    reduced; 0-d and 1-d arrays are one unit. With logical names: the unit axis
    is 'vocab' if present, else the last axis; 'layers' and 'expert' axes are
    never reduced; every other axis is. If at most one axis remains once
    'layers'/'expert' are set aside, that remainder is one unit (reduced whole).

      ('layers', 'embed', 'mlp')            -> (1,)   per (layer, mlp unit)
      ('vocab', 'embed')                    -> (1,)   per vocab row
      ('layers', 'expert', 'embed', 'mlp')  -> (2,)
      ('embed', 'expert')                   -> (0,)   per expert (router)
      ('layers', 'norm')                    -> (1,)   one unit per layer
    """
    if isinstance(names_or_ndim, int):
        ndim = names_or_ndim
        return tuple(range(ndim)) if ndim <= 1 else tuple(range(ndim - 1))
    names = tuple(names_or_ndim)
    free = [i for i, n in enumerate(names) if not any(_is_named(n, b) for b in _BATCH_AXES)]
    if len(free) <= 1:
        return tuple(free)
    vocab = [i for i, n in enumerate(names) if _is_named(n, _UNIT_AXIS)]
    unit = vocab[0] if vocab else len(names) - 1
    return tuple(i for i in free if i != unit)


def _is_axes_leaf(x) -> bool:
    return x is None or isinstance(x, (tuple, PartitionSpec))


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _path_str(path) -> str:
    keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(k) for k in keys)


def _leaf_names(tree, axes) -> tuple[list[Any], Any, list[Names | None]]:
    """Flattens `tree` (optax.MaskedNode kept as leaves) and aligns `axes` to it.

    Returns (leaves, treedef, names) with names[i] a tuple of len leaves[i].ndim,
    or None where no names are known (the rank rule applies then).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
    leaves = [x for _, x in flat]
    if axes is None:
        return leaves, treedef, [None] * len(leaves)
    axes_flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=_is_axes_leaf)[0]
    paths = [_path_str(p) for p, _ in flat]
    axes_paths = [_path_str(p) for p, _ in axes_flat]
    if paths != axes_paths:
        raise ValueError(
            "axes must have the same tree structure as params; params have "
            f"{paths} but axes have {axes_paths}. Pass the logical axis names of "
            "these params, e.g. olmax.axes.logical_axes(variables)."
        )
    names = []
    for path, x, (_, spec) in zip(paths, leaves, axes_flat):
        if spec is None or _is_masked(x):
            names.append(None)
            continue
        if isinstance(spec, PartitionSpec):  # may omit trailing Nones
            spec = tuple(spec) + (None,) * max(jnp.ndim(x) - len(spec), 0)
        if len(spec) != jnp.ndim(x):
            raise ValueError(
                f"param {path} has shape {jnp.shape(x)} but axes {spec}; "
                "give one logical name per dimension."
            )
        names.append(spec)
    return leaves, treedef, names


def _reduction_axes(x, names: Names | None) -> tuple[int, ...]:
    return agc_reduction_axes(jnp.ndim(x) if names is None else names)


def _unit_norm(x, axes: tuple[int, ...]) -> jax.Array:
    """L2 norm per unit, keepdims: [.., units, ..] -> same rank, reduced axes size 1."""
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)  # finite grad at 0


@functools.partial(jax.jit, static_argnums=(2,))  # one compile per shape when run eagerly
def _clip_unit(g, w, axes, clipping: float, eps: float):
    """Returns (clipped g, bool mask of clipped units [keepdims shape])."""
    g_norm = _unit_norm(g, axes)
    max_norm = clipping * jnp.maximum(_unit_norm(w, axes), eps)  # clip * max(||W_i||, eps)
    clipped = g_norm > max_norm
    scale = jnp.where(clipped, max_norm / jnp.where(clipped, g_norm, 1.0), 1.0)  # no 0/0
    return (g * scale).astype(g.dtype), clipped


def _no_params_error() -> ValueError:
    return ValueError(
        "adaptive_grad_clip needs the current params: call "
        "`optimizer.update(grads, opt_state, params)` (not update(grads, state))."
    )


def adaptive_grad_clip(
    clipping: float, eps: float = 1e-3, axes=None
) -> optax.GradientTransformation:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets).

    For each unit i of a param W with gradient G (units per `agc_reduction_axes`):
        G_i <- G_i * clipping * max(||W_i||, eps) / ||G_i||
               if ||G_i|| / max(||W_i||, eps) > clipping, else G_i unchanged.

    We do not use optax.adaptive_grad_clip: it picks reduction axes by rank (or
    one `axis` for every param). For a scanned [layers, in, out] kernel its rank-3
    rule reduces over axis 0, the layer axis, so every norm mixes all layers and
    no unit is an output feature of one layer. Here the logical `axes` names give
    the right units per param; without `axes` the rank rule is: last axis = units.

    To exclude params (e.g. the output layer, as NFNets does), wrap it:
        optax.masked(adaptive_grad_clip(0.01, axes=axes),
                     functools.partial(agc_mask, exclude=("logits",)))
    The state is optax.EmptyState().
    """

    def update_fn(updates, state, params=None):
        if params is None:
            raise _no_params_error()
        g_leaves, treedef, names = _leaf_names(updates, axes)
        w_leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_masked)
        out = [
            g if _is_masked(g) else _clip_unit(g, w, _reduction_axes(g, n), clipping, eps)[0]
            for g, w, n in zip(g_leaves, w_leaves, names)
        ]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def agc_clip_fraction(grads, params, clipping: float, eps: float = 1e-3, axes=None) -> jax.Array:
    """Fraction of AGC units (over all params) whose gradient gets clipped; f32 scalar."""
    g_leaves, _, names = _leaf_names(grads, axes)
    w_leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_masked)
    clipped, total = jnp.zeros((), jnp.float32), 0
    for g, w, n in zip(g_leaves, w_leaves, names):
        if _is_masked(g):
            continue
        mask = _clip_unit(g, w, _reduction_axes(g, n), clipping, eps)[1]
        clipped, total = clipped + jnp.sum(mask), total + mask.size
    return clipped / max(total, 1)


def agc_mask(params, exclude: str | Sequence[str] = ()):
    """True for params AGC clips: those whose 'a/b/c' path matches no `exclude` regex."""
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: not any(re.search(pat, _path_str(p)) for pat in patterns), params
    )


def weight_decay_mask(params, axes=None):
    """True for params that get decoupled weight decay: matrices.

    A param is a matrix when it has >= 2 dims, not counting 'layers' and 'expert'
    axes when `axes` names are given (by rank otherwise). Norm scales, biases and
    scalars get False.
    """
    leaves, treedef, names = _leaf_names(params, axes)

    def decays(x, n):
        if n is None:
            return jnp.ndim(x) >= 2
        return sum(not any(_is_named(e, b) for b in _BATCH_AXES) for e in n) >= 2

    return jax.tree_util.tree_unflatten(treedef, [decays(x, n) for x, n in zip(leaves, names)])


SCHEDULES = ("cosine", "rsqrt", "constant", "linear")


def default_warmup(total_steps: int) -> int:
    """Warm-up when none is set: 10% of the run, at most 1000 steps."""
    return max(0, min(1000, total_steps // 10))


def make_schedule(
    name: str,
    learning_rate: float,
    warmup_steps: int | None,
    total_steps: int,
    end_value_ratio: float = 0.1,
) -> optax.Schedule:
    """LR schedule: linear warmup 0 -> lr over `warmup_steps` (w), then

      cosine:   lr * (r + (1 - r) * (1 + cos(pi * (t - w) / (T - w))) / 2)
      linear:   lr + (lr * r - lr) * (t - w) / (T - w)
      rsqrt:    lr * sqrt(w' / max(t, w')),  w' = max(w, 1)
      constant: lr
    where t is the step, T = total_steps, r = end_value_ratio (held at lr * r after T).
    warmup_steps=None means `default_warmup(T)`. A warm-up as long as the run or longer
    (a shortened rehearsal of a long run) is clamped to the default, with a warning.
    """
    if name not in SCHEDULES:
        raise ValueError(f'unknown schedule {name!r}; valid names: {", ".join(SCHEDULES)}.')
    lr, w, t_total = learning_rate, warmup_steps, total_steps
    if w is None:
        w = default_warmup(t_total)
    elif w >= t_total > 0:
        w = default_warmup(t_total)
        logging.log_first_n(  # once: the trainer builds the optimizer more than once
            logging.WARNING, "warmup_steps=%d is not shorter than the run (total_steps=%d): warming up over %d "
            "steps instead (10%% of the run). Set optim.create_optimizer.warmup_steps to choose.", 1,
            warmup_steps, t_total, w)
    if name == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps=max(1, t_total - w), alpha=end_value_ratio)
    elif name == "linear":
        after = optax.linear_schedule(lr, lr * end_value_ratio, transition_steps=max(1, t_total - w))
    elif name == "rsqrt":
        w1 = max(w, 1)
        after = lambda s: lr * jax.lax.rsqrt(jnp.maximum(s + w, w1) / w1)  # s counts from w
    else:
        after = optax.constant_schedule(lr)
    if w <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), after], [w])


OPTIMIZERS = ("adamw", "adafactor", "lion")


class Optimizer(NamedTuple):
    """An optax GradientTransformation (`init`, `update`) plus what the trainer logs.

    `learning_rate`: the schedule, step -> LR. `agc`: (clipping, eps) of its AGC, None
    without. A factory bound in Gin may return a plain optax transformation instead;
    the trainer then logs neither the LR nor the AGC clip fraction.
    """

    init: Callable
    update: Callable
    learning_rate: optax.Schedule
    agc: tuple[float, float] | None


def _check_args(learning_rate, warmup_steps, total_steps, weight_decay, clipping) -> None:
    """The numbers users set on the command line, checked before the schedule uses them."""
    name = "optim.create_optimizer."
    validation.number(learning_rate, name + "learning_rate", minimum=0, positive=True)
    validation.integer(warmup_steps, name + "warmup_steps", minimum=0, example=100, allow_none=True)
    validation.integer(total_steps, name + "total_steps", minimum=1, example=1000, macro="TRAIN_STEPS")
    validation.number(weight_decay, name + "weight_decay", minimum=0, example="0.1")
    validation.number(clipping, name + "clipping", minimum=0, example="0.01", allow_none=True)


@gin.configurable
def create_optimizer(
    learning_rate: float = 1e-3,
    schedule: str = "cosine",
    warmup_steps: int | None = None,
    total_steps: int = 10000,
    optimizer: str = "adamw",
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clipping: float | None = 0.01,
    agc_eps: float = 1e-3,
    axes=None,
    exclude_from_agc: str | Sequence[str] | None = None,
) -> Optimizer:
    """The training optimizer (see module docstring for the chain), with its schedule and AGC settings.

    Args:
        learning_rate, schedule, warmup_steps, total_steps: see `make_schedule`.
        optimizer: 'adamw' (scale_by_adam(b1, b2, eps)), 'adafactor'
          (scale_by_factored_rms, optax defaults) or 'lion' (scale_by_lion(b1, b2)).
        weight_decay: decoupled decay coefficient, applied to `weight_decay_mask`
          params before the LR scaling (so the step is -lr * (u + wd * W)).
        clipping, agc_eps: AGC threshold and eps; AGC is skipped if clipping is None/0.
        axes: logical axis names of the params (known after model init; the trainer
          passes it at call time), used by AGC and the decay mask.
        exclude_from_agc: regex(es) on the 'a/b/c' param path of params AGC must not
          clip, e.g. 'logits' for the output layer (NFNets).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f'unknown optimizer {optimizer!r}; valid names: {", ".join(OPTIMIZERS)}.')
    _check_args(learning_rate, warmup_steps, total_steps, weight_decay, clipping)
    chain = []
    if clipping:
        agc = adaptive_grad_clip(clipping, agc_eps, axes=axes)
        if exclude_from_agc:
            agc = optax.masked(agc, functools.partial(agc_mask, exclude=exclude_from_agc))
        chain.append(agc)
    if optimizer == "adamw":
        chain.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    elif optimizer == "adafactor":
        chain.append(optax.scale_by_factored_rms())
    else:
        chain.append(optax.scale_by_lion(b1=b1, b2=b2))
    if weight_decay:
        mask = functools.partial(weight_decay_mask, axes=axes)
        chain.append(optax.add_decayed_weights(weight_decay, mask=mask))
    lr = make_schedule(schedule, learning_rate, warmup_steps, total_steps)
    chain.append(optax.scale_by_learning_rate(lr))
    tx = optax.chain(*chain)
    return Optimizer(tx.init, tx.update, lr, (clipping, agc_eps) if clipping else None)
