"""The jitted, pure training step: ``train_step(state, batch) -> (state, metrics)``.

The contrastive loss is taken over the GLOBAL batch: the towers run on batch-sharded inputs and
the loss sees global ``[B, D]`` embeddings (the chosen implementation decides how the other
side's embeddings travel between devices).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax import losses
from contrastive_jax.parallel.mesh import batch_axes_of, batch_sharding
from contrastive_jax.train.state import TrainState


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_config: Any,
    mesh: Mesh,
    batch_axes: Sequence[str],
    state_shardings: TrainState,
    *,
    donate: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds the jitted step.

    Args:
      batch_axes: mesh axes the batch dim is split over.
      state_shardings: from :func:`contrastive_jax.train.state.create_train_state`.
      donate: donate the input state's buffers (halves peak memory; the caller must not reuse
        the state it passed in).

    Returns:
      ``train_step(state, batch)`` where ``batch`` has ``image`` float32 [B, H, W, 3] and
      ``text`` int32 [B, L] global arrays. Metrics are float32 scalars: ``loss``, ``scale``,
      ``bias``, ``grad_norm``, ``lr`` and the loss's in-batch metrics.
    """
    loss_of = losses.make_objective(loss_config, mesh, batch_axes_of(mesh, batch_axes))

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def objective(params):
            out = model.apply({"params": params}, batch["image"], batch["text"], train=True)
            loss, loss_metrics = loss_of(out, batch)
            return loss, (out, loss_metrics)

        (loss, (out, loss_metrics)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "scale": out["scale"],
            "bias": out["bias"],
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            **{k: v for k, v in loss_metrics.items()},
        }
        metrics = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), metrics)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    data_sh = batch_sharding(mesh, batch_axes)
    return jax.jit(
        step,
        in_shardings=(state_shardings, data_sh),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,) if donate else (),
    )
