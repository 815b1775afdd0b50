"""Parameter placement by regex rules over '/'-joined parameter paths.

A rule table is a list of ``(regex, placement)``; the first regex that ``re.fullmatch``-es a
parameter's path (e.g. ``image/block_0/attn/query/kernel``) decides its placement:

- ``'replicate'``: every device holds the whole array.
- ``'fsdp'``: the largest dimension divisible by the mesh's ``fsdp`` axis size is split over it
  (ZeRO-3 / FSDP); arrays with no such dimension, or meshes without an ``fsdp`` axis of size > 1,
  stay replicated.
- a tuple of mesh-axis names or None, one entry per array dimension (an explicit PartitionSpec).

A parameter no rule matches is an error naming it, so a new module can never be placed by accident.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

FSDP_AXIS = "fsdp"


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined names of a ``jax.tree_util`` key path (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], rules: Sequence[Sequence[Any]], mesh: Mesh) -> P:
    """PartitionSpec of one parameter under ``rules`` (see module docstring)."""
    for pattern, placement in rules:
        if re.fullmatch(pattern, path):
            break
    else:
        raise ValueError(f"no sharding rule matches parameter '{path}'; add a catch-all ('.*', ...)")
    if placement == "replicate":
        return P()
    if placement == "fsdp":
        n = mesh.shape.get(FSDP_AXIS, 1)
        if n <= 1:
            return P()
        # Largest divisible dim: spreads the most bytes, and ties resolve to the last dim,
        # which is the contiguous one for kernels stored [in, out].
        candidates = [(d, i) for i, d in enumerate(shape) if d % n == 0 and d >= n]
        if not candidates:
            return P()
        _, dim = max(candidates)
        spec = [None] * len(shape)
        spec[dim] = FSDP_AXIS
        return P(*spec)
    if isinstance(placement, (tuple, list)):
        if len(placement) != len(shape):
            raise ValueError(
                f"sharding rule {pattern!r} gives {len(placement)} axes for '{path}' of shape {tuple(shape)}"
            )
        for axis, dim in zip(placement, shape):
            names = () if axis is None else (axis if isinstance(axis, (tuple, list)) else (axis,))
            size = 1
            for name in names:
                if name not in mesh.shape:
                    raise ValueError(f"sharding rule {pattern!r} names mesh axis {name!r}, not in the mesh")
                size *= mesh.shape[name]
            if dim % size:
                raise ValueError(f"'{path}' dim {dim} is not divisible by mesh axes {names} (size {size})")
        return P(*placement)
    raise ValueError(f"unknown placement {placement!r} in sharding rule {pattern!r}")


def tree_shardings(tree: Any, rules: Sequence[Sequence[Any]], mesh: Mesh) -> Any:
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs), placed by ``rules``.

    Scalars are always replicated.
    """

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        if len(shape) == 0:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(path_str(path), shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)
