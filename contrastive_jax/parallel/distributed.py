"""Multi-host start-up: ``jax.distributed.initialize`` from flags or the cluster environment.

JAX's multi-controller runtime is the distributed engine: every host runs the same program on its
own devices, and ``jit`` over a global ``Mesh`` inserts the collectives. This module only starts
the runtime and offers the two host-level agreements the loop needs (a barrier and an OR of flags).

Launch recipes are in ``docs/multihost.md``.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np

log = logging.getLogger("contrastive_jax")

# Environment variables JAX's cluster auto-detection understands (TPU pods need none of them: the
# TPU metadata server is queried). Seeing one means "initialize from the environment".
_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    auto: bool = False,
) -> bool:
    """Starts the multi-host runtime, once, before any other JAX call touches a device.

    Args:
      coordinator_address: ``host:port`` of process 0; with ``num_processes`` and ``process_id``
        for an explicit launch (e.g. two local processes on ``127.0.0.1``).
      local_device_ids: devices this process drives (GPU clusters with one process per GPU).
      auto: no explicit address: let JAX detect the cluster (TPU pod slice, SLURM, Open MPI).

    Returns:
      True if the runtime was initialized here (False: single process, nothing to do).

    On CPU the cross-process collectives use gloo (the default CPU backend has none).
    """
    explicit = coordinator_address is not None
    from_env = auto or any(k in os.environ for k in _CLUSTER_ENV)
    if not explicit and not from_env:
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                      process_id=int(process_id))
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any (no-op with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
