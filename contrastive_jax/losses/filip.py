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
the tile and on the row sweep), so memory is O(b^2 * L_i * L_t + B * (L_i + L_t) * D).

On a mesh (``mesh``/``batch_axes``, the ambient mesh or the inputs' ``NamedSharding``), ``chunked``
runs under ``shard_map``: every device keeps its own image tokens, ALL-GATHERS the ``[B, L_t, D]``
text tokens (a plain all-gather of the tokens, not the streamed column blocks of
:mod:`.streaming`; with ``token_fraction`` < 1 it moves the pruned tokens only), streams its
``b x B`` rectangle and merges the ``[B]`` partial text-to-image logsumexps across devices; the
result equals the one-device loss. ``dense`` is global-array math that XLA partitions.

Token pruning (``token_fraction``, :func:`prune_tokens`): FILIP's cost grows with the product of
the token counts, and the paper reduces the tokens it exchanges (Sec. 3.1.2). Here each side keeps,
per example, the ``ceil(f * n)`` of its ``n`` valid tokens most similar to the example's own pooled
embedding, before any similarity is computed; see :func:`prune_tokens` for why this criterion.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses.inputs import example_weights, per_row
from contrastive_jax.losses.streaming import resolve_mesh

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


def _lse_chunked(x, xm, s, vrow, y, ym, vcol, block: int):
    """Logsumexps of one (rows x columns) rectangle of the two FILIP logit matrices, streamed in
    ``rb x cb`` tiles (``rb = min(block, b)``, ``cb = min(block, Bc)``).

    Rows are images ``x [b, Li, D]`` (mask ``xm``, per-row scale ``s [b]``, example mask ``vrow``),
    columns texts ``y [Bc, Lt, D]`` (``ym``, ``vcol``). Returns ``(row_lse [b], col_lse [Bc])``,
    float32: for every image the logsumexp over the valid columns of ``s_i * s^I_ij``, for every
    text the logsumexp over the valid rows of ``s_i * s^T_ij`` (on a mesh: this device's rows only;
    the caller merges the column parts)."""
    b, Bc = x.shape[0], y.shape[0]
    rb, cb = max(1, min(block, b)), max(1, min(block, Bc))
    nr, nc = -(-b // rb), -(-Bc // cb)

    def padded(a, n, fill):
        return jnp.pad(a, [(0, n - a.shape[0])] + [(0, 0)] * (a.ndim - 1), constant_values=fill)

    xp, xmp, sp = padded(x, nr * rb, 0), padded(xm, nr * rb, False), padded(s, nr * rb, 0.0)
    yp, ymp = padded(y, nc * cb, 0), padded(ym, nc * cb, False)
    rbias = jnp.where(padded(vrow, nr * rb, False), 0.0, NEG).astype(F32)  # masked rows leave every softmax
    cbias = jnp.where(padded(vcol, nc * cb, False), 0.0, NEG).astype(F32)

    @jax.checkpoint
    def tile(i, j):
        rows = lambda a: lax.dynamic_slice_in_dim(a, i * rb, rb)  # noqa: E731
        cols = lambda a: lax.dynamic_slice_in_dim(a, j * cb, cb)  # noqa: E731
        si2t, st2i = pair_scores(rows(xp), cols(yp), rows(xmp), cols(ymp))
        scale = rows(sp)[:, None]
        row_logits = scale * si2t + cols(cbias)[None, :]  # image i over texts j
        col_logits = scale * st2i + rows(rbias)[:, None]  # text j over images i
        return jax.nn.logsumexp(row_logits, axis=1), jax.nn.logsumexp(col_logits, axis=0)

    @jax.checkpoint
    def row_sweep(col_lse, i):
        def step(row_lse, j):
            r, c = tile(i, j)
            return _logaddexp(row_lse, r), c

        row_lse, col_parts = lax.scan(step, neg((rb,)), jnp.arange(nc))
        return _logaddexp(col_lse, col_parts.reshape(-1)), row_lse

    # Initial carries typed like the data (0 * a row's scale): under shard_map they must be
    # "varying" over the batch axes as the carries the sweeps produce.
    neg = lambda shape: jnp.full(shape, NEG, F32) + 0.0 * lax.stop_gradient(sp[0])  # noqa: E731
    col_lse, row_lse = lax.scan(row_sweep, neg((nc * cb,)), jnp.arange(nr))
    return row_lse.reshape(-1)[:b], col_lse[:Bc]


def _per_example(row_lse, col_lse, s, x, y, xm, ym):
    """The symmetric per-example loss ``[b]`` from the two logsumexps and the matched scores."""
    d_i2t, d_t2i = _matched_scores(x, y, xm, ym)
    return 0.5 * ((row_lse - s * d_i2t) + (col_lse - s * d_t2i))


def _chunked_on_mesh(x, y, xm, ym, s, w, valid, block: int, mesh, axes) -> Array:
    """``impl="chunked"`` on a mesh: ``shard_map`` over the batch axes.

    Each device keeps its own images and all-gathers the text tokens ``[B, Lt, D]`` (and their
    masks): it streams its ``b x B`` rectangle of tiles, which gives the image-to-text logsumexps
    of its rows complete and a partial text-to-image logsumexp of every column; those ``[B]``
    partials are merged across devices (``pmax`` + ``psum``, O(B) floats). Autodiff transposes
    the all-gather into a reduce-scatter of the text tokens' gradient. Memory per device:
    O(B * Lt * D + b * Li * D + block^2 * Li * Lt).
    """
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    B = x.shape[0]
    if B % n:
        raise ValueError(f"filip_loss(impl='chunked') on a mesh needs the batch {B} to be a multiple of the "
                         f"{n} devices of the batch axes {axes}")
    spec = P(axes)

    def local(x, y, xm, ym, s, w, valid):
        gather = lambda a: lax.all_gather(a, axes, axis=0, tiled=True)  # noqa: E731
        row_lse, col_part = _lse_chunked(x, xm, s, valid, gather(y), gather(ym), gather(valid), block)
        m = lax.pmax(lax.stop_gradient(col_part), axes)  # any shift is exact for a logsumexp
        col_all = m + jnp.log(lax.psum(jnp.exp(col_part - m), axes))
        b = x.shape[0]
        col_lse = lax.dynamic_slice_in_dim(col_all, lax.axis_index(axes) * b, b)
        per_example = _per_example(row_lse, col_lse, s, x, y, xm, ym)
        num = lax.psum(jnp.sum(jnp.where(valid, w * per_example, 0.0)), axes)
        return num / lax.psum(jnp.sum(w), axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 7, out_specs=P())(x, y, xm, ym, s, w, valid)


def keep_count(fraction: float, n: int) -> int:
    """How many of ``n`` tokens token pruning keeps: ``ceil(fraction * n)``, at least 1 when
    ``n >= 1`` (a tolerance of 1e-9 absorbs float error: ``0.3 * 10`` keeps 3, not 4)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def prune_tokens(tokens: Array, mask: Array, fraction: float, reference: Any = None) -> tuple[Array, Array]:
    """Keeps, per example, the ``keep_count(fraction, n)`` of its ``n`` valid tokens that are most
    similar to a reference vector of that example.

    Criterion: the dot product of each token with ``reference`` -- the example's own pooled
    embedding (the objective passes the model's ``image`` / ``text`` output), or, when None, the
    sum (direction of the mean) of its valid tokens. Keeping the tokens that agree most with the
    pooled representation is a cheap stand-in for the class-token attentiveness by which EViT
    (Liang et al. 2022, "Not All Patches are What You Need") keeps tokens. It costs O(B * L * D),
    depends on the example alone (so the kept tokens, and the loss, do not change with the batch
    composition or the number of devices -- unlike FILIP's own selection by the token-wise max
    similarity against the texts of one worker, Yao et al. 2022, Sec. 3.1.2), and it runs before
    the similarities, so every later step handles ``K = keep_count(fraction, L)`` tokens instead of
    ``L``. The selection is a constant for the gradient (the kept tokens themselves are
    differentiable).

    Args:
      tokens: ``[B, L, D]`` unit-norm tokens. mask: ``[B, L]`` bool, True for real tokens.
      fraction: in (0, 1]; 1 returns the inputs unchanged.
      reference: optional ``[B, D]`` per-example reference vectors.

    Returns:
      ``(kept [B, K, D], kept_mask [B, K])`` with ``K = keep_count(fraction, L)``; an example with
      ``n`` valid tokens has ``keep_count(fraction, n)`` valid slots (the first ones, best first).
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"token fraction must be in (0, 1], got {fraction}")
    B, L, D = tokens.shape
    K = keep_count(float(fraction), L)
    if K >= L:
        return tokens, mask
    t = lax.stop_gradient(tokens).astype(F32)
    if reference is None:
        ref = jnp.sum(jnp.where(mask[..., None], t, 0.0), axis=1)
    else:
        ref = lax.stop_gradient(jnp.asarray(reference)).astype(F32)
        if ref.shape != (B, D):
            raise ValueError(f"pruning reference must be [B, D]={B, D}, got {ref.shape}")
    score = jnp.where(mask, jnp.einsum("bld,bd->bl", t, ref), -jnp.inf)
    _, idx = lax.top_k(score, K)  # [B, K], best first; masked tokens rank last
    kept = jnp.take_along_axis(tokens, idx[:, :, None], axis=1)
    table = jnp.asarray([keep_count(float(fraction), n) for n in range(L + 1)], jnp.int32)
    n_keep = table[jnp.sum(mask, axis=1)]
    return kept, jnp.arange(K)[None, :] < n_keep[:, None]


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
    token_fraction: float = 1.0,
    image_embed: Any = None,
    text_embed: Any = None,
    mesh: Any = None,
    batch_axes: Any = None,
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
      token_fraction: in (0, 1]: each side keeps, per example, ``ceil(token_fraction * n)`` of its
        ``n`` valid tokens (:func:`prune_tokens`) before any similarity is computed; 1.0 keeps all.
      image_embed, text_embed: optional ``[B, D]`` pooled embeddings, the references by which
        tokens are ranked for pruning (None: the mean direction of the example's valid tokens).
      mesh, batch_axes: the mesh and the axes the batch is split over, for ``chunked`` (None: the
        ambient mesh or the inputs' sharding, else one device). ``dense`` is global-array math
        that XLA partitions itself.

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
    if float(token_fraction) < 1.0:
        image_tokens, xm = prune_tokens(image_tokens, xm, token_fraction, image_embed)
        text_tokens, ym = prune_tokens(text_tokens, ym, token_fraction, text_embed)
    s = per_row(scale, B, "scale")
    w, valid = example_weights(valid, B)
    if impl == "chunked":
        mesh, axes = resolve_mesh(mesh, batch_axes, image_tokens)
        if mesh is not None:
            return _chunked_on_mesh(image_tokens, text_tokens, xm, ym, s, w, valid, int(block_size), mesh, axes)
    if impl == "dense":
        si2t, st2i = pair_scores(image_tokens, text_tokens, xm, ym)
        mbias = jnp.where(valid, 0.0, NEG).astype(F32)
        row_lse = jax.nn.logsumexp(s[:, None] * si2t + mbias[None, :], axis=1)
        col_lse = jax.nn.logsumexp(s[:, None] * st2i + mbias[:, None], axis=0)
    else:
        row_lse, col_lse = _lse_chunked(image_tokens, xm, s, valid, text_tokens, ym, valid, int(block_size))
    per_example = _per_example(row_lse, col_lse, s, image_tokens, text_tokens, xm, ym)
    return jnp.sum(jnp.where(valid, w * per_example, 0.0)) / jnp.sum(w)
