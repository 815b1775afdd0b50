"""Every duration of a run, converted to steps in one place.

A duration may be given in steps, epochs or examples (``train.total_steps | total_epochs |
total_examples``; likewise warmup, log, eval and checkpoint intervals). At most one unit may be set
per duration (a negative value means "not set"); the run length must be set. Conversion:

    steps = epochs * train_examples / batch_size        (rounded to the nearest step, at least 1)
    steps = examples / batch_size                       (rounded up: never fewer examples than asked)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Durations:
    """Step counts of a run (``0`` = never, for intervals).

    Attributes:
      total: optimizer updates in the whole run.
      warmup: learning-rate warmup length.
      log_every, eval_every, checkpoint_every: intervals in steps.
      steps_per_epoch: ``train_examples / batch_size`` (float; 0 when the split size is unknown).
    """

    total: int
    warmup: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    steps_per_epoch: float


def _to_steps(group: Any, prefix: str, *, where: str, batch_size: int, steps_per_epoch: float,
              default: int | None) -> int | None:
    """The one of ``{prefix}_steps | _epochs | _examples`` that is set, in steps."""
    names = [f"{prefix}_{unit}" for unit in ("steps", "epochs", "examples")]
    present = [n for n in names if n in group]
    given = {n: group[n] for n in present if group[n] is not None and group[n] >= 0}
    if len(given) > 1:
        raise ValueError(f"set only one of {', '.join(f'config.{where}.{n}' for n in present)}; "
                         f"got {', '.join(f'{n}={v}' for n, v in given.items())}")
    if not given:
        return default
    (name, value), = given.items()
    if name.endswith("_steps"):
        return int(value)
    if name.endswith("_examples"):
        return int(math.ceil(int(value) / batch_size))
    if steps_per_epoch <= 0:
        raise ValueError(f"config.{where}.{name} needs the training split's size, which is unknown")
    return max(int(round(float(value) * steps_per_epoch)), 1 if value > 0 else 0)


def resolve_durations(config: Any, train_examples: int | None) -> Durations:
    """Converts every duration of ``config`` to steps.

    Args:
      config: the run config (reads ``train``, ``optim``, ``eval``, ``checkpoint``).
      train_examples: examples in the training split (for ``*_epochs``); None if unknown.

    Raises:
      ValueError: two units set for one duration, no run length, or epochs without a known split
        size — naming the fields.
    """
    batch = int(config.train.batch_size)
    spe = float(train_examples) / batch if train_examples else 0.0
    kw = dict(batch_size=batch, steps_per_epoch=spe)
    total = _to_steps(config.train, "total", where="train", default=None, **kw)
    if total is None or total <= 0:
        raise ValueError("set the run length: one of config.train.total_steps, total_epochs or "
                         f"total_examples (got {total})")
    return Durations(
        total=total,
        warmup=_to_steps(config.optim, "warmup", where="optim", default=0, **kw),
        log_every=_to_steps(config.train, "log_every", where="train", default=50, **kw),
        eval_every=max(_to_steps(config.eval, "every", where="eval", default=0, **kw), 0),
        checkpoint_every=_to_steps(config.checkpoint, "every", where="checkpoint", default=1000, **kw),
        steps_per_epoch=spe,
    )
