"""SwAV: swapped prediction of online cluster assignments (Caron et al. 2020, "Unsupervised
Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020).

The model (``model.name='multiview'`` with ``model.prototypes = K``) embeds every view, L2-normalizes
the embedding and scores it against ``K`` L2-normalized learnable prototypes: cosines
``image_views_scores`` ``[B, V, K]`` for the ``V`` global crops and ``image_local_views_scores``
``[B, N, K]`` for the ``N`` local crops (multi-crop, ``config.data.local_views``). This objective

1. turns each global view's scores into soft codes with Sinkhorn-Knopp (:func:`sinkhorn_knopp`,
   no gradient) over the WHOLE global batch -- optionally together with a queue of past batches'
   scores -- so that every prototype receives an equal share of the batch (the equipartition
   constraint that prevents the collapse to one cluster);
2. predicts the codes of global view ``v`` from every other view ``t`` (global or local) with
   ``softmax(scores_t / temperature)``: the loss is the cross-entropy averaged over the pairs,
   ``L = 1/V * sum_v 1/(T-1) * sum_{t != v} mean_b H(q_{b,v}, p_{b,t})`` with ``T = V + N``.

The prototypes stay fixed during the first steps (the paper: the first epoch) through the
optimizer's general ``config.optim.freeze_until = ((r'prototypes', steps),)``.

Sharding: the inputs are global ``jax.Array``s; the sums of Sinkhorn-Knopp over the batch axis are
written on the global arrays, so under ``jit`` XLA inserts the all-reduces over the batch axes
(collectives, no gather of the scores to one device). The queue lives in ``TrainState.loss_state``,
split over the batch axes along its rows.

Deviation from the paper's code (documented, deliberate): the paper's queue stores embeddings and
re-scores them with the current prototypes at every step; here the queue stores the scores
computed when the batch was enqueued, because the objective never sees the ``[K, D]`` prototype
matrix (model outputs are per-example rows for GradCache). With a queue of a few batches and
prototypes moving slowly, the two differ little; set ``queue_length = 0`` for the exact
queue-free method.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses.stateful import StatefulObjective


def sinkhorn_knopp(scores: jax.Array, epsilon: float = 0.05, iterations: int = 3) -> jax.Array:
    """Soft, equipartitioned cluster assignments of ``N`` examples to ``K`` prototypes.

    Sinkhorn-Knopp on ``Q = exp(scores / epsilon)`` (Caron et al. 2020, section 3.1 and
    Algorithm 1; Cuturi 2013): ``Q`` is scaled to total mass 1, then ``iterations`` times its
    columns (one per prototype) are scaled to sum ``1/K`` and its rows (one per example) to sum
    ``1/N``. The result is multiplied by ``N`` so each row is a probability vector over the
    prototypes.

    Args:
      scores: ``[N, K]`` float (any float dtype; computed in float32): prototype scores (cosines)
        of the global batch. A global ``jax.Array``: the column sums are all-reduced by XLA.
      epsilon: entropic regularization (> 0); smaller gives sharper codes (paper: 0.05).
      iterations: number of column + row normalization rounds (paper: 3).

    Returns:
      ``[N, K]`` float32 codes: every row sums to 1 (exactly, up to rounding: the row scaling is
      the last step); the column sums approach ``N / K`` as ``iterations`` grows. Not
      differentiated through (wrap the caller's use in ``stop_gradient``).
    """
    s = jnp.asarray(scores, jnp.float32) / jnp.float32(epsilon)
    n, k = s.shape
    # exp(s - max) instead of exp(s): identical after the first normalization, and finite
    # for any epsilon (exp(1 / 0.01) would overflow float32).
    q = jnp.exp(s - jnp.max(s))
    q = q / jnp.sum(q)
    for _ in range(int(iterations)):
        q = q / (jnp.sum(q, axis=0, keepdims=True) * k)  # each prototype: total mass 1/K
        q = q / (jnp.sum(q, axis=1, keepdims=True) * n)  # each example: total mass 1/N
    return q * n


def swapped_prediction_loss(codes: jax.Array, scores: jax.Array, temperature: float) -> jax.Array:
    """SwAV's swapped-prediction cross-entropy (Caron et al. 2020, eq. 1 with multi-crop, eq. 4).

    Args:
      codes: ``[B, V, K]`` float32 targets of the ``V`` code views (rows sum to 1; no gradient
        flows into them here only if the caller stops it).
      scores: ``[B, T, K]`` prototype scores of all ``T >= 2`` views, the first ``V`` of which
        are the code views (view ``v`` never predicts its own code).
      temperature: softmax temperature of the predictions (> 0; paper: 0.1).

    Returns:
      float32 scalar ``1/V sum_v 1/(T-1) sum_{t != v} -1/B sum_b sum_k q_bvk log p_btk`` with
      ``p_bt = softmax(scores_bt / temperature)``.
    """
    b, v, _ = codes.shape
    t = scores.shape[1]
    logp = jax.nn.log_softmax(jnp.asarray(scores, jnp.float32) / jnp.float32(temperature), axis=-1)
    # ce[v, t]: the batch-mean cross-entropy of code view v against prediction view t.
    ce = -jnp.einsum("bvk,btk->vt", codes.astype(jnp.float32), logp) / b
    others = 1.0 - jax.nn.one_hot(jnp.arange(v), t, dtype=jnp.float32)  # drop t == v
    return jnp.sum(ce * others) / (v * (t - 1))


def _positive_number(s, field: str) -> float:
    value = s[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"config.loss.swav.{field}={value!r} is invalid: must be a number > 0")
    return float(value)


def _int_at_least(s, field: str, low: int) -> int:
    value = s[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"config.loss.swav.{field}={value!r} is invalid: must be an integer >= {low}")
    return int(value)


class SwAV(StatefulObjective):
    """The SwAV objective (see the module docstring); built from ``config.loss.swav`` by :func:`build`.

    State (``TrainState.loss_state``): ``queue`` float32 ``[queue_views, queue_length, K]`` (the
    global views' scores of past batches, newest first; rows split over the batch axes) and
    ``filled`` int32 scalar (rows of the queue holding real scores, at most ``queue_length``).
    Without a queue (``queue_length = 0``) the state is ``filled`` alone (always 0).

    Queue schedule (the paper's ``epoch_queue_starts``): from update ``queue_start_steps`` on,
    each step pushes its global views' scores into the queue (after using it); the queue joins
    the Sinkhorn-Knopp input once it is full, as in the paper (a half-filled queue would be mostly
    zeros).

    Metrics: ``swav_queue_used`` (1.0 when the queue entered the codes), ``swav_code_max`` (mean
    largest code of a row: 1/K for uniform codes, 1 for hard ones).
    """

    def __init__(self, *, temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 scores_key: str = "image_views_scores", local_scores_key: str = "image_local_views_scores",
                 queue_length: int = 0, queue_start_steps: int = 0, queue_views: int = 2, prototypes: int = 0):
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.iterations = int(sinkhorn_iterations)
        self.scores_key = str(scores_key)
        self.local_scores_key = str(local_scores_key)
        self.queue_length = int(queue_length)
        self.queue_start_steps = int(queue_start_steps)
        self.queue_views = int(queue_views)
        self.prototypes = int(prototypes)

    def init_state(self) -> dict:
        if not self.queue_length:
            return {"filled": jnp.zeros((), jnp.int32)}
        return {"queue": jnp.zeros((self.queue_views, self.queue_length, self.prototypes), jnp.float32),
                "filled": jnp.zeros((), jnp.int32)}

    def state_specs(self, batch_axes: tuple[str, ...] | None) -> dict:
        if not self.queue_length:
            return {"filled": P()}
        return {"queue": P(None, tuple(batch_axes) if batch_axes else None, None), "filled": P()}

    def codes(self, scores: jax.Array, state: dict) -> tuple[jax.Array, jax.Array]:
        """``(codes [B, V, K] float32, queue_used float32 scalar)`` of the global views' scores
        ``[B, V, K]`` (stop-gradient), with the queue's rows joining each view's Sinkhorn input
        once the queue is full."""
        g = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
        b = g.shape[0]
        per_view = [sinkhorn_knopp(g[:, v], self.epsilon, self.iterations) for v in range(g.shape[1])]
        plain = jnp.stack(per_view, axis=1)
        if not self.queue_length:
            return plain, jnp.float32(0.0)
        queue = jax.lax.stop_gradient(state["queue"])
        # Queue rows come first, as in the paper; the codes of this batch are the last B rows.
        with_queue = jnp.stack([sinkhorn_knopp(jnp.concatenate([queue[v], g[:, v]], axis=0), self.epsilon,
                                               self.iterations)[-b:] for v in range(g.shape[1])], axis=1)
        used = state["filled"] >= self.queue_length
        return jnp.where(used, with_queue, plain), used.astype(jnp.float32)

    def _check(self, g: jax.Array) -> None:
        b, v, k = g.shape
        if v < 1:
            raise ValueError(f"config.loss.swav.scores_key={self.scores_key!r} is invalid: the output has no views "
                             f"(shape {g.shape})")
        if not self.queue_length:
            return
        if (v, k) != (self.queue_views, self.prototypes):
            raise ValueError(f"config.loss.swav.queue_views={self.queue_views} / prototypes={self.prototypes} are "
                             f"invalid: the model's {self.scores_key} has {v} views and {k} prototypes")
        if self.queue_length < b:
            raise ValueError(f"config.loss.swav.queue_length={self.queue_length} is invalid: must be >= the global "
                             f"batch size {b}")

    def __call__(self, outputs: dict, batch: dict, state: dict, step: jax.Array) -> tuple[jax.Array, dict, dict]:
        """``(loss, metrics, new_state)``; ``outputs[scores_key]`` ``[B, V, K]`` (global views)
        and, when present, ``outputs[local_scores_key]`` ``[B, N, K]`` (local crops)."""
        del batch
        if self.scores_key not in outputs:
            raise KeyError(f"config.loss.name='swav' needs outputs[{self.scores_key!r}] (config.loss.swav.scores_key; "
                           f"set config.model.prototypes > 0); have: {', '.join(sorted(outputs))}")
        g = outputs[self.scores_key]
        self._check(g)
        views = [g]
        if self.local_scores_key and self.local_scores_key in outputs:
            views.append(outputs[self.local_scores_key])
        scores = jnp.concatenate([jnp.asarray(x, jnp.float32) for x in views], axis=1)
        if scores.shape[1] < 2:
            raise ValueError(f"config.loss.name='swav' needs >= 2 views to swap predictions; got {scores.shape[1]} "
                             "(config.data.num_views + config.data.local_views)")
        codes, used = self.codes(g, state)
        loss = swapped_prediction_loss(jax.lax.stop_gradient(codes), scores, self.temperature)
        metrics = {"swav_queue_used": used, "swav_code_max": jnp.mean(jnp.max(codes, axis=-1))}
        return loss, metrics, self._push(g, state, step)

    def _push(self, g: jax.Array, state: dict, step: jax.Array) -> dict:
        if not self.queue_length:
            return state
        b = g.shape[0]
        new_rows = jnp.swapaxes(jax.lax.stop_gradient(jnp.asarray(g, jnp.float32)), 0, 1)  # [V, B, K]
        shifted = jnp.concatenate([new_rows, state["queue"][:, :self.queue_length - b]], axis=1)  # FIFO, newest first
        on = jnp.asarray(step) >= self.queue_start_steps
        return {"queue": jnp.where(on, shifted, state["queue"]),
                "filled": jnp.where(on, jnp.minimum(state["filled"] + b, self.queue_length), state["filled"])}


def options(swav_config: Any, mesh: Any = None, batch_axes: Sequence[str] | None = None) -> dict:
    """The checked ``config.loss.swav`` fields as :class:`SwAV` keywords (ValueError naming the
    field, one line)."""
    s = swav_config
    opts = dict(temperature=_positive_number(s, "temperature"), epsilon=_positive_number(s, "epsilon"),
                sinkhorn_iterations=_int_at_least(s, "sinkhorn_iterations", 1),
                queue_length=_int_at_least(s, "queue_length", 0),
                queue_start_steps=_int_at_least(s, "queue_start_steps", 0),
                queue_views=_int_at_least(s, "queue_views", 1), prototypes=_int_at_least(s, "prototypes", 0))
    for field in ("scores_key", "local_scores_key"):
        if not isinstance(s[field], str) or (field == "scores_key" and not s[field]):
            raise ValueError(f"config.loss.swav.{field}={s[field]!r} is invalid: must be a model output name")
        opts[field] = s[field]
    if opts["queue_length"] and opts["prototypes"] < 1:
        raise ValueError(f"config.loss.swav.prototypes={s.prototypes!r} is invalid: the queue (queue_length="
                         f"{opts['queue_length']}) needs the number of prototypes K (= config.model.prototypes)")
    if opts["queue_length"] and mesh is not None and batch_axes:
        dp = math.prod(mesh.shape[a] for a in batch_axes)
        if opts["queue_length"] % dp:
            raise ValueError(f"config.loss.swav.queue_length={opts['queue_length']} is invalid: must be a multiple of "
                             f"the data-parallel size {dp} (its rows are split over the batch axes)")
    return opts


def build(loss_config: Any, mesh: Any = None, batch_axes: Sequence[str] | None = None) -> SwAV:
    """``config.loss`` -> :class:`SwAV` (the registry's ``OBJECTIVES['swav']``)."""
    return SwAV(**options(loss_config.swav, mesh, batch_axes))
