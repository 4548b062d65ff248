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

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over `data` (multi-host safe)."""
        return {
            k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v))
            for k, v in local_batch.items()
        }
