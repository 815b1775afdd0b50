"""The jitted, pure training step: ``train_step(state, batch) -> (state, metrics)``.

The contrastive loss is taken over the GLOBAL batch: the towers run on batch-sharded inputs and
the objective sees global ``[B, D]`` embeddings (the loss implementation decides how the other
side's embeddings travel between devices). With ``microbatch_size`` the batch is processed in
pieces (see :mod:`contrastive_jax.train.gradcache`) and the gradient is still that of the loss over
the whole batch.

Frozen parameters (``config.optim.freeze``) are not differentiated at all: the gradient is taken
with respect to the trainable subtree only, the frozen one enters as a constant, so XLA emits no
backward computation for a frozen tower (LiT). A step whose loss or gradient is not finite is not
applied (parameters, optimizer state and EMA keep their values); the loop decides whether that
stops the run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.data.transforms import normalize_images
from contrastive_jax.parallel.logical import uses_logical_rules, with_activation_rules
from contrastive_jax.parallel.mesh import batch_sharding
from contrastive_jax.losses.stateful import is_stateful
from contrastive_jax.train.gradcache import global_outputs, take_microbatch, value_and_grad_fn
from contrastive_jax.train.optim import trainable_mask
from contrastive_jax.train.state import TrainState

DEFAULT_MODALITIES = ("image", "text")


def model_modalities(model: nn.Module) -> tuple[str, ...]:
    """The batch keys a model consumes, in call order (``model.modalities``; CLIP: image, text)."""
    return tuple(getattr(model, "modalities", DEFAULT_MODALITIES))


def _split(params: Any, mask: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)`` trees: same structure, None where the other one holds the leaf."""
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return trainable, frozen


def _merge(mask: Any, trainable: Any, frozen: Any) -> Any:
    return jax.tree.map(lambda m, t, f: t if m else f, mask, trainable, frozen, is_leaf=lambda x: x is None)


def tower_grad_norms(grads: Any) -> dict[str, jax.Array]:
    """Global L2 norm of the gradient of each top-level parameter group (tower, head, scale)."""
    if not isinstance(grads, dict):
        return {}
    out = {}
    for name, sub in grads.items():
        leaves = [g for g in jax.tree.leaves(sub) if g is not None]
        if leaves:
            out[f"grad_norm/{name}"] = optax.tree.norm(leaves)
    return out


def _guarded_update(tx: optax.GradientTransformation, state: TrainState, grads: Any, mask: Any,
                    finite: jax.Array, ema_decay: float | jax.Array) -> tuple[Any, Any, Any]:
    """``(params, opt_state, ema_params)`` after the update, or unchanged where not ``finite``.

    ``grads``: the trainable subtree's gradient (None at frozen leaves, which keep their bits).
    """
    # The optimizer sees a full-structure gradient; frozen leaves get zeros it ignores
    # (set_to_zero), so no gradient is ever computed for them.
    full_grads = _merge(mask, grads, jax.tree.map(lambda m, p: None if m else jnp.zeros_like(p), mask, state.params))
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    stepped = optax.apply_updates(state.params, updates)
    # Frozen leaves keep their exact bits (p + 0.0 would turn -0.0 into 0.0).
    stepped = jax.tree.map(lambda m, new, old: new if m else old, mask, stepped, state.params)

    def keep_if_bad(new, old):
        return jax.tree.map(lambda a, c: jnp.where(finite, a, c), new, old)

    params = keep_if_bad(stepped, state.params)
    opt_state = keep_if_bad(opt_state, state.opt_state)
    ema = state.ema_params
    if ema is not None:
        d = jnp.asarray(ema_decay, jnp.float32)
        ema = keep_if_bad(jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params), ema)
    return params, opt_state, ema


_LOSS_STATE = "_loss_state"


def _closed_objective(objective: Any, state: TrainState, apply_fn: Callable, inputs: list, rng: jax.Array, n: int,
                      ema_decay: Any) -> tuple[Callable, Any]:
    """A stateful objective as the ``(outputs, batch) -> (loss, metrics)`` function that the
    gradient drivers differentiate, and the EMA decay for this step. The teacher's outputs (run
    here, before the student) and the state enter as constants; the new state rides out in the
    metrics under ``_loss_state`` (popped by the step)."""
    teacher_out = None
    if objective.teacher:
        teacher_apply = functools.partial(apply_fn, method=getattr(objective, "teacher_method", None))
        teacher_out = _teacher_outputs(teacher_apply, state.ema_params, inputs, jax.random.fold_in(rng, 1 << 20), n)
        ema_decay = objective.teacher_decay(state.step)

    def fn(out, batch):
        if teacher_out is not None:
            out = dict(out, teacher=teacher_out)
        loss, metrics, new_state = objective(out, batch, state.loss_state, state.step)
        return loss, dict(metrics, **{_LOSS_STATE: jax.lax.stop_gradient(new_state)})

    return fn, ema_decay


def _pop_loss_state(metrics: dict, old: Any, finite: jax.Array) -> tuple[dict, Any]:
    """``(metrics without the new state, the state to keep)``: the objective's new state, or the
    old one where the step was not finite (like the parameters)."""
    if _LOSS_STATE not in metrics:
        return metrics, old
    metrics = dict(metrics)
    new = metrics.pop(_LOSS_STATE)
    return metrics, jax.tree.map(lambda a, c: jnp.where(finite, a, c), new, old)


def _teacher_outputs(apply_fn: Callable, teacher_params: Any, inputs: list, key: jax.Array, n: int) -> dict:
    """The teacher's outputs on the global batch: its forward pass micro-batch by micro-batch
    like GradCache's first pass, so no teacher activation outlives its micro-batch; nothing here
    is differentiated."""
    teacher_params = jax.lax.stop_gradient(teacher_params)
    if n <= 1:
        return jax.lax.stop_gradient(apply_fn(teacher_params, inputs, key))

    def one(carry, i):
        chunk = [take_microbatch(x, i, n) for x in inputs]
        return carry, apply_fn(teacher_params, chunk, jax.random.fold_in(key, i))

    _, stacked = jax.lax.scan(one, None, jnp.arange(n))
    return jax.lax.stop_gradient(global_outputs(stacked))


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the step does besides forward, loss and update; all from the run config.

    Attributes:
      freeze: ``config.optim.freeze`` regexes (must match the optimizer's, which holds no state
        for them); frozen parameters get no gradient at all.
      microbatch_size: ``config.train.microbatch_size``: global micro-batch size (0: the whole
        batch at once); must divide the batch.
      accumulation: ``config.train.accumulation``: ``'gradcache'`` (exact whole-batch gradient)
        or ``'average'``.
      ema_decay: ``config.optim.ema_decay``: EMA of the parameters kept in ``state.ema_params``
        (0: none).
      image_mean, image_std: ``config.data.mean/std``: uint8 image inputs (``data.
        normalize_on_device``) are normalized inside the step, one micro-batch at a time, so the
        float32 batch never exists whole (:func:`contrastive_jax.data.transforms.normalize_images`).
    """

    freeze: tuple[str, ...] = ()
    microbatch_size: int = 0
    accumulation: str = "gradcache"
    ema_decay: float = 0.0
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, config: Any) -> "StepOptions":
        return cls(freeze=tuple(config.optim.freeze), microbatch_size=int(config.train.microbatch_size),
                   accumulation=str(config.train.accumulation), ema_decay=float(config.optim.ema_decay),
                   image_mean=tuple(float(m) for m in config.data.mean),
                   image_std=tuple(float(s) for s in config.data.std))


def _check_stateful(objective: Any, options: StepOptions) -> bool:
    """Whether ``objective`` is stateful; ValueError for options it cannot run with."""
    if not is_stateful(objective):
        return False
    if objective.teacher and options.ema_decay:
        raise ValueError("config.optim.ema_decay must be 0 with an objective that has a teacher: the teacher "
                         "(momentum encoder) is kept in the EMA slot with the objective's own decay")
    if options.microbatch_size and options.accumulation != "gradcache":
        raise ValueError(f"config.train.accumulation={options.accumulation!r} cannot run a stateful objective: its "
                         "state is updated once from the whole batch; use 'gradcache'")
    return True


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the step's inputs and outputs live.

    Attributes:
      mesh: the device mesh.
      batch_axes: mesh axes the batch dim is split over.
      state: NamedShardings of the :class:`TrainState` (from
        :func:`contrastive_jax.train.state.abstract_train_state`).
      sharding_config: ``config.sharding``: when it sets ``logical_rules`` they constrain the
        towers' activations while the step is traced (None: no constraints).
    """

    mesh: Mesh
    batch_axes: tuple[str, ...]
    state: TrainState
    sharding_config: Any = None


def make_train_step(
    model: nn.Module,
    optimizer: tuple[optax.GradientTransformation, optax.Schedule],
    objective: Callable[[dict, dict], tuple[jax.Array, dict]],
    placement: Placement,
    options: StepOptions = StepOptions(),
    *,
    donate: bool = True,
    jit: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds the (jitted) step. Runs use :func:`contrastive_jax.train.build_training`, which
    builds every argument from the config; this is the piece to compose by hand.

    Args:
      model: the unbound flax model (``model.modalities`` names its inputs).
      optimizer: ``(tx, schedule)`` from :func:`contrastive_jax.train.make_optimizer`.
      objective: ``objective(outputs, batch) -> (loss, metrics)`` from
        :func:`contrastive_jax.losses.make_objective`.
      placement: mesh, batch axes and state shardings.
      options: freezing, micro-batching, EMA and on-device normalization.
      donate: donate the input state's buffers (halves peak memory; the caller must not reuse
        the state it passed in).
      jit: return the jitted function (False: the pure Python step, for composition).

    Returns:
      ``train_step(state, batch)`` where ``batch`` holds the model's inputs (``model.modalities``,
      e.g. ``image`` float32 [B, H, W, 3] (or uint8, normalized in the step) and ``text`` int32
      [B, L]) as global arrays, plus any fields the objective reads. Metrics (float32 scalars):
      ``loss``, ``scale``, ``bias``, ``grad_norm`` (trainable params, before clipping),
      ``grad_norm/<group>`` per top-level parameter group, ``lr``, ``finite`` (1: update
      applied, 0: skipped), ``nonfinite_steps`` (total so far) and the objective's own metrics
      (e.g. in-batch ``i2t_top1``).
    """
    tx, schedule = optimizer
    mesh, batch_axes = placement.mesh, placement.batch_axes
    freeze, microbatch_size, accumulation = options.freeze, options.microbatch_size, options.accumulation
    modalities, stateful = model_modalities(model), _check_stateful(objective, options)

    def to_float(x):
        # Float inputs come normalized from the host pipeline; uint8 ones are normalized here.
        return normalize_images(x, options.image_mean, options.image_std) if x.dtype == jnp.uint8 else x

    def apply_fn(params, inputs, rng, method=None):
        return model.apply({"params": params}, *[to_float(x) for x in inputs], train=True, rngs={"dropout": rng},
                           method=method)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        missing = [k for k in modalities if k not in batch]
        if missing:
            raise KeyError(f"batch lacks model inputs {missing}; it has {sorted(batch)}")
        inputs = [batch[k] for k in modalities]
        b = inputs[0].shape[0]
        n = max(b // microbatch_size, 1) if microbatch_size else 1
        mask = trainable_mask(state.params, tuple(freeze))
        trainable, frozen = _split(state.params, mask)
        rng = jax.random.fold_in(jnp.asarray(state.rng), state.step)

        def apply_trainable(t, x, key):
            return apply_fn(_merge(mask, t, frozen), x, key)

        step_objective, ema_decay = objective, options.ema_decay
        if stateful:  # teacher forward, state in; the new state comes back in the metrics
            step_objective, ema_decay = _closed_objective(objective, state, apply_fn, inputs, rng, n, ema_decay)
        vg = value_and_grad_fn(accumulation, n)
        (loss, loss_metrics, out), grads = vg(
            apply_trainable, step_objective, trainable, inputs, batch,
            num_microbatches=n, rng=rng,
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state, ema = _guarded_update(tx, state, grads, mask, finite, ema_decay)
        loss_metrics, loss_state = _pop_loss_state(loss_metrics, state.loss_state, finite)
        nonfinite = state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
        metrics = {
            "loss": loss,
            "scale": out["scale"],
            "bias": out["bias"],
            "grad_norm": grad_norm,
            **tower_grad_norms(grads),
            "lr": schedule(state.step),
            "finite": finite,
            "nonfinite_steps": nonfinite,
            **loss_metrics,
        }
        metrics = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), metrics)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                                  nonfinite_steps=nonfinite, loss_state=loss_state)
        return new_state, metrics

    if placement.sharding_config is not None and uses_logical_rules(placement.sharding_config):
        step = with_activation_rules(step, placement.sharding_config, mesh)
    if not jit:
        return step
    return jax.jit(
        step,
        in_shardings=(placement.state, batch_sharding(mesh, batch_axes)),
        out_shardings=(placement.state, NamedSharding(mesh, P())),
        donate_argnums=(0,) if donate else (),
    )

