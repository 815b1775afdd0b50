"""Several objectives in one step, each with a weight and a start point (``loss.name='multi'``).

SigLIP 2 (Tschannen et al. 2025, "SigLIP 2: Multilingual Vision-Language Encoders with Improved
Semantic Understanding, Localization, and Dense Features") trains the sigmoid image-text loss
together with a captioning decoder from the start and switches self-distillation and masked
prediction on for the last part of training; CoCa (Yu et al. 2022) sums a contrastive and a
captioning loss. Here every term is any objective of the registry, built from a copy of
``config.loss`` with ``name`` replaced, so each keeps its own options (``config.loss.impl``,
``config.loss.moco``, ...):

``config.loss.multi.terms = (('sigmoid', 1.0, 0.0), ('captioning', 1.0, 0.0))``: ``(name,
weight, start[, end])``; ``start`` in [0, 1) is the fraction of training after which the term is on
and the optional ``end`` in (start, 1] (default 1) the fraction at which it goes off again (while
off, its weight is 0: it is still computed -- one program for the whole run -- but adds nothing
to the loss or the gradient). ``(('hard_negative', 1.0, 0.0, 0.9), ('softmax', 1.0, 0.9))``
hands one objective over to another for the last tenth of the run. The total is
``sum_k weight_k * on_k(step) * loss_k``;
every term's loss is logged as ``loss/<name>`` whether on or not, and its metrics as
``<name>/<metric>``.

Stateful terms (:class:`contrastive_jax.losses.StatefulObjective`) keep their state under their
name in ``loss_state``; at most one term may have a teacher.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from contrastive_jax.losses.stateful import StatefulObjective, is_stateful

Term = tuple[str, float, float, float]  # (name, weight, start fraction, end fraction)


def parse_terms(value: Any) -> tuple[Term, ...]:
    """``config.loss.multi.terms`` -> ``((name, weight, start, end), ...)`` (``end`` 1.0 where a
    term gives three fields); ValueError naming the field for anything else."""
    field = "config.loss.multi.terms"
    terms = []
    for i, t in enumerate(tuple(value or ())):
        if isinstance(t, str) or not hasattr(t, "__len__") or len(t) not in (3, 4):
            raise ValueError(f"{field}[{i}]={t!r} is invalid: each term is "
                             "(name, weight, start_fraction[, end_fraction])")
        name, weight, start, end = (*t, 1.0) if len(t) == 3 else t
        if not isinstance(name, str) or not name:
            raise ValueError(f"{field}[{i}] name {name!r} is invalid: must be an objective name")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{field}[{i}] weight {weight!r} is invalid: must be a number >= 0")
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= float(start) < 1.0:
            raise ValueError(f"{field}[{i}] start {start!r} is invalid: must be a fraction of training in [0, 1)")
        if (isinstance(end, bool) or not isinstance(end, (int, float))
                or not float(start) < float(end) <= 1.0):
            raise ValueError(f"{field}[{i}] end {end!r} is invalid: must be a fraction of training in "
                             f"(start={start}, 1]")
        terms.append((name, float(weight), float(start), float(end)))
    if not terms:
        raise ValueError(f"{field} is empty: config.loss.name='multi' needs at least one (name, weight, start) term")
    names = [t[0] for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"{field} names a term twice: {names}")
    if "multi" in names:
        raise ValueError(f"{field} cannot contain 'multi'")
    return tuple(terms)


class MultiObjective(StatefulObjective):
    """The weighted, scheduled sum of objectives (see the module docstring).

    Stateful even when no term is, because the schedules read the step; its state is a dict
    ``{term name: that term's state}`` over the stateful terms (empty otherwise).

    Args:
      terms: ``((name, weight, start_fraction, end_fraction), ...)`` (:func:`parse_terms`).
      objectives: the built objectives, one per term, in the same order.
      train_steps: the run's length in steps (fractions become steps: ``round(start *
        train_steps)``, likewise ``end``); None is allowed only when every start is 0 and every
        end 1.
    """

    def __init__(self, terms: Sequence[Term], objectives: Sequence[Callable], train_steps: int | None):
        self.terms, self.objectives = tuple(terms), tuple(objectives)
        if train_steps is None and any(start > 0 or end < 1 for _, _, start, end in self.terms):
            raise ValueError("config.loss.multi.terms has a term starting after 0 or ending before 1: the run's "
                             "length in steps is needed (make_objective(..., train_steps=...); the trainer passes it)")
        self.start_steps = tuple(int(round(start * (train_steps or 0))) for _, _, start, _ in self.terms)
        # None: on to the end of the run (whatever its length).
        self.end_steps = tuple(None if end >= 1.0 else int(round(end * train_steps)) for *_, end in self.terms)
        teachers = [name for (name, *_), o in zip(self.terms, self.objectives) if getattr(o, "teacher", False)]
        if len(teachers) > 1:
            raise ValueError(f"config.loss.multi.terms has several terms with a teacher ({teachers}); at most one")
        self._teacher_term = teachers[0] if teachers else None
        self.teacher = self._teacher_term is not None
        self.teacher_method = getattr(self._term(self._teacher_term), "teacher_method", None) if self.teacher else None

    def _term(self, name: str):
        return dict(zip((t[0] for t in self.terms), self.objectives))[name]

    def _stateful(self):
        return [(name, o) for (name, *_), o in zip(self.terms, self.objectives) if is_stateful(o)]

    def init_state(self) -> dict:
        return {name: o.init_state() for name, o in self._stateful()}

    def state_specs(self, batch_axes):
        return {name: o.state_specs(batch_axes) for name, o in self._stateful()}

    def teacher_decay(self, step):
        return self._term(self._teacher_term).teacher_decay(step)

    def __call__(self, outputs, batch, state, step):
        total = jnp.zeros((), jnp.float32)
        metrics, new_state = {}, {}
        for (name, weight, *_), objective, start, end in zip(self.terms, self.objectives, self.start_steps,
                                                               self.end_steps):
            if is_stateful(objective):
                loss, m, new_state[name] = objective(outputs, batch, state[name], step)
            else:
                loss, m = objective(outputs, batch)
            on = jnp.asarray(True)
            if start > 0:
                on = on & (step >= start)
            if end is not None:
                on = on & (step < end)
            # where, not a product: a term that is off cannot turn the total into NaN.
            total = total + jnp.where(on, weight * loss, 0.0)
            metrics[f"loss/{name}"] = jax.lax.stop_gradient(loss)
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
        return total, metrics, new_state


def build(loss_config: Any, mesh, batch_axes, *, make_objective: Callable, train_steps: int | None = None,
          model_config: Any = None) -> MultiObjective:
    """``config.loss`` with ``name='multi'`` -> :class:`MultiObjective`; each term is built by
    ``make_objective`` from a copy of ``config.loss`` with the term's name."""
    terms = parse_terms(loss_config.multi.terms)
    objectives = []
    for name, *_ in terms:
        sub = loss_config.copy_and_resolve_references()
        sub.name = name
        objectives.append(make_objective(sub, mesh, batch_axes, model_config=model_config, train_steps=train_steps))
    return MultiObjective(terms, objectives, train_steps)


def captioning_objective(outputs: dict, batch: dict) -> tuple[jax.Array, dict]:
    """The captioning term (``loss.name='captioning'``): the model's decoder computed each
    example's summed token cross-entropy ``caption_loss`` float32 [B] over its ``caption_tokens``
    float32 [B] target tokens (padding excluded); the loss is the mean over all target tokens of
    the global batch, ``sum(caption_loss) / sum(caption_tokens)``. The logits never leave the
    model (see :func:`contrastive_jax.losses.captioning`), so this term costs O(B).

    Metrics: ``token_accuracy`` (from ``caption_correct`` [B], tokens whose argmax is the target,
    when the model reports it)."""
    for key in ("caption_loss", "caption_tokens"):
        if key not in outputs:
            raise KeyError(f"config.loss.name='captioning' needs outputs[{key!r}] from a captioning model "
                           f"(config.model.name='coca'); have: {', '.join(sorted(outputs))}")
    tokens = jnp.maximum(jnp.sum(outputs["caption_tokens"]), 1.0)
    loss = jnp.sum(outputs["caption_loss"]) / tokens
    metrics = {}
    if "caption_correct" in outputs:
        metrics["token_accuracy"] = jax.lax.stop_gradient(jnp.sum(outputs["caption_correct"]) / tokens)
    return loss, metrics
