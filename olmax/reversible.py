"""The layer stack: reversible (custom_vjp over a scan) or plain residual with remat.

A layer is a sequence of residual branches f_1..f_n (olmax.network.Block). Both stacks
run the same pure function per branch over parameters stacked along a leading
`layers` axis:

  reversible: two fp32 streams, each branch maps (x1, x2) -> (x2, x1 + f(x2)).
    The backward pass rebuilds every layer's input from its output
    (x2 = y1, x1 = y2 - f(y1)), so nothing per layer is stored: activation memory
    is that of one layer, whatever the depth. Cost: one extra forward per branch.
  plain: x -> x + f(x) with jax.checkpoint around each layer (stores each layer's
    input, recomputes the rest): the usual remat baseline.

Auxiliary scalars (MoE losses and metrics) are summed over branches and layers;
their gradients flow through the reversible backward pass like the streams'.

Cached decoding (prefill and one-token steps) runs forward only: `cached_stack`
goes through the same per-branch arithmetic layer after layer, each branch reading
and returning its decode cache. No inverse and no gradient are needed there.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# (branch params, x, ctx, rng) -> (f(x), aux dict of scalars)
BranchFn = Callable[[Any, Array, Any, Array], tuple[Array, dict]]
# (branch params, branch cache, x, ctx) -> (f(x), aux dict of scalars, new branch cache)
CachedBranchFn = Callable[[Any, Any, Array, Any], tuple[Array, dict, Any]]


@dataclasses.dataclass(frozen=True)
class LayerFns:
    """The branches of one layer: names (keys into the layer's params) and their functions."""

    names: tuple[str, ...]
    fns: tuple[BranchFn, ...]
    # Unroll the scans over layers (OlmaxConfig.scan_layers=False): no loop in the compiled
    # program, so XLA's cost analysis counts every layer (it counts a loop body once).
    unroll: bool = False

    def __hash__(self):
        return hash((self.names, self.fns, self.unroll))


def _branch_rng(rng: Array, i: int) -> Array:
    return jax.random.fold_in(rng, i)


def _layer_forward(layer: LayerFns, p, x1, x2, ctx, rng, aux):
    for i, (name, fn) in enumerate(zip(layer.names, layer.fns)):
        out, a = fn(p[name], x2, ctx, _branch_rng(rng, i))
        x1, x2 = x2, x1 + out
        aux = jax.tree.map(jnp.add, aux, a)
    return x1, x2, aux


def _scan_forward(layer: LayerFns, params, x1, x2, ctx, rngs, aux0):
    def body(carry, xs):
        p, rng = xs
        return _layer_forward(layer, p, *carry[:2], ctx, rng, carry[2]), None

    (y1, y2, aux), _ = jax.lax.scan(body, (x1, x2, aux0), (params, rngs), unroll=layer.unroll)
    return y1, y2, aux


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reversible(layer: LayerFns, params, x1, x2, ctx, rngs, aux0):
    return _scan_forward(layer, params, x1, x2, ctx, rngs, aux0)


def _reversible_fwd(layer, params, x1, x2, ctx, rngs, aux0):
    y1, y2, aux = _scan_forward(layer, params, x1, x2, ctx, rngs, aux0)
    # Residuals: the outputs only, never per-layer activations.
    return (y1, y2, aux), (params, y1, y2, ctx, rngs, aux0)


def _reversible_bwd(layer, res, g):
    params, y1, y2, ctx, rngs, aux0 = res
    dy1, dy2, daux = g

    def body(carry, xs):
        y1, y2, dy1, dy2 = carry
        p, rng = xs
        dp = {}
        for i in reversed(range(len(layer.names))):
            name, fn = layer.names[i], layer.fns[i]
            x2 = y1  # (x1, x2) -> (x2, x1 + f(x2)) inverted
            (out, _), vjp = jax.vjp(lambda q, x: fn(q, x, ctx, _branch_rng(rng, i)), p[name], x2)
            x1 = y2 - out
            dp[name], dx2 = vjp((dy2, daux))
            y1, y2, dy1, dy2 = x1, x2, dy2, dy1 + dx2
        return (y1, y2, dy1, dy2), dp

    (_, _, dx1, dx2), dparams = jax.lax.scan(body, (y1, y2, dy1, dy2), (params, rngs), reverse=True,
                                             unroll=layer.unroll)
    return (
        dparams,
        dx1,
        dx2,
        jax.tree.map(_zero_cotangent, ctx),
        _zero_cotangent(rngs),
        jax.tree.map(jnp.zeros_like, aux0),
    )


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


def reversible_stack(layer: LayerFns, params, x: Array, ctx, rngs: Array, aux0: dict, custom_gradient: bool = True):
    """Reversible stack over `params` (leaves [depth, ...]). x: [b, t, d] fp32.

    Returns ((y1 + y2) / 2, aux). `custom_gradient=False` differentiates the very same
    forward function by plain autodiff (storing activations): the reference the
    reversible gradient is tested against.
    """
    run = _reversible if custom_gradient else _scan_forward
    # A plain dict of the branches: the backward pass builds one, and custom_vjp needs the
    # cotangent's container to match the primal's (T5X hands in FrozenDicts).
    params = {name: params[name] for name in layer.names}
    y1, y2, aux = run(layer, params, x, x, ctx, rngs, aux0)
    return (y1 + y2) * 0.5, aux


def remat_stack(layer: LayerFns, params, x: Array, ctx, rngs: Array, aux0: dict, remat: bool = True):
    """Plain residual stack x -> x + f(x), each layer under jax.checkpoint when `remat`."""

    def layer_fn(x, aux, p, rng):
        for i, (name, fn) in enumerate(zip(layer.names, layer.fns)):
            out, a = fn(p[name], x, ctx, _branch_rng(rng, i))
            x = x + out
            aux = jax.tree.map(jnp.add, aux, a)
        return x, aux

    if remat:
        layer_fn = jax.checkpoint(layer_fn, prevent_cse=False)

    def body(carry, xs):
        return layer_fn(*carry, *xs), None

    (y, aux), _ = jax.lax.scan(body, (x, aux0), (params, rngs), unroll=layer.unroll)
    return y, aux


def cached_stack(layer: LayerFns, params, caches: Sequence[dict], x: Array, ctx, aux0: dict, reversible: bool = True):
    """Forward only, for cached decoding: (y, aux, new caches).

    `layer.fns` are CachedBranchFns; `params` leaves are [depth, ...]; `caches[i]` maps
    branch names of layer i to their caches (a branch without one may be absent).
    The arithmetic per branch is that of `reversible_stack` (two streams, output
    (y1 + y2) / 2) or of `remat_stack` (x + f(x)).

    The layers are unrolled rather than scanned: each layer's cache stays its own
    array, which a decode step updates in place (a few positions written, the rest
    only read). Scanning with the stacked cache as xs / ys would copy the whole
    cache on every token, O(depth * max_length * d), more than the axial mixer's
    O(depth * (max_length / K + K) * d) work per token. The price is a decode step
    whose compile time grows with depth.
    """
    x1 = x2 = x
    aux, new_caches = aux0, []
    for i, cache in enumerate(caches):
        p = jax.tree.map(lambda a, i=i: a[i], params)
        new = {}
        for name, fn in zip(layer.names, layer.fns):
            out, a, c = fn(p[name], cache.get(name, {}), x2, ctx)
            if reversible:
                x1, x2 = x2, x1 + out
            else:
                x2 = x2 + out
            aux = jax.tree.map(jnp.add, aux, a)
            if c:
                new[name] = c
        new_caches.append(new)
    y = (x1 + x2) * 0.5 if reversible else x2
    return y, aux, new_caches
