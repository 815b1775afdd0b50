"""iSogCLR: global contrastive learning with one learned temperature per example.

Qiu, Hu, Yuan, Zhou, Zhang & Yang 2023, "Not All Semantics are Created Equal: Contrastive
Self-supervised Learning with Automatic Temperature Individualization" (ICML), built on SogCLR
(Yuan et al. 2022, "Provable Stochastic Optimization for Global Contrastive Learning: Small Batch
Does Not Harm Performance", ICML), in its bimodal (image-text) form.

Every image anchor ``i`` (and, symmetrically, every text anchor) has a robust, KL-constrained DRO
loss over *all* negatives of the training set, whose dual is

    F_i(w, tau_i) = tau_i * log g_i(w, tau_i) + tau_i * rho,
    g_i(w, tau) = mean_{j != i} exp((s(x_i, t_j) - s(x_i, t_i)) / tau),

with the temperature ``tau_i`` its own optimization variable. The mean over the whole data set is
not available in a mini-batch, so SogCLR keeps a per-example moving average ``u_i`` of the batch
estimates of ``g_i``; the gradient with respect to the embeddings then uses ``1 / u_i`` instead of
``1 / g_i`` (a bias that vanishes as the model moves slowly), which is what makes small batches
work. ``tau_i`` descends its own stochastic gradient ``dF_i / dtau_i`` with a momentum estimator
and is projected to ``[tau_min, tau_max]``. See :class:`ISogCLR` for the exact update.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses.stateful import StatefulObjective

_SIDES = ("image", "text")
_FIELDS = ("tau", "log_u", "m")


def _field(cfg: Any, name: str, ok, why: str, cast=float):
    """``cfg[name]`` cast by ``cast``, or a one-line ValueError naming ``config.loss.isogclr.<name>``."""
    value = cfg.get(name, None)
    bad = value is None or isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or not ok(cast(value)):
        raise ValueError(f"config.loss.isogclr.{name}={value!r} is invalid: {why}")
    return cast(value)


def _side_update(d: jax.Array, tau: jax.Array, log_u: jax.Array, m: jax.Array, *, gamma: float, rho: float,
                 tau_lr: float, tau_beta: float, tau_grad_clip: float, tau_min: float, tau_max: float):
    """One side's (anchors = rows) surrogate loss and state update.

    Args:
      d: float32 [B, B], ``d[i, j] = s(anchor i, candidate j) - s(anchor i, its positive)``
        (differentiable; the diagonal is 0).
      tau, log_u, m: float32 [B], the anchors' temperatures, log moving averages (``-inf``: the
        example was never seen) and tau-gradient momenta, as read from the state.

    Returns:
      ``(surrogate [B], (tau_new, log_u_new, m_new) [B] each, objective [B])``; ``surrogate``'s
      gradient is the algorithm's gradient for the embeddings, ``objective`` the batch estimate
      ``tau * (log g + rho)`` of the robust loss (no gradient).
    """
    b = d.shape[0]
    neg = ~jnp.eye(b, dtype=bool)
    dz = jax.lax.stop_gradient(d) / tau[:, None]
    # Log domain throughout: dz reaches (2 / tau_min) = 400, far past float32's exp range; the
    # official code shifts by a running max instead, which is the same arithmetic.
    dz_neg = jnp.where(neg, dz, -jnp.inf)
    top = jnp.max(dz_neg, axis=1)
    # One exp pass serves both g and the weights w (the dense step's cost is its B x B passes).
    e = jnp.exp(dz_neg - top[:, None])
    log_g = top + jnp.log(jnp.sum(e, axis=1)) - math.log(b - 1)
    first = jnp.isneginf(log_u)
    # First visit: u = g (the official code's first epoch); afterwards the SogCLR moving average
    # u <- (1 - gamma) u + gamma g. gamma == 1 makes log(1 - gamma) = -inf, which logaddexp absorbs.
    log_keep = math.log1p(-gamma) if gamma < 1 else -math.inf
    averaged = jnp.logaddexp(log_keep + jnp.where(first, 0.0, log_u), math.log(gamma) + log_g)
    log_u_new = jnp.where(first, log_g, averaged)
    # w[i, j] = exp(dz_ij) / (u_i (B - 1)): dF_i/dw = sum_j w_ij d(d_ij)/dw, the 1/u_i replacing 1/g_i.
    w = e * (jnp.exp(top - log_u_new) / (b - 1))[:, None]
    surrogate = jnp.sum(w * d, axis=1)
    # dF_i/dtau_i = log u_i + rho - sum_j w_ij dz_ij (tau * d/dtau of log g, with g -> u).
    grad_tau = log_u_new + rho - jnp.sum(w * jnp.where(neg, dz, 0.0), axis=1)
    m_new = (1.0 - tau_beta) * m + tau_beta * jnp.clip(grad_tau, -tau_grad_clip, tau_grad_clip)
    tau_new = jnp.clip(tau - tau_lr * m_new, tau_min, tau_max)
    objective = tau * (log_g + rho)
    return surrogate, (tau_new, log_u_new, m_new), objective


class ISogCLR(StatefulObjective):
    """iSogCLR (Qiu et al. 2023) for image-text pairs, as a :class:`StatefulObjective`.

    State (a dict ``{"image": {...}, "text": {...}}``, each leaf float32 ``[N_pad]`` split over the
    batch axes, indexed by the batch's ``example_id``; ``N_pad`` = ``num_examples`` rounded up to a
    multiple of the number of batch shards, the padding never used):

    * ``tau``: the example's temperature when it is the anchor (init ``tau_init``);
    * ``log_u``: log of the moving average ``u`` of ``g`` (init ``-inf`` = never seen);
    * ``m``: the momentum of the temperature's gradient (init 0).

    One step over a global batch of ``B`` pairs with ids ``k_1..k_B`` (the official bimodal code,
    ``SogCLR_DRO_Loss``, with the paper's negatives-only ``g``), for each side, anchor ``i``,
    ``d_ij = s_ij - s_ii`` (image side: ``s_ij = <x_i, t_j>``; text side: ``s_ij = <t_i, x_j>``),
    ``tau_i``, ``u_i``, ``m_i`` the stored values of ``k_i``:

    1. ``g_i = 1/(B-1) sum_{j != i} exp(d_ij / tau_i)``;
    2. ``u_i <- g_i`` on the example's first visit, else ``(1 - gamma) u_i + gamma g_i``;
    3. embedding gradient from the surrogate ``L = sum_sides mean_i sum_{j != i} w_ij d_ij`` with
       ``w_ij = stop_gradient(exp(d_ij / tau_i) / (u_i (B-1)))`` (the returned loss);
    4. ``G_i = log u_i + rho - sum_{j != i} w_ij d_ij / tau_i`` (``dF_i/dtau_i`` with ``g -> u``);
       ``m_i <- (1 - beta) m_i + beta clip(G_i, +-grad_clip)``;
       ``tau_i <- clip(tau_i - tau_lr m_i, tau_min, tau_max)`` (the paper's momentum update).

    The step uses the temperatures as stored (the update takes effect at the example's next
    visit). An id repeated within one batch is updated by its last occurrence; ids outside
    ``[0, num_examples)`` read the initial values, are not written and are counted in the
    ``ids_out_of_range`` metric. The model's learned ``scale`` (and ``bias``) are not used: the
    temperatures replace them (they get zero gradient from this loss).

    Metrics (float32 scalars): ``tau_image`` / ``tau_text`` (mean temperature used this step),
    ``robust_image`` / ``robust_text`` (batch mean of ``tau (log g + rho)``, the DRO objective
    estimated from the batch alone), ``ids_out_of_range``.

    Implementation: the ``B x B`` similarity matrix is formed (``impl='dense'`` only); state rows
    are gathered and scattered by id under ``jit``, XLA placing the collectives.
    """

    def __init__(self, num_examples: int, *, gamma: float = 0.8, rho: float = 8.0, tau_init: float = 0.01,
                 tau_min: float = 0.005, tau_max: float = 1.0, tau_lr: float = 0.03, tau_beta: float = 0.9,
                 tau_grad_clip: float = 5.0, num_shards: int = 1):
        self.num_examples = int(num_examples)
        self.size = -(-self.num_examples // num_shards) * num_shards
        self.tau_init = float(tau_init)
        self.hyper = dict(gamma=float(gamma), rho=float(rho), tau_lr=float(tau_lr), tau_beta=float(tau_beta),
                          tau_grad_clip=float(tau_grad_clip), tau_min=float(tau_min), tau_max=float(tau_max))

    def init_state(self) -> dict:
        n = self.size
        side = lambda: {"tau": jnp.full((n,), self.tau_init, jnp.float32),
                        "log_u": jnp.full((n,), -jnp.inf, jnp.float32), "m": jnp.zeros((n,), jnp.float32)}
        return {s: side() for s in _SIDES}

    def state_specs(self, batch_axes: tuple[str, ...] | None) -> dict:
        spec = P(tuple(batch_axes)) if batch_axes else P()
        return {s: {f: spec for f in _FIELDS} for s in _SIDES}

    def __call__(self, outputs: dict, batch: dict, state: dict, step: jax.Array) -> tuple[jax.Array, dict, dict]:
        """``(loss, metrics, new_state)``; ``outputs['image'|'text']`` float32 [B, D] unit-norm,
        ``batch['example_id']`` int [B] (global index in the training split)."""
        if "example_id" not in batch:
            raise KeyError("config.loss.name='isogclr' needs batch['example_id'] (the example's index in the "
                           f"training split); this batch has: {', '.join(sorted(batch))}")
        x = outputs["image"].astype(jnp.float32)
        y = outputs["text"].astype(jnp.float32)
        b = x.shape[0]
        if b < 2:
            raise ValueError(f"config.loss.name='isogclr' needs a global batch of >= 2 pairs; got {b}")
        ids = jnp.asarray(batch["example_id"]).astype(jnp.int32).reshape(b)
        valid = (ids >= 0) & (ids < self.num_examples)
        # A stable sort puts an id's occurrences in batch order: the last of each run is the last one.
        order = jnp.argsort(ids, stable=True)
        ranked = ids[order]
        last_sorted = jnp.append(ranked[1:] != ranked[:-1], True)
        repeated_later = jnp.zeros((b,), bool).at[order].set(~last_sorted)
        # Out-of-bounds scatter indices are dropped: that skips invalid ids and all but the last
        # occurrence of a repeated id (deterministic whatever the sharding).
        write_at = jnp.where(valid & ~repeated_later, ids, self.size)
        read_at = jnp.where(valid, ids, 0)

        sim = x @ y.T
        diag = jnp.diagonal(sim)
        diffs = {"image": sim - diag[:, None], "text": sim.T - diag[:, None]}
        loss, metrics, new_state = 0.0, {}, {}
        for s in _SIDES:
            old = {f: jnp.where(valid, state[s][f][read_at], init)
                   for f, init in (("tau", self.tau_init), ("log_u", -jnp.inf), ("m", 0.0))}
            surrogate, (tau, log_u, m), robust = _side_update(diffs[s], old["tau"], old["log_u"], old["m"],
                                                              **self.hyper)
            loss = loss + jnp.mean(surrogate)
            new_state[s] = {f: state[s][f].at[write_at].set(jax.lax.stop_gradient(v), mode="drop")
                            for f, v in (("tau", tau), ("log_u", log_u), ("m", m))}
            metrics[f"tau_{s}"] = jnp.mean(old["tau"])
            metrics[f"robust_{s}"] = jax.lax.stop_gradient(jnp.mean(robust))
        metrics["ids_out_of_range"] = jnp.sum(~valid).astype(jnp.float32)
        return loss, metrics, new_state


def _num_shards(mesh: Mesh | None, batch_axes: Sequence[str] | None) -> int:
    if mesh is None or not batch_axes:
        return 1
    return int(math.prod(mesh.shape[a] for a in batch_axes))


def build(loss_config: Any, mesh: Mesh | None, batch_axes: Sequence[str] | None) -> ISogCLR:
    """The :class:`ISogCLR` objective of ``config.loss`` (fields under ``config.loss.isogclr``; see
    :mod:`contrastive_jax.losses.config`). Raises ValueError naming an invalid field."""
    impl = str(loss_config.get("impl", "dense"))
    if impl != "dense":
        raise ValueError(f"config.loss.impl={impl!r} is not supported by config.loss.name='isogclr': it forms the "
                         "B x B similarities (impl='dense')")
    c = loss_config.isogclr
    n = c.get("num_examples", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"config.loss.isogclr.num_examples={n!r} is invalid: set it to at least the training "
                         "split's size (the number of distinct batch['example_id'] values, e.g. data.num_train)")
    tau_min = _field(c, "tau_min", lambda v: v > 0, "must be > 0")
    tau_max = _field(c, "tau_max", lambda v: v >= tau_min, f"must be >= tau_min={tau_min}")
    return ISogCLR(
        n,
        gamma=_field(c, "gamma", lambda v: 0 < v <= 1, "must be in (0, 1]"),
        rho=_field(c, "rho", lambda v: v >= 0, "must be >= 0"),
        tau_init=_field(c, "tau_init", lambda v: tau_min <= v <= tau_max,
                        f"must be in [tau_min, tau_max] = [{tau_min}, {tau_max}]"),
        tau_min=tau_min, tau_max=tau_max,
        tau_lr=_field(c, "tau_lr", lambda v: v >= 0, "must be >= 0"),
        tau_beta=_field(c, "tau_beta", lambda v: 0 < v <= 1, "must be in (0, 1]"),
        tau_grad_clip=_field(c, "tau_grad_clip", lambda v: v > 0, "must be > 0"),
        num_shards=_num_shards(mesh, batch_axes),
    )
