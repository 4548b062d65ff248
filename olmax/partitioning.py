"""Partitioning: a device mesh, logical axis rules, and the shardings `jax.jit` takes.

The mesh has two named axes, `data` (batch / data parallel) and `model` (tensor /
model parallel, `num_partitions` devices). Parameters carry logical axis names
(olmax.axes); `logical_axis_rules` map them to mesh axes and
`nn.logical_to_mesh_sharding` turns them into NamedShardings. Everything runs
through `jax.jit` with in/out shardings: no pmap, no pjit, no global mesh state
outside the `with partitioner.mesh` blocks where activation constraints apply.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from olmax import axes


@gin.configurable
def standard_logical_axis_rules() -> tuple[tuple[str, Any], ...]:
    """The default rules (olmax.axes.DEFAULT_RULES), for binding from Gin."""
    return axes.DEFAULT_RULES


@gin.configurable
class PjitPartitioner:
    """Mesh + rules. The name mirrors T5X's partitioner; the engine is `jax.jit`.

    Args:
      num_partitions: devices per model-parallel group (size of the `model` axis).
      mesh_shape: optional explicit {'data': d, 'model': m}; overrides num_partitions.
      logical_axis_rules: (logical name, mesh axis or None) pairs; first match wins.
      devices: the devices to use (default: all, across every process).
    """

    def __init__(
        self,
        num_partitions: int = 1,
        mesh_shape: dict[str, int] | None = None,
        logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        devices = list(jax.devices() if devices is None else devices)
        n = len(devices)
        if mesh_shape:
            unknown = set(mesh_shape) - {"data", "model"}
            if unknown:
                raise ValueError(f"mesh_shape has unknown axes {sorted(unknown)}; use 'data' and 'model'.")
            model = int(mesh_shape.get("model", 1))
            data = int(mesh_shape.get("data", n // model))
        else:
            model = int(num_partitions)
            data = n // model if model and n % model == 0 else 0
        if model < 1 or data < 1 or data * model != n:
            raise ValueError(
                f"Cannot lay out {n} devices as data x model = {data} x {model}: "
                "num_partitions (or mesh_shape) must divide the number of devices."
            )
        self.mesh = Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))
        self.rules = tuple(tuple(r) for r in (logical_axis_rules or axes.DEFAULT_RULES))

    @property
    def data_parallel_size(self) -> int:
        return self.mesh.shape["data"]

    @property
    def model_parallel_size(self) -> int:
        return self.mesh.shape["model"]

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.data_parallel_size:
            raise ValueError(
                f"BATCH_SIZE={batch_size} is not divisible by the data-parallel size "
                f"{self.data_parallel_size} (mesh data x model = {self.data_parallel_size} x "
                f"{self.model_parallel_size}); use a multiple of {self.data_parallel_size} "
                "or change num_partitions."
            )

    @contextlib.contextmanager
    def activate(self):
        """Mesh + logical rules in scope: activation constraints in the model apply."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(PartitionSpec())

    @property
    def data_sharding(self) -> NamedSharding:
        """Batch-major arrays: the batch axis split over `data`."""
        return self.sharding(PartitionSpec("data"))

    def param_shardings(self, logical_specs: Any) -> Any:
        """Logical PartitionSpecs (olmax.axes.logical_axes) -> NamedShardings."""
        return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)

    def check_divisible(self, shapes: Any, logical_specs: Any) -> None:
        """A ValueError naming the first parameter whose dimension the mesh cannot split evenly:
        its path, logical axis and size, the mesh axis and what to change (JAX's own error names
        only an array shape)."""
        by_path = lambda tree, kind: dict(jax.tree_util.tree_leaves_with_path(  # noqa: E731
            tree, is_leaf=lambda x: isinstance(x, kind)))
        specs, shardings = by_path(logical_specs, PartitionSpec), by_path(self.param_shardings(logical_specs), NamedSharding)
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
            for dim, (size, mesh_axes) in enumerate(zip(leaf.shape, shardings[path].spec)):
                names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
                parts = int(np.prod([self.mesh.shape[a] for a in names])) if names else 1
                if size % parts:
                    where = "/".join(str(getattr(k, "key", k)) for k in path)
                    logical = specs[path][dim]
                    below = max(n for n in range(1, parts) if size % n == 0)
                    above = [n for n in range(parts + 1, size + 1) if size % n == 0][:1]
                    raise ValueError(
                        f"The mesh's {'x'.join(names)} axis ({parts} devices) cannot split parameter {where} "
                        f"{tuple(leaf.shape)}: its '{logical}' dimension, {size}, is not divisible by {parts}. "
                        f"Use a {'x'.join(names)} axis that divides {size} (e.g. {' or '.join(map(str, [below] + above))}; "
                        f"partitioning.PjitPartitioner.num_partitions, or olmax.plan --mesh), or a model whose "
                        f"'{logical}' sizes it divides.")

    def opt_state_shardings(self, tx: optax.GradientTransformation, param_shapes: Any, param_shardings: Any) -> Any:
        """Shardings for `tx.init(params)`: param-shaped parts follow the params; the rest is replicated."""
        state_shapes = jax.eval_shape(tx.init, param_shapes)
        return optax.tree_map_params(
            tx,
            lambda _, sharding: sharding,
            state_shapes,
            param_shardings,
            transform_non_params=lambda _: self.replicated,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )

    def data_shard(self, batch_size: int) -> tuple[int, int]:
        """(index, count): the slice of every global batch this process reads and feeds.

        Processes whose devices hold the same rows of the batch (a `model` axis that
        spans hosts) read the same shard; with one process this is (0, 1).
        """
        rows: dict[int, set[tuple[int, int]]] = {}
        for device, index in self.data_sharding.devices_indices_map((batch_size,)).items():
            start, stop, _ = index[0].indices(batch_size)
            rows.setdefault(device.process_index, set()).add((start, stop))
        return shard_of_process(rows, jax.process_index(), batch_size)

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows (its `data_shard`) -> global arrays sharded over `data` (multi-host safe)."""
        return {
            k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v))
            for k, v in local_batch.items()
        }


def shard_of_process(rows: dict[int, set[tuple[int, int]]], process: int, batch_size: int) -> tuple[int, int]:
    """(index, count) of `process`'s block of rows, given each process's device row ranges.

    Every process must hold one contiguous block of the batch, all blocks the same
    size (what `jax.make_array_from_process_local_data` assembles), e.g. a mesh whose
    devices are ordered by process, as `jax.devices()` is.
    """
    spans = {}
    for p, ranges in rows.items():
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        covered = set()
        for start, stop in ranges:
            covered.update(range(start, stop))
        if len(covered) != hi - lo:
            raise ValueError(
                f"Process {p} holds rows {sorted(ranges)} of the batch of {batch_size}: not one contiguous "
                "block. Order the mesh's devices by process (as jax.devices() is) so each host feeds one slice."
            )
        spans[p] = (lo, hi)
    if process not in spans:
        raise ValueError(f"Process {process} has no device in the mesh; the mesh must span every process's devices.")
    blocks = sorted(set(spans.values()))
    size = blocks[0][1] - blocks[0][0]
    if any(hi - lo != size for lo, hi in blocks) or size * len(blocks) != batch_size:
        raise ValueError(
            f"The processes hold overlapping or unequal blocks {blocks} of the batch of {batch_size}; "
            "each host must feed an equal, disjoint slice. Check the mesh's device order."
        )
    return blocks.index(spans[process]), len(blocks)

