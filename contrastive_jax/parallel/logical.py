"""Logical-axis sharding: rules mapping the models' logical axis names to mesh axes.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) and the towers
constrain their activations with logical names (``models.layers`` lists both sets). A rules table
``((logical_name, mesh_axes), ...)`` maps them to mesh axes; ``config.sharding.logical_rules``
chooses it:

- ``None`` or ``''`` (default): parameters are placed by the regex table ``config.sharding.rules``
  (:mod:`contrastive_jax.parallel.sharding`, unchanged), and activations are constrained only
  along the batch (``batch`` -> the batch axes).
- a preset name (mesh axes missing from the mesh are dropped, so one preset serves all meshes):

  ``'data'``        parameters replicated; batch over ``sharding.batch_axes``.
  ``'fsdp'``        weights' ``embed`` (and conv output) dim over ``fsdp`` (ZeRO-3); batch over
                    ``sharding.batch_axes`` (which should include ``fsdp``).
  ``'tensor'``      Megatron-style tensor parallelism over ``model``: attention heads, the MLP
                    hidden dim and the vocabulary are split (weights and activations), the
                    residual stream stays whole; batch over ``sharding.batch_axes``.
  ``'fsdp_tensor'`` both: ``embed`` over ``fsdp``, heads/mlp/vocab over ``model``.

- an explicit list ``[(logical_name, mesh_axis | (axes...) | None), ...]`` (first match wins;
  ``batch`` is added from ``sharding.batch_axes`` when absent).

When ``logical_rules`` is set it places the parameters and the regex ``rules`` are not used.
A dimension whose size is not divisible by its mesh axes' size stays unsharded (e.g. 12 heads
on a ``model`` axis of 8), so a preset never fails on an odd shape.

What the training code calls (see :func:`param_shardings`, :func:`activation_rules_context`,
:func:`with_activation_rules`).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.parallel.sharding import path_str, tree_shardings


PRESETS = ("data", "fsdp", "tensor", "fsdp_tensor")


def preset_rules(name: str) -> tuple[tuple[str, Any], ...]:
    """The rules of preset ``name`` (without ``batch``, which comes from the batch axes)."""
    fsdp = (("embed", "fsdp"), ("conv_out", "fsdp"))
    tensor = (("heads", "model"), ("mlp", "model"), ("vocab", "model"),
              ("act_heads", "model"), ("act_mlp", "model"))
    table = {"data": (), "fsdp": fsdp, "tensor": tensor, "fsdp_tensor": fsdp + tensor}
    if name not in table:
        raise ValueError(f"unknown config.sharding.logical_rules preset {name!r}; known: {', '.join(PRESETS)}")
    return table[name]


def _present(axes: Any, mesh: Mesh) -> Any:
    """Drops mesh axes the mesh lacks (or of size 1); returns None, a name or a tuple."""
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else kept


def uses_logical_rules(sharding_config: Any) -> bool:
    """True when ``sharding.logical_rules`` is set (then it places parameters)."""
    value = sharding_config.get("logical_rules", "") if hasattr(sharding_config, "get") else ""
    return bool(value)


def logical_rules(sharding_config: Any, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """The resolved ``((logical_name, mesh_axes), ...)`` table for ``mesh``.

    Use with ``nn.logical_axis_rules(...)`` or :func:`activation_rules_context`. Always maps
    ``batch`` to the batch axes present in the mesh.
    """
    batch_axes = tuple(sharding_config.get("batch_axes", ("data", "fsdp")))
    value = sharding_config.get("logical_rules", "") or ()
    if isinstance(value, str):
        table = preset_rules(value)
    else:
        table = []
        for item in value:
            if len(item) != 2 or not isinstance(item[0], str):
                raise ValueError(
                    f"config.sharding.logical_rules entries must be (logical_name, mesh_axes), got {item!r}"
                )
            for a in (item[1],) if isinstance(item[1], (str, type(None))) else item[1]:
                if a is not None and a not in mesh.shape:
                    raise ValueError(f"config.sharding.logical_rules maps {item[0]!r} to mesh axis {a!r}, "
                                     f"not in the mesh {tuple(mesh.axis_names)}")
        table = tuple((str(k), v) for k, v in value)
    rules = [(k, _present(v, mesh)) for k, v in table]
    if not any(k == "batch" for k, _ in rules):
        rules.insert(0, ("batch", _present(tuple(a for a in mesh.axis_names if a in batch_axes), mesh)))
    return tuple(rules)


def _spec_from_names(names: Sequence[str | None], shape: Sequence[int] | None, rules, mesh: Mesh) -> P:
    """Mesh PartitionSpec of logical ``names``; non-divisible dims and reused mesh axes -> None."""
    spec, used = [], set()
    for i, name in enumerate(names):
        axes = None
        for k, v in rules:
            if k == name:
                axes = v
                break
        if axes is not None:
            group = (axes,) if isinstance(axes, str) else tuple(axes)
            size = math.prod(mesh.shape[a] for a in group)
            if used.intersection(group) or (shape is not None and shape[i] % size):
                axes = None
            else:
                used.update(group)
        spec.append(axes)
    return P(*spec)


def _is_boxed(x):
    return isinstance(x, nn.meta.AxisMetadata)


def param_shardings(params: Any, sharding_config: Any, mesh: Mesh) -> Any:
    """NamedShardings for a parameter tree, by logical rules or by the regex ``rules``.

    Args:
      params: one of
        - the boxed params of ``jax.eval_shape(model.init, ...)['params']`` (leaves
          ``nn.LogicallyPartitioned`` around ShapeDtypeStructs) — preferred: names and shapes;
        - a tree of logical ``PartitionSpec``s (``models.logical_param_axes``) — names only, no
          divisibility check, only with logical rules;
        - unboxed arrays / ShapeDtypeStructs — regex rules only.
      sharding_config: ``config.sharding`` (``batch_axes``, ``rules``, ``logical_rules``).
      mesh: the device mesh.

    Returns:
      A tree of ``NamedSharding`` with the structure of the UNBOXED params (what the train state
      holds). Scalars are replicated.
    """
    if not uses_logical_rules(sharding_config):
        unboxed = nn.meta.unbox(params) if any(_is_boxed(x) for x in jax.tree.leaves(params, is_leaf=_is_boxed)) else params
        if any(isinstance(x, P) for x in jax.tree.leaves(unboxed, is_leaf=lambda x: isinstance(x, P))):
            raise ValueError("regex sharding rules need parameter shapes; pass the boxed abstract params")
        return tree_shardings(unboxed, sharding_config.rules, mesh)
    rules = logical_rules(sharding_config, mesh)

    def one(path, leaf):
        if isinstance(leaf, P):
            names, shape = tuple(leaf), None
        elif _is_boxed(leaf):
            names, shape = tuple(leaf.names), tuple(leaf.value.shape)
        else:
            raise ValueError(
                f"parameter '{path_str(path)}' has no logical axis names; pass the boxed params of "
                "jax.eval_shape(model.init, ...) or use regex sharding.rules"
            )
        if shape is not None and len(shape) == 0:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, _spec_from_names(names, shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: _is_boxed(x) or isinstance(x, P))


@contextlib.contextmanager
def activation_rules_context(sharding_config: Any, mesh: Mesh):
    """Context for TRACING model code: logical axis rules + ``mesh``'s abstract mesh, so the
    towers' ``nn.with_logical_constraint`` calls become sharding constraints on ``mesh``.

    Must be active while ``jax.jit`` traces (first call / new shapes); may be entered inside a
    traced function (it sets the abstract mesh, not ``jax.set_mesh``, which jit forbids); see
    :func:`with_activation_rules` for a wrapper that makes this automatic.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(logical_rules(sharding_config, mesh)):
        yield


def with_activation_rules(fn: Callable, sharding_config: Any, mesh: Mesh) -> Callable:
    """Wraps ``fn`` so its body runs under :func:`activation_rules_context` — wrap the function
    BEFORE ``jax.jit`` (``jax.jit(with_activation_rules(step, cfg.sharding, mesh), ...)``) and the
    rules are active whenever it is traced."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_rules_context(sharding_config, mesh):
            return fn(*args, **kwargs)

    return wrapped
