"""Gradients of a whole-batch contrastive loss, computed micro-batch by micro-batch.

``gradcache``: Gao, Zhang, Han & Callan, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (RepL4NLP 2021). A contrastive loss couples every example with every other one, so
the gradient of the loss over a batch of B is NOT the mean of the gradients of losses over B/n-sized
pieces. GradCache computes the exact full-batch gradient in three passes:

1. forward every micro-batch WITHOUT keeping activations, collecting the embeddings (and the
   learnable scale/bias);
2. evaluate the loss on the concatenated global-batch embeddings and differentiate it with respect
   to the embeddings only (cheap: ``[B, D]`` cotangents);
3. re-run each micro-batch's forward pass under ``jax.vjp`` and pull its slice of the embedding
   cotangents back to the parameters, summing over micro-batches.

Peak activation memory is that of ONE micro-batch (plus ``[B, D]`` embeddings); the result equals
the full-batch gradient up to float rounding. The price is one extra forward pass.

``average``: plain gradient accumulation, the mean over micro-batches of each micro-batch's own
loss gradient. For a contrastive loss this CHANGES the objective (each micro-batch only sees its
own negatives); it is exact for per-example (non-contrastive) objectives.

Micro-batch ``i`` holds global rows ``{j * n + i}`` (a strided split), so with the batch sharded in
contiguous blocks over devices every device holds ``mb / dp`` rows of every micro-batch: the split
needs no communication and every micro-batch uses every device.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

ApplyFn = Callable[[Any, Sequence[jax.Array], jax.Array], dict]
Objective = Callable[[dict, dict], tuple[jax.Array, dict]]

ACCUMULATIONS = ("gradcache", "average")


def take_microbatch(x: jax.Array, i: jax.Array, n: int) -> jax.Array:
    """Micro-batch ``i`` of ``n`` of ``x`` ``[B, ...]``: rows ``i, i + n, ...`` as ``[B / n, ...]``.

    Reads the rows in place (the reshape is free), so the batch is never copied into a
    micro-batch-major layout; with contiguous-block sharding of B the rows are device-local.
    """
    b = x.shape[0]
    return jax.lax.dynamic_index_in_dim(x.reshape((b // n, n) + x.shape[1:]), i, axis=1, keepdims=False)


def merge_microbatches(y: jax.Array) -> jax.Array:
    """Micro-batch results stacked ``[n, mb, ...]`` (row ``i`` from :func:`take_microbatch` with
    index ``i``) -> ``[n * mb, ...]`` in global row order."""
    n, mb = y.shape[:2]
    return jnp.swapaxes(y, 0, 1).reshape((n * mb,) + y.shape[2:])


def _is_per_example(leaf: jax.Array) -> bool:
    # Stacked over micro-batches: per-example outputs are [n, mb, ...], global ones (scale,
    # bias) are [n].
    return leaf.ndim >= 2


def global_outputs(stacked: dict) -> dict:
    """Outputs stacked over micro-batches -> whole-batch outputs (global scalars from the first)."""
    return jax.tree.map(lambda y: merge_microbatches(y) if _is_per_example(y) else y[0], stacked)


def gradcache_value_and_grad(
    apply_fn: ApplyFn,
    objective: Objective,
    params: Any,
    inputs: Sequence[jax.Array],
    batch: dict,
    *,
    num_microbatches: int,
    rng: jax.Array,
) -> tuple[tuple[jax.Array, dict, dict], Any]:
    """Exact whole-batch ``((loss, metrics, outputs), grads)`` in ``num_microbatches`` pieces.

    Args:
      apply_fn: ``(params, inputs, rng) -> outputs``: per-example outputs ``[b, ...]`` (the
        embeddings) and global scalars (``scale``, ``bias``); must be deterministic given ``rng``
        (it is called twice per micro-batch with the same key).
      objective: ``(outputs, batch) -> (loss, metrics)`` on the WHOLE batch.
      params: the pytree differentiated (trainable parameters).
      inputs: model inputs, each ``[B, ...]``, B divisible by ``num_microbatches``.
      batch: the global batch dict handed to the objective.
      rng: base key; micro-batch ``i`` uses ``fold_in(rng, i)``.

    Returns:
      ``((loss, metrics, outputs), grads)`` with ``outputs`` the global-batch outputs.
    """
    n = int(num_microbatches)
    index = jnp.arange(n)

    def forward(p, i):
        chunk = [take_microbatch(x, i, n) for x in inputs]
        return apply_fn(p, chunk, jax.random.fold_in(rng, i))

    # Pass 1: outputs only; nothing is differentiated, so no activation outlives its micro-batch.
    def embed(carry, i):
        return carry, forward(params, i)

    _, stacked = jax.lax.scan(embed, None, index)
    outputs = global_outputs(stacked)

    # Pass 2: the loss on the whole batch, differentiated w.r.t. the outputs.
    (loss, metrics), g_out = jax.value_and_grad(objective, has_aux=True)(outputs, batch)

    # Global outputs (scale, bias) are produced by every micro-batch's forward; their cotangent is
    # pulled back through micro-batch 0 only, so it is counted once.
    def cotangent(g, y, i):
        if _is_per_example(y):
            return take_microbatch(g, i, n)
        return jnp.where(i == 0, g, jnp.zeros_like(g))

    # Pass 3: re-run each micro-batch under vjp and accumulate its parameter gradient.
    def backprop(acc, i):
        _, vjp = jax.vjp(lambda p: forward(p, i), params)
        (grad,) = vjp(jax.tree.map(lambda g, y: cotangent(g, y, i), g_out, stacked))
        return jax.tree.map(jnp.add, acc, grad), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(backprop, zeros, index)
    return (loss, metrics, outputs), grads


def averaged_value_and_grad(
    apply_fn: ApplyFn,
    objective: Objective,
    params: Any,
    inputs: Sequence[jax.Array],
    batch: dict,
    *,
    num_microbatches: int,
    rng: jax.Array,
) -> tuple[tuple[jax.Array, dict, dict], Any]:
    """Plain accumulation: mean over micro-batches of each one's own loss, metrics and gradient.

    ``batch`` entries with a leading batch dim are split like the inputs, so the objective sees
    the matching slice. Returned ``outputs`` are the global-batch outputs (for logging).
    """
    n = int(num_microbatches)
    b = inputs[0].shape[0]
    per_example = {k: v for k, v in batch.items() if hasattr(v, "shape") and v.ndim >= 1 and v.shape[0] == b}

    def one(carry, i):
        chunk = [take_microbatch(x, i, n) for x in inputs]
        sub_batch = {k: take_microbatch(v, i, n) for k, v in per_example.items()}

        def loss_of(p):
            out = apply_fn(p, chunk, jax.random.fold_in(rng, i))
            loss, metrics = objective(out, sub_batch)
            return loss, (metrics, out)

        (loss, (metrics, out)), grad = jax.value_and_grad(loss_of, has_aux=True)(params)
        acc = jax.tree.map(lambda a, g: a + g / n, carry, grad)
        return acc, (loss, metrics, out)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, metrics, stacked) = jax.lax.scan(one, zeros, jnp.arange(n))
    outputs = global_outputs(stacked)
    return (jnp.mean(losses), jax.tree.map(jnp.mean, metrics), outputs), grads


def full_batch_value_and_grad(
    apply_fn: ApplyFn, objective: Objective, params: Any, inputs: Sequence[jax.Array], batch: dict, *,
    rng: jax.Array, **_: Any,
) -> tuple[tuple[jax.Array, dict, dict], Any]:
    """The plain whole-batch ``((loss, metrics, outputs), grads)`` (no micro-batching)."""

    def loss_of(p):
        out = apply_fn(p, inputs, jax.random.fold_in(rng, 0))
        loss, metrics = objective(out, batch)
        return loss, (metrics, out)

    (loss, (metrics, out)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return (loss, metrics, out), grads


def value_and_grad_fn(accumulation: str, num_microbatches: int) -> Callable:
    """The function for ``config.train.accumulation`` (``num_microbatches <= 1``: full batch)."""
    if num_microbatches <= 1:
        return full_batch_value_and_grad
    if accumulation == "gradcache":
        return gradcache_value_and_grad
    if accumulation == "average":
        return averaged_value_and_grad
    raise ValueError(f"unknown config.train.accumulation {accumulation!r}; known: {', '.join(ACCUMULATIONS)}")
