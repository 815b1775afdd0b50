"""Device mesh construction and global-array assembly.

The mesh is described in config as a list of ``(axis_name, size)`` pairs, e.g. ``[('data', -1)]``
or ``[('data', 2), ('fsdp', 4)]``; at most one size may be -1 (all remaining devices). Axes are
``AxisType.Auto``: code is written on global arrays and ``jax.jit`` propagates shardings, which is
the model this library is built on (``jax.make_mesh`` defaults to Explicit axes in recent JAX).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def resolve_mesh_shape(spec: Sequence[Sequence[Any]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Turns ``[('data', -1), ('fsdp', 2)]`` into names and concrete sizes for ``num_devices``.

    Raises:
      ValueError: naming the mesh spec when sizes do not multiply to the device count.
    """
    names = tuple(str(n) for n, _ in spec)
    sizes = [int(s) for _, s in spec]
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh has repeated axis names: {list(spec)}")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh may have at most one -1 size: {list(spec)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or num_devices % known:
            raise ValueError(f"config.mesh {list(spec)} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {list(spec)} has {math.prod(sizes)} devices but {num_devices} are available"
        )
    return names, tuple(sizes)


def make_mesh(spec: Sequence[Sequence[Any]] = (("data", -1),), devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ``Mesh`` over ``devices`` (default: all global devices) from a config spec."""
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = resolve_mesh_shape(spec, len(devices))
    try:
        # Topology-aware placement (ICI rings on TPU, NVLink islands on GPU).
        grid = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
    except Exception:  # simulated or unusual topologies: plain row-major order is correct, if slower
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def batch_axes_of(mesh: Mesh, batch_axes: Sequence[str]) -> tuple[str, ...]:
    """The configured batch axes that exist in ``mesh`` (in mesh order)."""
    wanted = set(batch_axes)
    return tuple(a for a in mesh.axis_names if a in wanted)


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str]) -> NamedSharding:
    """Sharding of a ``[B, ...]`` array whose leading (batch) dim is split over ``batch_axes``."""
    axes = batch_axes_of(mesh, batch_axes)
    return NamedSharding(mesh, P(axes if axes else None))


def data_parallel_size(mesh: Mesh, batch_axes: Sequence[str]) -> int:
    """Number of batch shards: the product of the batch axes' sizes."""
    return math.prod(mesh.shape[a] for a in batch_axes_of(mesh, batch_axes))


def host_batch_to_global(batch: Any, mesh: Mesh, batch_axes: Sequence[str]) -> Any:
    """Assembles per-process numpy batches into global, batch-sharded ``jax.Array``s.

    Each process passes its contiguous slice (rows ``[p*b, (p+1)*b)`` of the global batch); the
    result has global shape ``[process_count * b, ...]``. Single-process, this is a device_put.
    """
    sharding = batch_sharding(mesh, batch_axes)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicated_batch_to_global(batch: Any, mesh: Mesh, batch_axes: Sequence[str]) -> Any:
    """Like :func:`host_batch_to_global` for data every process holds in full (e.g. eval sets)."""
    sharding = batch_sharding(mesh, batch_axes)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, batch)


def to_host(x: Any) -> Any:
    """Fetches (possibly multi-host sharded) arrays to numpy on every process."""
    from jax.experimental import multihost_utils

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(get, x)
