"""FILIP token-wise late-interaction contrastive loss (Yao et al. 2022, "FILIP: Fine-grained
Interactive Language-Image Pre-Training").

The score of an (image i, text j) pair compares token sequences instead of pooled vectors. With
unit-norm image tokens ``x_ik`` (k over the image's valid tokens) and text tokens ``y_jr`` (r over
the text's valid tokens):

    s_ij^I = mean_k max_r <x_ik, y_jr>      (image-to-text: every image token finds its best word)
    s_ij^T = mean_r max_k <x_ik, y_jr>      (text-to-image: every word finds its best patch)

and the loss is the symmetric InfoNCE of the paper, each direction with its own score:

    L = 1/2 * mean_i [logsumexp_j (t s_ij^I) - t s_ii^I] + 1/2 * mean_j [logsumexp_i (t s_ij^T) - t s_jj^T]

over the valid examples, ``t`` the (already exponentiated) logit scale.

``impl="chunked"`` streams the batch in (row block x column block) tiles: a tile holds
``[b, b, L_i, L_t]`` token similarities, is reduced to its two ``[b, b]`` score blocks at once, and
only O(B) running logsumexps survive it, so neither the ``[B, B, L_i, L_t]`` similarity tensor nor
the ``[B, B]`` score matrix ever exists. The backward recomputes each tile (``jax.checkpoint`` on
the tile and on the row sweep), so memory is O(b^2 * L_i * L_t + B * (L_i + L_t) * D). On a mesh the
token arrays are gathered by XLA (the tiles themselves are not split over devices yet).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from contrastive_jax.losses.inputs import example_weights, per_row

Array = jax.Array
F32 = jnp.float32
NEG = -1e30  # finite additive mask (exp of it is exactly 0; masked-minus-masked is no NaN)
IMPLS = ("dense", "chunked")


def _token_mask(mask: Any, shape: tuple[int, int], name: str) -> Array:
    if mask is None:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (batch, tokens), got {mask.shape}")
    return mask.astype(bool)


def pair_scores(x: Array, y: Array, xm: Array, ym: Array) -> tuple[Array, Array]:
    """FILIP scores of every pair of a block of images and a block of texts.

    Args:
      x: ``[bi, Li, D]`` unit-norm image tokens; ``xm`` ``[bi, Li]`` bool, True for real tokens.
      y: ``[bj, Lt, D]`` unit-norm text tokens; ``ym`` ``[bj, Lt]`` bool.

    Returns:
      ``(s_i2t, s_t2i)``, each ``[bi, bj]`` float32: mean over image tokens of the max over text
      tokens, and mean over text tokens of the max over image tokens. A sequence with no valid
      token scores 0.
    """
    sim = jnp.einsum("ikd,jrd->ijkr", x, y, preferred_element_type=F32)  # [bi, bj, Li, Lt]
    best_word = jnp.max(jnp.where(ym[None, :, None, :], sim, NEG), axis=3)  # [bi, bj, Li]
    best_patch = jnp.max(jnp.where(xm[:, None, :, None], sim, NEG), axis=2)  # [bi, bj, Lt]
    xw = xm.astype(F32) / jnp.maximum(jnp.sum(xm, axis=1, keepdims=True), 1).astype(F32)  # [bi, Li]
    yw = ym.astype(F32) / jnp.maximum(jnp.sum(ym, axis=1, keepdims=True), 1).astype(F32)  # [bj, Lt]
    # Where a sequence is all padding the max is NEG; its weights are all 0, and `where` keeps the
    # NEG * 0 products (and their gradients) out.
    s_i2t = jnp.einsum("ijk,ik->ij", jnp.where(xm[:, None, :], best_word, 0.0), xw)
    s_t2i = jnp.einsum("ijr,jr->ij", jnp.where(ym[None, :, :], best_patch, 0.0), yw)
    return s_i2t, s_t2i


def _matched_scores(x, y, xm, ym):
    """``(s_ii^I, s_ii^T)``, each ``[B]``: the scores of the matched pairs only (O(B L_i L_t))."""
    one = jax.vmap(lambda a, b, am, bm: tuple(v[0, 0] for v in pair_scores(a[None], b[None], am[None], bm[None])))
    return one(x, y, xm, ym)


def _logaddexp(a, b):
    m = jnp.maximum(a, b)
    return m + jnp.log(jnp.exp(a - m) + jnp.exp(b - m))


def _lse_chunked(x, y, xm, ym, s, valid, block: int):
    """Row logsumexps of ``s_i * s^I`` and column logsumexps of ``s_i * s^T`` (masked examples
    excluded), streamed in ``block x block`` tiles; returns two ``[B]`` float32 arrays."""
    B = x.shape[0]
    nb = -(-B // block)
    pad = nb * block - B

    def padded(a, fill):
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)

    xp, yp, xmp, ymp = padded(x, 0), padded(y, 0), padded(xm, False), padded(ym, False)
    sp, vp = padded(s, 0.0), padded(valid, False)
    mbias = jnp.where(vp, 0.0, NEG).astype(F32)  # [Bp]: masked examples leave every softmax

    @jax.checkpoint
    def tile(i, j):
        rows = lambda a: lax.dynamic_slice_in_dim(a, i * block, block)  # noqa: E731
        cols = lambda a: lax.dynamic_slice_in_dim(a, j * block, block)  # noqa: E731
        si2t, st2i = pair_scores(rows(xp), cols(yp), rows(xmp), cols(ymp))
        scale = rows(sp)[:, None]
        row_logits = scale * si2t + cols(mbias)[None, :]  # image i over texts j
        col_logits = scale * st2i + rows(mbias)[:, None]  # text j over images i
        return jax.nn.logsumexp(row_logits, axis=1), jax.nn.logsumexp(col_logits, axis=0)

    @jax.checkpoint
    def row_sweep(col_lse, i):
        def step(row_lse, j):
            r, c = tile(i, j)
            return _logaddexp(row_lse, r), c

        row_lse, col_parts = lax.scan(step, jnp.full((block,), NEG, F32), jnp.arange(nb))
        return _logaddexp(col_lse, col_parts.reshape(-1)), row_lse

    col_lse, row_lse = lax.scan(row_sweep, jnp.full((nb * block,), NEG, F32), jnp.arange(nb))
    return row_lse.reshape(-1)[:B], col_lse[:B]


def filip_loss(
    image_tokens: Array,
    text_tokens: Array,
    *,
    scale: Any,
    image_mask: Any = None,
    text_mask: Any = None,
    valid: Any = None,
    impl: str = "dense",
    block_size: int = 128,
) -> Array:
    """Symmetric FILIP loss over the batch (see the module docstring for the formula).

    Args:
      image_tokens: ``[B, Li, D]`` float32/bfloat16 image tokens, L2-normalized per token.
      text_tokens: ``[B, Lt, D]`` same dtype, text tokens L2-normalized per token.
      scale: float scalar or ``[B]`` per-image logit scale (``1 / temperature``), differentiable.
      image_mask: optional ``[B, Li]`` bool, False for tokens to ignore (pruned or padding).
      text_mask: optional ``[B, Lt]`` bool, False for padding tokens.
      valid: optional ``[B]`` bool mask or non-negative weights; an example with weight 0 is left
        out of every softmax and of the mean (constant, no gradient).
      impl: ``"dense"`` (materializes the ``[B, B, Li, Lt]`` similarities; small batches and the
        reference) or ``"chunked"`` (streamed tiles, see the module docstring).
      block_size: tile edge for ``chunked``; need not divide ``B``.

    Returns:
      float32 scalar.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; known: {', '.join(IMPLS)}")
    if image_tokens.ndim != 3 or text_tokens.ndim != 3 or image_tokens.shape[0] != text_tokens.shape[0] \
            or image_tokens.shape[2] != text_tokens.shape[2]:
        raise ValueError(f"expected image tokens [B, Li, D] and text tokens [B, Lt, D], got "
                         f"{image_tokens.shape} and {text_tokens.shape}")
    B, Li, _ = image_tokens.shape
    Lt = text_tokens.shape[1]
    xm = _token_mask(image_mask, (B, Li), "image_mask")
    ym = _token_mask(text_mask, (B, Lt), "text_mask")
    s = per_row(scale, B, "scale")
    w, valid = example_weights(valid, B)
    if impl == "dense":
        si2t, st2i = pair_scores(image_tokens, text_tokens, xm, ym)
        mbias = jnp.where(valid, 0.0, NEG).astype(F32)
        row_lse = jax.nn.logsumexp(s[:, None] * si2t + mbias[None, :], axis=1)
        col_lse = jax.nn.logsumexp(s[:, None] * st2i + mbias[:, None], axis=0)
    else:
        row_lse, col_lse = _lse_chunked(image_tokens, text_tokens, xm, ym, s, valid, int(block_size))
    d_i2t, d_t2i = _matched_scores(image_tokens, text_tokens, xm, ym)
    per_example = 0.5 * ((row_lse - s * d_i2t) + (col_lse - s * d_t2i))
    return jnp.sum(jnp.where(valid, w * per_example, 0.0)) / jnp.sum(w)
