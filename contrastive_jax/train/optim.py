"""Optimizer and learning-rate schedule factory (optax), configured by ``config.optim``.

Weight-decay exclusion is a tuple of regexes over '/'-joined parameter paths (``config.optim.
no_decay``): norms, biases and the loss's learnable scale/bias are not decayed, as in CLIP.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

from contrastive_jax.parallel.sharding import path_str


def make_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
    """Learning rate (units: per update) as a function of the step.

    ``warmup_cosine``: linear warmup from 0 over ``warmup_steps``, then cosine decay to
    ``lr * end_lr_fraction`` at ``total_steps``. ``constant``: linear warmup, then flat.
    """
    lr = float(optim_config.lr)
    warmup = int(min(optim_config.warmup_steps, max(total_steps - 1, 0)))
    name = optim_config.schedule
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=lr * float(optim_config.end_lr_fraction),
        )
    if name == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
        )
    raise ValueError(f"unknown config.optim.schedule {name!r}; known: warmup_cosine, constant")


def decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
    """Pytree of bools: True where weight decay applies (no ``no_decay`` regex matches the path)."""
    patterns = [re.compile(p) for p in no_decay]

    def one(path, _):
        name = path_str(path)
        return not any(p.fullmatch(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(optim_config: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """Returns ``(tx, schedule)``: optax transformation (clipping + optimizer) and its LR schedule."""
    schedule = make_schedule(optim_config, total_steps)
    name = optim_config.name
    if name == "adamw":
        opt = optax.adamw(
            learning_rate=schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=lambda p: decay_mask(p, tuple(optim_config.no_decay)),
        )
    else:
        raise ValueError(f"unknown config.optim.name {name!r}; known: adamw")
    parts = []
    if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    parts.append(opt)
    return optax.chain(*parts), schedule
