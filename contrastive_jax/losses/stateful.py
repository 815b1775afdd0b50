"""Objectives that carry state across steps, or that read a teacher (momentum / EMA) network.

Every other objective is a pure function of one batch's outputs: ``objective(outputs, batch) ->
(loss, metrics)``. Some of the methods people train are not: iSogCLR keeps per-example
temperatures and moving averages indexed by a global example id, MoCo a queue of past keys and a
momentum encoder, SwAV a queue of past embeddings. :class:`StatefulObjective` is the one
protocol for them; the train step (:func:`contrastive_jax.train.make_train_step`) threads the
objective's state through ``TrainState.loss_state`` (sharded, checkpointed with everything else,
restored bitwise on resume) and, for objectives with a teacher, runs the model once more with the
parameters held in ``TrainState.ema_params`` (no gradient, no optimizer state) and hands its
outputs to the objective as ``outputs['teacher']``.

The objective stays a pure function: state in, new state out. It never sees the model or the
optimizer.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec as P


class StatefulObjective:
    """Base class of an objective with state (and optionally a teacher network).

    Subclasses implement :meth:`init_state` and :meth:`__call__`; they override
    :meth:`state_specs` when a state leaf should be split over the mesh (default: replicated),
    and set ``teacher = True`` (with :meth:`teacher_decay`) to receive the EMA model's outputs.

    Attributes:
      teacher: the step runs the model with ``state.ema_params`` (stop-gradient, train mode,
        its own dropout key) on the same inputs and passes the outputs as ``outputs['teacher']``
        (a dict like the model's, or what the model method named by ``teacher_method`` returns);
        after the update the EMA parameters move toward the new parameters with
        :meth:`teacher_decay` of the step (instead of ``config.optim.ema_decay``).
    """

    teacher: bool = False
    # The model method the teacher runs (None: the model's __call__, same outputs as the student);
    # e.g. a method computing only the teacher-side heads, to skip the rest of the forward pass.
    teacher_method: str | None = None

    def init_state(self) -> Any:
        """The initial state: a pytree of global arrays (called under ``jit`` with the state's
        out-shardings, so large leaves are created directly in place)."""
        raise NotImplementedError

    def state_specs(self, batch_axes: tuple[str, ...] | None) -> Any:
        """A pytree of ``PartitionSpec`` with the structure of :meth:`init_state`'s output
        (``batch_axes``: the mesh axes the batch is split over). Default: every leaf replicated."""
        return jax.tree.map(lambda _: P(), jax.eval_shape(self.init_state))

    def teacher_decay(self, step: jax.Array) -> jax.Array:
        """EMA decay of the teacher parameters applied after update ``step`` (float32 scalar)."""
        raise NotImplementedError

    def __call__(self, outputs: dict, batch: dict, state: Any, step: jax.Array) -> tuple[jax.Array, dict, Any]:
        """``(loss, metrics, new_state)`` for one global batch.

        Args:
          outputs: the model outputs over the global batch (``image``, ``text`` [B, D], ``scale``,
            ...), plus ``outputs['teacher']`` when :attr:`teacher` is set.
          batch: the global batch (e.g. ``example_id`` int32 [B]).
          state: the current state (structure of :meth:`init_state`).
          step: int32 scalar, the number of updates applied so far.

        The loss is differentiated with respect to ``outputs``; ``new_state`` is not (compute it
        from ``jax.lax.stop_gradient`` values). If the step's loss or gradient is not finite, the
        step keeps the old state, as it keeps the old parameters.
        """
        raise NotImplementedError


def is_stateful(objective: Any) -> bool:
    """Whether ``objective`` follows the :class:`StatefulObjective` protocol."""
    return isinstance(objective, StatefulObjective)
