"""Contrastive losses over the global batch: softmax (CLIP InfoNCE) and sigmoid (SigLIP).

Both losses are written on GLOBAL ``[B, D]`` embeddings (possibly batch-sharded ``jax.Array``s
inside the caller's ``jit``). Three implementations give the same value and gradients:

``"dense"``
    The reference: ``scale * x @ y.T`` is materialized (XLA inserts the all-gather under jit).
    Memory O(B^2).
``"chunked"``
    Streams over blocks of the similarity matrix with an online log-sum-exp (Inf-CL, Cheng et al.
    2024) under a ``jax.custom_vjp`` that saves only per-row / per-column statistics and recomputes
    blocks in the backward. On a mesh, inside ``shard_map`` over the batch axes, each step
    all-gathers one column block of the other modality (the gather is issued block by block, so a
    device never holds more than one gathered block) and partial column statistics are combined
    across devices with one all-reduce at the end.
``"ring"``
    Inside ``shard_map``, the other modality's per-device block travels around the mesh with
    ``lax.ppermute`` while the local block is computed; the column statistics (forward) and the
    gradient accumulators (backward) travel with it, so no step's logits are kept.
    Memory per device O(b*D + block^2), b the per-device batch.

``chunked`` and ``ring`` are two drivers of :mod:`.streaming`, running the kernels of
:mod:`.kernels` (:func:`.kernels.pair_stats` for softmax, :func:`.kernels.sigmoid_rowsum` for
sigmoid); this module adds the parts of each loss that are linear in the logits (O(B*D)).

References: CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"); SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training");
Inf-CL (Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for
Contrastive Loss").
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from contrastive_jax.losses import kernels
from contrastive_jax.losses.inputs import check_pair, example_weights, per_row, renamed_mask
from contrastive_jax.losses.streaming import IMPLS

Array = jax.Array
DEFAULT_BLOCK_SIZE = 1024

__all__ = ["softmax_contrastive_loss", "sigmoid_contrastive_loss", "IMPLS", "DEFAULT_BLOCK_SIZE"]


# --------------------------------------------------------------------------------------------
# Argument handling and metrics shared by both losses
# --------------------------------------------------------------------------------------------


def _check_inputs(x: Array, y: Array, impl: str, block_size: int) -> None:
    check_pair(x, y, impl)
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _dense_max_off(logits, valid):
    """Largest logit among the OTHER valid examples of each row / column of a dense [B, B]."""
    neg_inf = jnp.float32(-jnp.inf)
    off = jnp.where(valid[:, None] & valid[None, :] & ~jnp.eye(logits.shape[0], dtype=bool), logits, neg_inf)
    sg = jax.lax.stop_gradient
    return sg(jnp.max(off, axis=1)), sg(jnp.max(off, axis=0))


def _metrics(diag, row_max_off, col_max_off, pair_sum, valid):
    """In-batch metrics from per-example statistics (all float32 [B]; ``pair_sum`` a scalar).

    ``diag``: positive-pair logit; ``row_max_off`` / ``col_max_off``: largest logit among the
    OTHER valid examples of the row / column (-inf if none); ``pair_sum``: sum of the logits over
    all valid pairs (diagonal included).
    """
    vf = valid.astype(jnp.float32)
    n = jnp.sum(vf)
    diag = jax.lax.stop_gradient(diag)
    pos_sum = jnp.sum(vf * diag)
    n_neg = n * n - n
    return {
        "i2t_top1": jnp.sum(vf * (diag > row_max_off)) / n,
        "t2i_top1": jnp.sum(vf * (diag > col_max_off)) / n,
        "pos_logit": pos_sum / n,
        "neg_logit": jnp.where(n_neg > 0, (pair_sum - pos_sum) / jnp.maximum(n_neg, 1.0), 0.0),
    }


def _dot_rows(a: Array, b: Array) -> Array:
    """Row-wise dot products of two [B, D] arrays, accumulated in float32."""
    return jnp.einsum("bd,bd->b", a, b, preferred_element_type=jnp.float32)


def _masked_sum(v: Array, valid: Array) -> Array:
    """sum_i valid_i * v_i over rows of a [B, D] array, in float32 -> [D]."""
    return jnp.einsum("b,bd->d", valid.astype(jnp.float32), v.astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# Softmax (CLIP / InfoNCE)
# --------------------------------------------------------------------------------------------


def _softmax_lse(x, y, s, valid, *, impl, block_size, mesh, batch_axes, bidirectional, return_metrics):
    """(lse_r [B], lse_c [B], (row_max_off, col_max_off) or None): log-sum-exp of every row /
    column of ``l = s x y^T`` over the valid columns / rows, dense or streamed."""
    if impl != "dense":
        st = kernels.pair_stats(x, y, s, valid, alphas=(1.0,), with_col=bidirectional, with_metrics=return_metrics,
                                impl=impl, block_size=int(block_size), mesh=mesh, batch_axes=batch_axes)
        max_off = (st["max_off_r"], st["max_off_c"]) if return_metrics else None
        return st["lse_r"][:, 0], st["lse_c"][:, 0], max_off
    logits = s[:, None] * jnp.dot(x, y.T, preferred_element_type=jnp.float32)
    neg_inf = jnp.float32(-jnp.inf)
    lse_r = jax.nn.logsumexp(jnp.where(valid[None, :], logits, neg_inf), axis=1)
    lse_c = jax.nn.logsumexp(jnp.where(valid[:, None], logits, neg_inf), axis=0)
    return lse_r, lse_c, _dense_max_off(logits, valid) if return_metrics else None


def softmax_contrastive_loss(
    x: Array,
    y: Array,
    *,
    scale: Any,
    impl: str = "dense",
    block_size: int = DEFAULT_BLOCK_SIZE,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | str | None = None,
    bidirectional: bool = True,
    label_smoothing: float = 0.0,
    valid: Any = None,
    return_metrics: bool = False,
    weights: Any = None,
):
    """Symmetric InfoNCE / CLIP loss (Radford et al. 2021) over the global batch.

    With ``l_ij = scale_i * <x_i, y_j>`` (float32 accumulation), the loss is

        sum_i w_i * (CE_row_i + CE_col_i) / 2 / sum_i w_i

    where ``CE_row_i = logsumexp_j l_ij - l_ii`` (image->text) and ``CE_col_j = logsumexp_i l_ij
    - l_jj`` (text->image); with ``bidirectional=False`` only ``CE_row`` is used.

    Args:
      x: ``[B, D]`` float32 or bfloat16, L2-normalized image embeddings (row i pairs with y_i).
      y: ``[B, D]`` same dtype, L2-normalized text embeddings.
      scale: float scalar or ``[B]`` per-row (per-image) scale; already exponentiated
        (``1 / temperature``). Differentiable.
      impl: ``"dense"`` | ``"chunked"`` | ``"ring"`` (see module docstring).
      block_size: edge of the similarity blocks streamed by ``chunked`` / ``ring``; need not
        divide the (per-device) batch.
      mesh: mesh the batch is sharded over; default: the ambient mesh (``jax.set_mesh``),
        else a concrete input's ``NamedSharding`` mesh, else single device.
      batch_axes: mesh axis name(s) the batch is sharded over (default: all mesh axes).
      bidirectional: ``False`` gives the one-directional image->text loss.
      label_smoothing: ``eps``; targets are ``(1 - eps) * onehot + eps / N`` over the N valid
        examples.
      valid: optional ``[B]`` bool mask or non-negative float per-example weights ``w``. An
        example with ``w = 0`` (False) is padding: its row AND column are excluded from every
        softmax, and the loss is normalized by ``sum(w)`` (the valid count for a mask).
        Treated as a constant (no gradient).
      return_metrics: also return a dict of float32 scalars: ``i2t_top1`` / ``t2i_top1``
        (in-batch top-1 retrieval accuracy; a tie with a negative counts as a miss),
        ``pos_logit`` (mean positive logit), ``neg_logit`` (mean logit of valid negative pairs).
      weights: deprecated name of ``valid`` (DeprecationWarning).

    Returns:
      float32 scalar loss, or ``(loss, metrics)`` if ``return_metrics``.
    """
    valid = renamed_mask(valid, weights, "softmax_contrastive_loss")
    _check_inputs(x, y, impl, block_size)
    B = x.shape[0]
    s = per_row(scale, B, "scale")
    w, valid = example_weights(valid, B)
    eps = float(label_smoothing)
    lse_r, lse_c, max_off = _softmax_lse(x, y, s, valid, impl=impl, block_size=block_size, mesh=mesh,
                                         batch_axes=batch_axes, bidirectional=bidirectional,
                                         return_metrics=return_metrics)
    # The parts of the loss that are linear in the logits need only O(B*D) work, so they are
    # written with plain jnp ops on the global arrays and differentiated by autodiff.
    diag = s * _dot_rows(x, y)
    vf = valid.astype(jnp.float32)
    n_valid = jnp.sum(vf)
    row_target = (1.0 - eps) * diag
    col_target = (1.0 - eps) * diag
    if eps:
        y_sum = _masked_sum(y, valid)  # sum_j valid_j y_j
        row_target = row_target + (eps / n_valid) * s * (x.astype(jnp.float32) @ y_sum)
        sx_sum = _masked_sum(s[:, None] * x.astype(jnp.float32), valid)  # sum_i valid_i s_i x_i
        col_target = col_target + (eps / n_valid) * (y.astype(jnp.float32) @ sx_sum)
    per_example = lse_r - row_target
    if bidirectional:
        per_example = 0.5 * (per_example + lse_c - col_target)
    # Masked rows may carry garbage statistics; `where` keeps them (and their gradients) out.
    loss = jnp.sum(jnp.where(valid, w * per_example, 0.0)) / jnp.sum(w)
    if not return_metrics:
        return loss
    sg = jax.lax.stop_gradient
    pair_sum = jnp.dot(_masked_sum(sg(s)[:, None] * sg(x).astype(jnp.float32), valid),
                       _masked_sum(sg(y), valid))
    return loss, _metrics(diag, *max_off, pair_sum, valid)


# --------------------------------------------------------------------------------------------
# Sigmoid (SigLIP)
# --------------------------------------------------------------------------------------------


def sigmoid_contrastive_loss(
    x: Array,
    y: Array,
    *,
    scale: Any,
    bias: Any,
    impl: str = "dense",
    block_size: int = DEFAULT_BLOCK_SIZE,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | str | None = None,
    valid: Any = None,
    return_metrics: bool = False,
    weights: Any = None,
):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023) over the global batch.

    With ``t_ij = scale_i * <x_i, y_j> + bias_i`` (float32 accumulation) and ``z_ij = +1`` if
    ``i == j`` else ``-1``:

        loss = sum_i w_i * sum_{j valid} -log sigmoid(z_ij * t_ij) / sum_i w_i

    i.e. ``(1/B) sum_ij -log sigmoid(z_ij t_ij)`` without a mask.

    Args:
      x, y: ``[B, D]`` float32 or bfloat16, L2-normalized; (x_i, y_i) are the positive pairs.
      scale: float scalar or ``[B]`` per-row scale (already exponentiated). Differentiable.
      bias: float scalar or ``[B]`` per-row bias. Differentiable.
      impl, block_size, mesh, batch_axes: as in :func:`softmax_contrastive_loss`.
      valid: optional ``[B]`` bool mask or non-negative float per-example weights ``w``; 0 (False)
        marks padding, whose row and column are excluded (pair (i, j) has weight
        ``w_i * [w_j > 0]``); normalized by ``sum(w)``. Treated as a constant.
      return_metrics: also return ``i2t_top1``, ``t2i_top1``, ``pos_logit``, ``neg_logit``
        (logits here include the bias).
      weights: deprecated name of ``valid`` (DeprecationWarning).

    Returns:
      float32 scalar loss, or ``(loss, metrics)`` if ``return_metrics``.
    """
    valid = renamed_mask(valid, weights, "sigmoid_contrastive_loss")
    _check_inputs(x, y, impl, block_size)
    B = x.shape[0]
    s = per_row(scale, B, "scale")
    b = per_row(bias, B, "bias")
    w, valid = example_weights(valid, B)
    diag = s * _dot_rows(x, y) + b

    if impl == "dense":
        logits = s[:, None] * jnp.dot(x, y.T, preferred_element_type=jnp.float32) + b[:, None]
        z = 2.0 * jnp.eye(B, dtype=jnp.float32) - 1.0
        per_pair = jax.nn.softplus(-z * logits)  # -log sigmoid(z t)
        per_example = jnp.sum(jnp.where(valid[None, :], per_pair, 0.0), axis=1)
        max_off = _dense_max_off(logits, valid) if return_metrics else None
    else:
        # sum_{j valid} softplus(t_ij): every pair scored as a negative; the positive pair is
        # then corrected with softplus(-t) - softplus(t) = -t, which is linear and O(B*D).
        neg_sum, max_off = kernels.sigmoid_rowsum(x, y, s, b, valid, impl=impl, block_size=int(block_size),
                                                  mesh=mesh, batch_axes=batch_axes, with_metrics=return_metrics)
        per_example = neg_sum - diag
    loss = jnp.sum(jnp.where(valid, w * per_example, 0.0)) / jnp.sum(w)
    if not return_metrics:
        return loss
    sg = jax.lax.stop_gradient
    vf = valid.astype(jnp.float32)
    pair_sum = jnp.dot(_masked_sum(sg(s)[:, None] * sg(x).astype(jnp.float32), valid),
                       _masked_sum(sg(y), valid)) + jnp.sum(vf * sg(b)) * jnp.sum(vf)
    return loss, _metrics(diag, *max_off, pair_sum, valid)
