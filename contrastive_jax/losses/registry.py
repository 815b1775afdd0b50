"""``config.loss`` -> the training objective: ``objective(outputs, batch) -> (loss, metrics)``.

Objectives are looked up by exact name (``config.loss.name``) in :data:`OBJECTIVES`. Each entry is a
builder ``fn(loss_config, mesh, batch_axes) -> objective``; the objective receives

* ``outputs``: the model's output dict, e.g. ``image``/``text`` ``[B, D]`` float32 L2-normalized
  embeddings and scalars ``scale`` (already exponentiated and clamped) and ``bias``;
* ``batch``: the global batch dict (for objectives that need labels or group ids),

and returns a float32 scalar loss plus a dict of float32 scalar metrics. The trainer never looks at
the loss's name, so a new objective needs only a builder registered here.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from jax.sharding import Mesh

from contrastive_jax.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss

Objective = Callable[[dict, dict], tuple[Any, dict]]
ObjectiveBuilder = Callable[[Any, "Mesh | None", "Sequence[str] | None"], Objective]


def _impl_kwargs(loss_config: Any, mesh: Mesh | None, batch_axes: Sequence[str] | None) -> dict:
    return dict(
        impl=loss_config.impl,
        block_size=int(loss_config.block_size),
        mesh=mesh,
        batch_axes=tuple(batch_axes) if batch_axes is not None else None,
        return_metrics=True,
    )


def _softmax(loss_config, mesh, batch_axes) -> Objective:
    kw = _impl_kwargs(loss_config, mesh, batch_axes)
    return lambda out, batch: softmax_contrastive_loss(out["image"], out["text"], scale=out["scale"], **kw)


def _sigmoid(loss_config, mesh, batch_axes) -> Objective:
    kw = _impl_kwargs(loss_config, mesh, batch_axes)
    return lambda out, batch: sigmoid_contrastive_loss(
        out["image"], out["text"], scale=out["scale"], bias=out["bias"], **kw
    )


OBJECTIVES: dict[str, ObjectiveBuilder] = {"softmax": _softmax, "sigmoid": _sigmoid}


def register_objective(name: str, builder: ObjectiveBuilder) -> None:
    """Makes ``config.loss.name = name`` train with ``builder(config.loss, mesh, batch_axes)``."""
    OBJECTIVES[name] = builder


def make_objective(loss_config: Any, mesh: Mesh | None = None, batch_axes: Sequence[str] | None = None) -> Objective:
    """The objective for ``config.loss`` (fields ``name``, ``impl``, ``block_size`` and any the
    objective adds).

    Args:
      mesh, batch_axes: the mesh and the axes the batch dim is split over (None: one device).

    Raises:
      ValueError: an unknown ``config.loss.name`` (the message lists the known ones).
    """
    name = loss_config.name
    if name not in OBJECTIVES:
        raise ValueError(f"unknown config.loss.name {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](loss_config, mesh, batch_axes)
