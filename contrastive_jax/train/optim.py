"""Optimizer and learning-rate schedule factory (optax), configured by ``config.optim``.

Optimizers: AdamW, LAMB (You et al. 2019), LARS (You et al. 2017), Adafactor (Shazeer & Stern
2018), SGD with momentum, and Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers";
with Liu et al. 2025's update scaling, "Muon is Scalable for LLM Training") on the weight
matrices with AdamW on everything else (:func:`muon_dimension_numbers`).

Schedules (LR per update, all with a linear warmup from 0):
``warmup_cosine``, ``warmup_linear``, ``rsqrt``, ``constant`` and ``wsd`` (warmup-stable-decay, the
"infinite" schedule of continual pre-training: a long flat phase, then a short final decay).

Per-parameter behaviour comes from regex tables over '/'-joined parameter paths (``re.fullmatch``,
e.g. ``image/encoder/block_0/attn/query/kernel``):

- ``optim.freeze``: frozen parameters get no update, NO optimizer state (``optax.multi_transform``
  with ``set_to_zero``) and, in the train step, no gradient computation at all;
- ``optim.no_decay``: excluded from weight decay (norms, biases, the loss's scale/bias, ...);
- ``optim.lr_multipliers``: ``[(regex, multiplier)]``, first match wins, scales the update (and so
  the effective learning rate, weight decay included) of the matching parameters;
- ``optim.freeze_until``: ``((regex, steps), ...)``, first match wins: the matching parameters
  stay exactly unchanged for updates ``0 .. steps-1`` and train normally afterwards (SwAV's
  prototypes during the first epoch, Caron et al. 2020); see :func:`freeze_until`.

Gradient clipping (global norm) is computed over the trainable parameters only.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

from contrastive_jax.parallel.sharding import path_str

SCHEDULES = ("warmup_cosine", "warmup_linear", "rsqrt", "constant", "wsd")
OPTIMIZERS = ("adamw", "lamb", "lars", "adafactor", "sgd", "muon")

TRAINABLE, FROZEN = "trainable", "frozen"


def _warmup_steps(optim_config: Any, warmup_steps: int | None) -> int:
    if warmup_steps is not None:
        return int(warmup_steps)
    value = optim_config.get("warmup_steps", -1)
    return max(int(value), 0) if value is not None else 0


def make_schedule(optim_config: Any, total_steps: int, warmup_steps: int | None = None) -> optax.Schedule:
    """Learning rate (per update) as a function of the step ``t`` (0-based update count).

    All schedules ramp linearly from 0 to ``lr`` over ``w = warmup`` steps, then (``T = total``,
    ``f = end_lr_fraction``):

    - ``warmup_cosine``: ``lr * (f + (1 - f) * (1 + cos(pi * p)) / 2)``, ``p = (t - w) / (T - w)``;
    - ``warmup_linear``: ``lr * (1 - (1 - f) * p)``;
    - ``rsqrt``: ``lr / sqrt(1 + (t - w) / rsqrt_timescale)`` (no end: for open-ended runs);
    - ``constant``: ``lr``;
    - ``wsd``: ``lr`` until ``T - d`` with ``d = round(decay_fraction * T)``, then decays to
      ``f * lr`` at ``T`` with ``decay_shape`` 'linear' (``1 - q``), 'cosine' or 'sqrt'
      (``1 - sqrt(q)``), ``q`` the progress through the decay.

    Args:
      warmup_steps: overrides ``optim_config.warmup_steps`` (the trainer passes the value resolved
        from steps / epochs / examples).
    """
    lr = float(optim_config.lr)
    total = max(int(total_steps), 1)
    warmup = min(_warmup_steps(optim_config, warmup_steps), total - 1) if total > 1 else 0
    f = float(optim_config.get("end_lr_fraction", 0.0))
    name = optim_config.schedule
    if name not in SCHEDULES:
        raise ValueError(f"unknown config.optim.schedule {name!r}; known: {', '.join(SCHEDULES)}")
    timescale = float(optim_config.get("rsqrt_timescale", 10000))
    decay_len = max(int(round(float(optim_config.get("decay_fraction", 0.2)) * total)), 1)
    shape = optim_config.get("decay_shape", "sqrt")
    if name == "wsd" and shape not in ("linear", "cosine", "sqrt"):
        raise ValueError(f"unknown config.optim.decay_shape {shape!r}; known: linear, cosine, sqrt")

    def decay_factor(q):
        if shape == "linear":
            return 1.0 - q
        if shape == "cosine":
            return 0.5 * (1.0 + jnp.cos(jnp.pi * q))
        return 1.0 - jnp.sqrt(q)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        ramp = t / max(warmup, 1) if warmup > 0 else jnp.ones_like(t)
        p = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if name == "warmup_cosine":
            after = f + (1.0 - f) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif name == "warmup_linear":
            after = 1.0 - (1.0 - f) * p
        elif name == "rsqrt":
            after = 1.0 / jnp.sqrt(1.0 + jnp.maximum(t - warmup, 0.0) / timescale)
        elif name == "constant":
            after = jnp.ones_like(t)
        else:  # wsd
            q = jnp.clip((t - (total - decay_len)) / decay_len, 0.0, 1.0)
            after = f + (1.0 - f) * decay_factor(q)
        return lr * jnp.where(t < warmup, ramp, after)

    return schedule


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(p.fullmatch(name) for p in compiled)


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """Pytree of bools: True where weight decay applies (no ``no_decay`` regex matches the path)."""
    excluded = _matcher(no_decay)
    return jax.tree_util.tree_map_with_path(lambda path, _: not excluded(path_str(path)), params)


def trainable_mask(params: Any, freeze: Sequence[str]) -> Any:
    """Pytree of bools: True for parameters that train (no ``freeze`` regex matches the path)."""
    frozen = _matcher(freeze)
    return jax.tree_util.tree_map_with_path(lambda path, _: not frozen(path_str(path)), params)


def first_match_tree(params: Any, rules: Sequence[Sequence[Any]], cast: Any, default: Any) -> Any:
    """Pytree of ``cast(value)`` of the first ``(regex, value)`` rule whose regex fullmatches the
    parameter's ``/``-joined path, else ``default``."""
    compiled = [(re.compile(p), cast(v)) for p, v in rules]

    def one(path, _):
        name = path_str(path)
        return next((v for pattern, v in compiled if pattern.fullmatch(name)), default)

    return jax.tree_util.tree_map_with_path(one, params)


def lr_multiplier_tree(params: Any, rules: Sequence[Sequence[Any]]) -> Any:
    """Pytree of floats: the first matching ``(regex, multiplier)`` rule's multiplier, else 1."""
    return first_match_tree(params, rules, float, 1.0)


def scale_by_multipliers(rules: Sequence[Sequence[Any]]) -> optax.GradientTransformation:
    """Multiplies each parameter's update by its ``lr_multipliers`` value (stateless)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        mults = lr_multiplier_tree(updates, rules)
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, mults), state

    return optax.GradientTransformation(init, update)


# Attention's query/key/value kernels are [..., embed, heads, head_dim]: one matrix from the
# embedding to all heads (every other kernel here is [..., *inputs, output]).
_HEADS_OUT = re.compile(r"(.*/)?(query|key|value)/kernel")


def _is_dims_leaf(x) -> bool:
    """Leaves of a :func:`muon_dimension_numbers` tree."""
    return x is None or isinstance(x, (optax.MaskedNode, optax.contrib.MuonDimensionNumbers))


def muon_dimension_numbers(params: Any, exclude: Sequence[str] = ()) -> Any:
    """Which parameters Muon updates, and as which matrix: a pytree (same structure; masked
    ``optax.MaskedNode`` subtrees kept) of ``optax.contrib.MuonDimensionNumbers`` for Muon's
    parameters and ``None`` for AdamW's.

    Muon's: every ``kernel`` leaf with at least two dims whose '/'-joined path no ``exclude``
    regex fullmatches, i.e. the Dense / DenseGeneral / Conv weights of both towers and the
    projection heads. Its matrix: the output axis is the last one (Conv ``[kh, kw, c_in, c_out]``
    flattens to ``[kh*kw*c_in, c_out]``, attention's output ``[heads, head_dim, embed]`` to
    ``[heads*head_dim, embed]``), except attention's query/key/value kernels ``[embed, heads,
    head_dim]``, whose output is ``heads*head_dim``. A scanned encoder's leaves (under
    ``.../blocks/...``) carry a leading ``[depth]`` axis: each layer is its own matrix. AdamW's:
    embeddings (token, position, class), norms, biases and the loss's scale and bias, which the
    method's authors leave to AdamW.
    """
    excluded = _matcher(exclude)

    def one(path, x):
        if isinstance(x, optax.MaskedNode):
            return x
        name = path_str(path)
        if not name.endswith("kernel") or getattr(x, "ndim", 0) < 2 or excluded(name):
            return None
        axes = list(range(1 if "blocks/" in name else 0, x.ndim))
        if len(axes) < 2:
            return None
        split = 1 if _HEADS_OUT.fullmatch(name) and len(axes) == 3 else len(axes) - 1
        return optax.contrib.MuonDimensionNumbers(tuple(axes[:split]), tuple(axes[split:]))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _scale_to_adam_rms(dims: Callable[[Any], Any], rms: float) -> optax.GradientTransformation:
    """Scales each orthogonalized ``[A, B]`` update by ``rms * sqrt(max(A, B))``: its RMS is then
    ``rms``, about AdamW's, so AdamW's learning rate and weight decay carry over (Liu et al. 2025,
    "Muon is Scalable for LLM Training", sec. 2.2). Stateless."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params

        def one(u, d):
            if isinstance(u, optax.MaskedNode):  # AdamW's parameter, in the other partition
                return u
            # muon_dimension_numbers writes both axis groups as tuples.
            fan_in = int(np.prod([u.shape[a] for a in d.reduction_axis]))
            fan_out = int(np.prod([u.shape[a] for a in d.output_axis]))
            return u * jnp.asarray(rms * max(fan_in, fan_out) ** 0.5, u.dtype)

        return jax.tree.map(one, updates, dims(updates), is_leaf=_is_dims_leaf), state

    return optax.GradientTransformation(init, update)


def _muon(optim_config: Any, schedule: optax.Schedule, mask: Callable[[Any], Any], mu_dtype: Any,
          adamw: optax.GradientTransformation) -> optax.GradientTransformation:
    """Muon on :func:`muon_dimension_numbers`' matrices, ``adamw`` (the run's AdamW: same LR
    schedule, betas, weight decay and mask) on the rest; the two halves keep separate state
    (``optax.partition``)."""
    exclude = tuple(optim_config.get("muon_exclude", ()))

    def dims(tree):
        return muon_dimension_numbers(tree, exclude)

    def labels(params):
        return jax.tree.map(lambda d: "adamw" if d is None else "muon", dims(params), is_leaf=_is_dims_leaf)

    wd = float(optim_config.weight_decay)
    muon = optax.chain(
        optax.contrib.scale_by_muon(ns_steps=int(optim_config.get("muon_ns_steps", 5)),
                                    beta=float(optim_config.get("muon_beta", 0.95)), mu_dtype=mu_dtype,
                                    nesterov=bool(optim_config.get("muon_nesterov", True)),
                                    weight_dimension_numbers=dims),
        _scale_to_adam_rms(dims, float(optim_config.get("muon_rms", 0.2))),
        optax.add_decayed_weights(wd, mask),
        optax.scale_by_learning_rate(schedule),
    )
    return optax.partition({"muon": muon, "adamw": adamw}, labels)


def _base_optimizer(optim_config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    name = optim_config.name
    wd = float(optim_config.weight_decay)
    no_decay = tuple(optim_config.no_decay)

    def mask(p):
        return decay_mask(p, no_decay)

    # helper G (issue 19, mixed precision): optional bf16 first moment, as big_vision's
    # momentum dtype; the second moment stays float32 (its range needs it).
    mu_dtype = jnp.bfloat16 if optim_config.get("mu_dtype", "float32") == "bfloat16" else None
    if name in ("adamw", "muon"):
        adamw = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                            weight_decay=wd, mask=mask, mu_dtype=mu_dtype)
        return adamw if name == "adamw" else _muon(optim_config, schedule, mask, mu_dtype, adamw)
    if name == "lamb":
        return optax.lamb(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                          weight_decay=wd, mask=mask)
    if name == "lars":
        # The trust ratio is skipped for the same params that skip decay (biases, norms), as in
        # the LARS paper's practice for BN/bias parameters.
        return optax.lars(schedule, weight_decay=wd, weight_decay_mask=mask, trust_ratio_mask=mask,
                          trust_coefficient=float(optim_config.get("lars_trust_coefficient", 0.001)),
                          momentum=float(optim_config.momentum), nesterov=bool(optim_config.nesterov))
    if name == "adafactor":
        return optax.adafactor(schedule, factored=bool(optim_config.get("adafactor_factored", True)),
                               multiply_by_parameter_scale=False, clipping_threshold=None,
                               weight_decay_rate=wd or None, weight_decay_mask=mask)
    if name == "sgd":
        # Coupled L2 decay (added to the gradient before momentum), the usual SGD convention.
        parts = [optax.add_decayed_weights(wd, mask)] if wd else []
        momentum = float(optim_config.momentum)
        parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=bool(optim_config.nesterov)))
        return optax.chain(*parts)
    raise ValueError(f"unknown config.optim.name {name!r}; known: {', '.join(OPTIMIZERS)}")


class FreezeUntilState(NamedTuple):
    """State of :func:`freeze_until`: ``count`` int32 scalar (updates so far) and the inner state."""

    count: jax.Array
    inner: Any


def freeze_until_steps(params: Any, rules: Sequence[Sequence[Any]]) -> Any:
    """Pytree of ints: the first matching ``(regex, steps)`` rule's ``steps``, else 0."""
    return first_match_tree(params, rules, int, 0)


def freeze_until(inner: optax.GradientTransformation, rules: Sequence[Sequence[Any]]) -> optax.GradientTransformation:
    """``inner`` with the parameters matching ``rules`` = ``((regex, steps), ...)`` held fixed for
    their first ``steps`` updates (a temporary ``optim.freeze``).

    While a parameter is held, its gradient and its value enter ``inner`` as zero (so it adds
    nothing to the clipping norm, and neither it nor its weight decay to momentum or moments),
    and its final update is zero: the parameter is bitwise unchanged. Afterwards it trains as any other. The
    inner optimizer keeps one step count for all parameters, so an Adam-type optimizer's bias
    correction is already warm when a held parameter is released (its moments start from zero
    then, and its first updates are correspondingly small; SGD / LARS are unaffected).

    Args:
      inner: the optimizer of all parameters.
      rules: ``[(regex over '/'-joined parameter paths, steps >= 0)]``, first match wins.

    Returns:
      A transformation whose state is :class:`FreezeUntilState`; the count advances once per
      ``update`` (the train step's update count: a skipped non-finite step keeps the old state).
    """
    rules = tuple((str(p), int(n)) for p, n in rules)

    def init(params):
        return FreezeUntilState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        held = jax.tree.map(lambda n: state.count < n, freeze_until_steps(updates, rules))
        zero = lambda h, u: jnp.where(h, jnp.zeros_like(u), u)  # noqa: E731
        updates = jax.tree.map(zero, held, updates)
        # Held params enter as zeros too: an optimizer that folds weight decay into its gradient
        # (SGD's coupled L2, LARS) would otherwise build momentum from wd * p while they are held.
        inner_params = None if params is None else jax.tree.map(zero, held, params)
        updates, inner_state = inner.update(updates, state.inner, inner_params)
        updates = jax.tree.map(zero, held, updates)
        return updates, FreezeUntilState(state.count + 1, inner_state)

    return optax.GradientTransformation(init, update)


def freeze_until_rules(optim_config: Any) -> tuple[tuple[str, int], ...]:
    """The checked ``optim.freeze_until`` rules (ValueError naming the field, one line)."""
    value = optim_config.get("freeze_until", ())
    bad = (f"config.optim.freeze_until={value!r} is invalid: must be a list of (regex, steps) pairs, steps an "
           "integer >= 0, e.g. [('prototypes', 5000)]")
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(bad)
    rules = []
    for rule in value:
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(bad)
        pattern, steps = rule
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(bad)
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"config.optim.freeze_until={value!r} is invalid: {pattern!r} is not a regex ({e})") \
                from None
        rules.append((pattern, steps))
    return tuple(rules)


class Optimizer(NamedTuple):
    """``(tx, schedule)``: the gradient transformation and its learning-rate schedule (step ->
    LR, logged as ``lr``); unpacks like the tuple it is."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule


def make_optimizer(optim_config: Any, total_steps: int, warmup_steps: int | None = None) -> Optimizer:
    """Returns ``Optimizer(tx, schedule)``.

    ``tx`` = (clip by global norm -> optimizer -> LR multipliers) on the trainable parameters,
    ``set_to_zero`` (no state) on the ``optim.freeze`` ones, all inside :func:`freeze_until`
    when ``optim.freeze_until`` holds a rule with steps > 0. See the module docstring.
    """
    schedule = make_schedule(optim_config, total_steps, warmup_steps)
    parts = []
    if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    parts.append(_base_optimizer(optim_config, schedule))
    multipliers = [tuple(r) for r in optim_config.get("lr_multipliers", [])]
    if multipliers:
        parts.append(scale_by_multipliers(multipliers))
    tx = optax.chain(*parts)
    freeze = tuple(optim_config.get("freeze", ()))
    if freeze:
        def labels(params):
            return jax.tree.map(lambda t: TRAINABLE if t else FROZEN, trainable_mask(params, freeze))

        tx = optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
    held = freeze_until_rules(optim_config)
    if any(steps > 0 for _, steps in held):
        tx = freeze_until(tx, held)
    return Optimizer(tx, schedule)

