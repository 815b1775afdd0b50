"""Self-distillation (local-global consistency) and masked-patch prediction against an EMA teacher.

``config.loss.name = 'self_distillation'`` builds :class:`SelfDistillation`, a
:class:`contrastive_jax.losses.StatefulObjective` with ``teacher = True``: the train step keeps the
teacher as the EMA of all model parameters (``TrainState.ema_params``; no gradient, no optimizer
state), runs the model method :attr:`SelfDistillation.teacher_method` (``'distill_teacher'`` of
:class:`contrastive_jax.models.coca.CoCa`) with them, and hands its outputs to the objective as
``outputs['teacher']``. It is the late-training term of SigLIP 2 (Tschannen et al. 2025, "SigLIP
2: Multilingual Vision-Language Encoders with Improved Semantic Understanding, Localization, and
Dense Features"), which takes local-global consistency from SILC (Naeem et al. 2023, "SILC:
Improving Vision Language Pretraining with Self-Distillation") and masked prediction from TIPS
(Maninis et al. 2024, "TIPS: Text-Image Pretraining with Spatial Awareness"); both losses are
DINO's (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers") and, for
patches, iBOT's (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer"). Use
it alone or as a term of ``loss.name='multi'`` (SigLIP 2 switches it on at 80% of training).

The loss. With teacher logits ``t`` [K], a centre ``c`` [K], temperatures ``tau_t`` (teacher) and
``tau_s`` (student), the target is the centred, sharpened teacher distribution ``p = softmax((t
- c) / tau_t)`` (a constant) and the student's distribution ``q = softmax(s / tau_s)``; the
per-pair loss is the cross-entropy ``H(p, q) = -sum_k p_k log q_k`` (nats).

- Global (local-global consistency): the teacher's logits of the global view ``distill_global``
  [B, K] against the student's logits of each local crop ``distill_local`` [B, N, K]:
  ``L_g = mean_{b, n} H(p_b, q_{b, n})``.
- Patch (masked prediction): the teacher's logits of every patch of the unmasked global view
  ``distill_patches`` [B, T, K] against the student's logits of the same patch in its masked
  pass ``distill_patches`` [B, T, K], at the masked patches only (``distill_mask`` [B, T], 1 =
  masked): ``L_p = sum_{b, t} m_bt H(p_bt, q_bt) / sum_{b, t} m_bt``. With the model's fixed
  number of masked patches per example this is iBOT's per-example mean, averaged.

Total: ``global_weight * L_g + patch_weight * L_p``. Each part has its own centre and teacher
temperature. Centring (subtracting a running mean of the teacher's logits) and sharpening (a low
teacher temperature) together keep the teacher from collapsing to one output (DINO, section 3.1).

Centre update (state, after the loss, from the teacher's logits of the global batch):
``c_g <- m c_g + (1 - m) mean_b t_b`` and ``c_p <- m c_p + (1 - m) mean_{b, t} t_bt`` (all
patches, as iBOT), ``m = center_momentum``; the loss of a step uses the centres before it.

Teacher EMA decay (``teacher_decay``): 0 before ``teacher_start_steps`` (the teacher is a copy of
the student, so it starts as the student when the term switches on, as in SigLIP 2), then
``momentum`` (``'constant'``: SILC keeps it fixed) or cosine from ``momentum`` to 1 at
``momentum_steps`` (``'cosine'``: DINO).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses.stateful import StatefulObjective

F32 = jnp.float32
SCHEDULES = ("constant", "cosine")


def teacher_targets(teacher_logits: jax.Array, center: jax.Array, temperature: float) -> jax.Array:
    """``softmax((t - c) / temperature)`` over the last axis: float32 ``[..., K]`` from teacher
    logits ``[..., K]`` and a centre ``[K]``; a constant (stop-gradient)."""
    t = lax.stop_gradient(teacher_logits).astype(F32) - lax.stop_gradient(center).astype(F32)
    return jax.nn.softmax(t / temperature, axis=-1)


def cross_entropy(targets: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
    """``-sum_k p_k log softmax(s / temperature)_k`` over the last axis: float32 ``[...]`` (nats)
    from targets ``p [..., K]`` and student logits ``s [..., K]`` (differentiable in ``s``)."""
    logq = jax.nn.log_softmax(student_logits.astype(F32) / temperature, axis=-1)
    return -jnp.sum(targets * logq, axis=-1)


def entropy(p: jax.Array) -> jax.Array:
    """Mean entropy (nats) of the distributions ``p [..., K]``: log K for uniform, 0 for one-hot
    (a collapse monitor for the teacher's targets)."""
    return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def decay_at(step, *, base: float, schedule: str = "constant", start: int = 0, total_steps: int = 0) -> jax.Array:
    """Teacher EMA decay after update ``step`` (int scalar) -> float32 scalar: 0 before
    ``start``; then ``base`` (``'constant'``) or ``1 - (1 - base) (1 + cos(pi u)) / 2`` with ``u =
    min(step - start, T) / T``, ``T = total_steps - start`` (``'cosine'``: ``base`` at ``start``,
    1 from ``total_steps`` on)."""
    step = jnp.asarray(step, F32)
    if schedule == "constant":
        d = jnp.asarray(base, F32)
    else:
        span = float(max(total_steps - start, 1))
        u = jnp.clip(step - start, 0.0, span) / span
        d = 1.0 - (1.0 - base) * 0.5 * (1.0 + jnp.cos(math.pi * u))
    return jnp.where(step < start, 0.0, d).astype(F32)


class SelfDistillation(StatefulObjective):
    """The self-distillation + masked-prediction objective (module docstring); built by :func:`build`.

    State (replicated): ``center_global`` and ``center_patch``, float32 [K].

    Metrics: ``loss_global``, ``loss_patch`` (the two parts, unweighted; a part with weight 0 is
    not computed and not logged), ``teacher_entropy_global`` / ``teacher_entropy_patch`` (mean
    entropy of the targets, nats: near 0 = collapse to one-hot, near log K = uniform),
    ``mask_fraction`` (fraction of patches masked) and ``momentum`` (this step's teacher decay).
    """

    teacher = True
    teacher_method = "distill_teacher"

    def __init__(self, *, dim: int, student_temperature: float = 0.1, teacher_temperature: float = 0.04,
                 patch_teacher_temperature: float = 0.04, center_momentum: float = 0.9, global_weight: float = 1.0,
                 patch_weight: float = 1.0, momentum: float = 0.996, momentum_schedule: str = "constant",
                 momentum_steps: int = 0, teacher_start_steps: int = 0):
        self.K = int(dim)
        self.tau_s, self.tau_g, self.tau_p = float(student_temperature), float(teacher_temperature), \
            float(patch_teacher_temperature)
        self.center_momentum = float(center_momentum)
        self.global_weight, self.patch_weight = float(global_weight), float(patch_weight)
        self.momentum, self.schedule = float(momentum), momentum_schedule
        self.momentum_steps, self.start = int(momentum_steps), int(teacher_start_steps)

    def init_state(self):
        return {"center_global": jnp.zeros((self.K,), F32), "center_patch": jnp.zeros((self.K,), F32)}

    def state_specs(self, batch_axes):
        return {"center_global": P(), "center_patch": P()}

    def teacher_decay(self, step):
        return decay_at(step, base=self.momentum, schedule=self.schedule, start=self.start,
                        total_steps=self.momentum_steps)

    def _get(self, d: dict, key: str, where: str) -> jax.Array:
        if key not in d:
            raise KeyError(f"config.loss.name='self_distillation' needs {where}[{key!r}] (model.name='coca' with "
                           f"model.self_distill.dim > 0{' and model.multicrop=True' if 'global' in key or 'local' in key else ''}); "
                           f"have: {', '.join(sorted(d))}")
        x = d[key]
        if x.shape[-1] != self.K:
            raise ValueError(f"config.loss.self_distill.dim={self.K} is invalid: {where}[{key!r}] has K={x.shape[-1]} "
                             "(set it to config.model.self_distill.dim)")
        return x

    def __call__(self, outputs, batch, state, step):
        teacher = outputs.get("teacher")
        if teacher is None:
            raise KeyError("config.loss.name='self_distillation' needs the teacher's outputs in outputs['teacher'] "
                           "(the train step provides them for objectives with teacher=True)")
        m = self.center_momentum
        total, metrics, new_state = jnp.zeros((), F32), {}, dict(state)
        if self.global_weight > 0:
            s = self._get(outputs, "distill_local", "outputs")  # [B, N, K]
            t = lax.stop_gradient(self._get(teacher, "distill_global", "outputs['teacher']")).astype(F32)  # [B, K]
            p = teacher_targets(t, state["center_global"], self.tau_g)
            loss = jnp.mean(cross_entropy(p[:, None, :], s, self.tau_s))
            total = total + self.global_weight * loss
            metrics.update(loss_global=loss, teacher_entropy_global=entropy(p))
            new_state["center_global"] = m * state["center_global"] + (1.0 - m) * jnp.mean(t, axis=0)
        if self.patch_weight > 0:
            s = self._get(outputs, "distill_patches", "outputs")  # [B, T, K]
            t = lax.stop_gradient(self._get(teacher, "distill_patches", "outputs['teacher']")).astype(F32)
            if s.shape != t.shape:
                raise ValueError(f"self_distillation: student patch logits {s.shape} and teacher's {t.shape} differ "
                                 "(model.image.patch_dropout must be 0)")
            mask = lax.stop_gradient(outputs["distill_mask"]).astype(F32)  # [B, T]
            p = teacher_targets(t, state["center_patch"], self.tau_p)
            loss = jnp.sum(mask * cross_entropy(p, s, self.tau_s)) / jnp.maximum(jnp.sum(mask), 1.0)
            total = total + self.patch_weight * loss
            metrics.update(loss_patch=loss, teacher_entropy_patch=entropy(p), mask_fraction=jnp.mean(mask))
            new_state["center_patch"] = m * state["center_patch"] + (1.0 - m) * jnp.mean(t, axis=(0, 1))
        metrics = {k: lax.stop_gradient(v) for k, v in metrics.items()}
        metrics["momentum"] = self.teacher_decay(step)
        return total, metrics, jax.tree.map(lax.stop_gradient, new_state)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.loss.self_distill.{field}={value!r} is invalid: {why}")


def _number(g, field: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    v = g.get(field)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (lo < v if lo_open else lo <= v) \
        and (v < hi if hi_open else v <= hi)
    if not ok:
        raise _bad(field, v, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
    return float(v)


def _int(g, field: str, lo: int) -> int:
    v = g.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(field, v, f"must be an integer >= {lo}")
    return v


def build(loss_config, mesh=None, batch_axes=None) -> SelfDistillation:
    """The :class:`SelfDistillation` of ``config.loss.self_distill`` (see
    :func:`contrastive_jax.losses.config.self_distill_defaults`). The loss is elementwise over
    the global batch plus means, so ``mesh`` / ``batch_axes`` are not needed (``jit`` shards
    it). Raises ValueError naming the first invalid field."""
    del mesh, batch_axes
    if "self_distill" not in loss_config:
        raise ValueError("config.loss.self_distill is missing (contrastive_jax.losses.config.self_distill_defaults)")
    g = loss_config.self_distill
    dim = _int(g, "dim", 0)
    if dim < 1:
        raise _bad("dim", dim, "must be >= 1: set it to config.model.self_distill.dim (the heads' K)")
    kw = dict(dim=dim)
    for field in ("student_temperature", "teacher_temperature", "patch_teacher_temperature"):
        kw[field] = _number(g, field, 0.0, math.inf, lo_open=True, hi_open=True)
    kw["center_momentum"] = _number(g, "center_momentum", 0.0, 1.0)
    kw["global_weight"] = _number(g, "global_weight", 0.0, math.inf, hi_open=True)
    kw["patch_weight"] = _number(g, "patch_weight", 0.0, math.inf, hi_open=True)
    if kw["global_weight"] == 0 and kw["patch_weight"] == 0:
        raise _bad("patch_weight", 0.0, "global_weight and patch_weight are both 0 (nothing to train)")
    kw["momentum"] = _number(g, "momentum", 0.0, 1.0)
    schedule = g.get("momentum_schedule")
    if schedule not in SCHEDULES:
        raise _bad("momentum_schedule", schedule, f"must be one of {', '.join(SCHEDULES)}")
    kw["momentum_schedule"] = schedule
    kw["teacher_start_steps"] = _int(g, "teacher_start_steps", 0)
    kw["momentum_steps"] = _int(g, "momentum_steps", 0)
    if schedule == "cosine" and kw["momentum_steps"] <= kw["teacher_start_steps"]:
        raise _bad("momentum_steps", kw["momentum_steps"], "must be > teacher_start_steps with momentum_schedule="
                                                           "'cosine' (the step at which the decay reaches 1)")
    return SelfDistillation(**kw)
