"""Multi-host start-up: jax.distributed on every binary (JAX's own multi-controller runtime).

Auto-detected where the platform provides it (Cloud TPU VMs, SLURM, Open MPI via
JAX's cluster detection); explicit with T5X's flags --coordinator_address,
--process_count and --process_index otherwise. One process needs none of it.
"""
from __future__ import annotations

import os

import jax
from absl import flags, logging

_AUTO_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str | None = None, process_count: int | None = None,
               process_index: int | None = None) -> None:
    if coordinator_address or process_count:
        if not (coordinator_address and process_count is not None and process_index is not None):
            raise ValueError(
                "Multi-host needs all three of --coordinator_address, --process_count and --process_index "
                f"(got {coordinator_address!r}, {process_count!r}, {process_index!r})."
            )
        jax.distributed.initialize(coordinator_address, num_processes=process_count, process_id=process_index)
    elif any(k in os.environ for k in _AUTO_ENV) and int(os.environ.get("TPU_WORKER_COUNT", "2")) > 1:
        jax.distributed.initialize()  # the platform's cluster detection fills in everything
    else:
        return
    logging.info("Process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
    fl = flags.FLAGS
    initialize(fl.coordinator_address, fl.process_count, fl.process_index)
