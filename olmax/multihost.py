"""Multi-host start-up: jax.distributed on every binary (JAX's multi-controller runtime).

Every host runs the same command; each process drives its local devices, reads
its shard of the data and contributes its rows to global arrays (see
`PjitPartitioner.data_shard` and `global_batch`). This module only connects the
processes, before anything touches a JAX backend:

  * explicit: T5X's flags `--coordinator_address=HOST:PORT --process_count=N
    --process_index=I` (what `launch/local.py` passes, and what a cluster without
    auto-detection needs);
  * automatic where the platform describes the job: Cloud TPU VMs (every worker
    of a pod slice), SLURM (`srun`), Open MPI (`mpirun`), GKE TPU pods;
  * neither: one process, nothing to do.

On CPU, cross-process collectives go through gloo (`jax_cpu_collectives_implementation`),
which is what lets a multi-host run be tested on one machine: several processes
on 127.0.0.1, each with `XLA_FLAGS=--xla_force_host_platform_device_count=K`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import flags, logging

_LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def detect_cluster() -> str | None:
    """The cluster environment `jax.distributed.initialize()` can read by itself, or None.

    Mirrors JAX's own detection (jax._src.clusters) for the platforms Olmax documents,
    and only reports jobs of more than one process: one SLURM task needs no runtime.
    """
    env = os.environ
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        return "SLURM" if int(env["SLURM_NTASKS"]) > 1 else None
    if "OMPI_MCA_orte_hnp_uri" in env or "OMPI_COMM_WORLD_SIZE" in env:
        return "Open MPI" if int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1 else None
    if "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "TPU multislice"
    if "TPU_WORKER_HOSTNAMES" in env or "TPU_PROCESS_ADDRESSES" in env:
        return "TPU pod (GKE)"
    try:  # set when `import jax` found libtpu and TPU chips: a Cloud TPU VM
        from jax._src import cloud_tpu_init

        if cloud_tpu_init.running_in_cloud_tpu_vm:
            return "Cloud TPU VM"
    except (ImportError, AttributeError):
        pass
    return None


def _use_gloo_on_cpu() -> None:
    """Cross-process collectives on CPU devices (the default from jax 0.5 on; older jax had none)."""
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:
        return
    if current in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, process_count: int | None = None,
               process_index: int | None = None) -> None:
    """Connects this process to the others; call before any JAX computation.

    Raises ValueError when the explicit flags are incomplete or inconsistent.
    """
    explicit = coordinator_address is not None or process_count is not None or process_index is not None
    if explicit:
        if not (coordinator_address and process_count is not None and process_index is not None):
            raise ValueError(
                "Multi-host needs all three of --coordinator_address, --process_count and --process_index "
                f"(got {coordinator_address!r}, {process_count!r}, {process_index!r}); "
                "on Cloud TPU VMs, SLURM and Open MPI leave all three out."
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"--process_index={process_index} must be in [0, --process_count={process_count}).")
        if ":" not in coordinator_address:
            raise ValueError(f"--coordinator_address={coordinator_address!r} needs a port: HOST:PORT, e.g. 10.0.0.2:8476.")
        _use_gloo_on_cpu()
        kwargs = {}
        if coordinator_address.rsplit(":", 1)[0] in _LOOPBACK:
            # A local run: keep the coordinator off the network (it binds every interface otherwise).
            kwargs["coordinator_bind_address"] = coordinator_address
        jax.distributed.initialize(coordinator_address, num_processes=process_count, process_id=process_index, **kwargs)
        source = "flags"
    else:
        source = detect_cluster()
        if source is None:
            return
        _use_gloo_on_cpu()
        jax.distributed.initialize()  # JAX's cluster detection fills in everything
    logging.info("Process %d of %d (%s); %d local / %d global devices", jax.process_index(), jax.process_count(),
                 source, jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
    fl = flags.FLAGS
    initialize(fl.coordinator_address, fl.process_count, fl.process_index)


def all_processes(flag: bool) -> bool:
    """True when `flag` is True on every process. A collective: every process must call it,
    as often as the others (one process: just `flag`)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(bool(flag)))))


def is_main_process() -> bool:
    """Process 0 writes what exists once per run: config.gin, TensorBoard events, jsonl."""
    return jax.process_index() == 0
