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
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.data.transforms import normalize_images
from contrastive_jax.parallel.logical import uses_logical_rules, with_activation_rules
from contrastive_jax.parallel.mesh import batch_sharding
from contrastive_jax.train.gradcache import value_and_grad_fn
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
                    finite: jax.Array, ema_decay: float) -> tuple[Any, Any, Any]:
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
        d = jnp.float32(ema_decay)
        ema = keep_if_bad(jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params), ema)
    return params, opt_state, ema


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
    modalities = model_modalities(model)
    data_sh = batch_sharding(mesh, batch_axes)

    def to_float(x):
        # Float inputs come normalized from the host pipeline; uint8 ones are normalized here.
        return normalize_images(x, options.image_mean, options.image_std) if x.dtype == jnp.uint8 else x

    def apply_fn(params, inputs, rng):
        return model.apply({"params": params}, *[to_float(x) for x in inputs], train=True, rngs={"dropout": rng})

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

        vg = value_and_grad_fn(accumulation, n)
        (loss, loss_metrics, out), grads = vg(
            apply_trainable, objective, trainable, inputs, batch,
            num_microbatches=n, rng=rng,
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state, ema = _guarded_update(tx, state, grads, mask, finite, options.ema_decay)
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
                                  nonfinite_steps=nonfinite)
        return new_state, metrics

    if placement.sharding_config is not None and uses_logical_rules(placement.sharding_config):
        step = with_activation_rules(step, placement.sharding_config, mesh)
    if not jit:
        return step
    return jax.jit(
        step,
        in_shardings=(placement.state, data_sh),
        out_shardings=(placement.state, NamedSharding(mesh, P())),
        donate_argnums=(0,) if donate else (),
    )

