"""Captioning (next-token) cross-entropy without the ``[N, V]`` logits.

A text decoder's loss is ``softmax cross-entropy(h @ W + b, targets)`` over ``N = B * L`` token
positions and a vocabulary of ``V`` words. With ``V`` = 32k..256k the logits (and their gradient)
are the largest arrays of the whole step: at ``N = 16k`` and ``V = 256k`` each is 16 GiB in
float32. :func:`fused_cross_entropy` computes the same loss and the same gradients while holding
only one ``[token_block, vocab_block]`` tile of logits at a time:

* forward: for each vocabulary block, the tile ``z = h_blk @ W[:, blk] + b[blk]`` (float32)
  updates a running log-sum-exp (the online softmax normaliser of Milakov & Gimelshein 2018,
  "Online normalizer calculation for softmax"), picks up the target's logit when it falls in the
  block, adds the block's logit sum (needed by label smoothing) and tracks the running argmax
  (token accuracy); only these ``O(N)`` statistics survive a tile;
* backward (``jax.custom_vjp``): each tile is recomputed from ``h`` and ``W``, its softmax formed
  from the saved log-sum-exp, and ``dz = c * (softmax - q)`` turned at once into its share of
  ``dh``, ``dW[:, blk]`` and ``db[blk]``.

This is the "fused linear + cross-entropy" of Wijmans et al. 2024 ("Cut Your Losses in
Large-Vocabulary Language Models", Cut Cross-Entropy) and of Liger Kernel's
``FusedLinearCrossEntropy``, written with ``lax.scan`` in plain JAX so that it runs on CPU, GPU
and TPU and composes with GSPMD sharding. Memory: ``O(N * d + d * V + token_block *
vocab_block)``; compute: two tile matmuls in the forward-and-recompute plus two in the backward,
i.e. one extra ``N x d x V`` matmul over the dense version.

Token blocks are *strided*: block ``k`` holds rows ``k, k + nt, k + 2 nt, ...`` (``nt`` blocks).
With ``h`` sharded over its rows (the batch) each block is then spread over every device, so
the per-block work stays sharded instead of XLA gathering one contiguous block onto one device.

Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture"): the target
distribution is ``q = (1 - eps) * onehot(t) + eps / V``, so a token's loss is
``lse(z) - (1 - eps) * z_t - (eps / V) * sum_j z_j``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from contrastive_jax.losses.streaming import block_layout

F32 = jnp.float32
DEFAULT_VOCAB_BLOCK = 4096
DEFAULT_TOKEN_BLOCK = 4096
_NEG = -1e30  # finite "minus infinity" for padded vocabulary columns: exp() of it is exactly 0


class CaptionLoss(NamedTuple):
    """What :func:`fused_cross_entropy` returns.

    loss: ``[]`` float32, the weighted mean over tokens ``sum_i w_i l_i / sum_i w_i`` (0 when
      every weight is 0). per_token: ``[N]`` float32, ``l_i`` for every token (masked ones
      included: they are simply not counted in ``loss``). accuracy: ``[]`` float32, the weighted
      fraction of tokens whose argmax logit (first index on ties) is the target; no gradient.
      correct: ``[N]`` float32, 1 where that argmax is the target (masked tokens included), no
      gradient: per-example accuracies for callers that sum over their own groups.
    """

    loss: jax.Array
    per_token: jax.Array
    accuracy: jax.Array
    correct: jax.Array | None = None


def _dot(a, b):
    """``a [m, k] @ b [k, n]`` accumulated in float32 (bf16 inputs stay bf16 into the matmul)."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _tile_logits(hb, w, b, vblk, vb, v):
    """Logits of one tile: ``hb [tn, d]`` x vocabulary block ``vblk`` -> ``[tn, vb]`` float32,
    plus the ``[vb]`` bool mask of the columns that are real (not padding past ``V``)."""
    wb = lax.dynamic_slice_in_dim(w, vblk * vb, vb, axis=1)
    bb = lax.dynamic_slice_in_dim(b, vblk * vb, vb, axis=0)
    cols = vblk * vb + jnp.arange(vb)
    valid = cols < v
    z = _dot(hb, wb) + bb.astype(F32)[None, :]
    return jnp.where(valid[None, :], z, _NEG), valid, cols, wb


def _row_stats(hb, tb, w, b, nvb, vb, v):
    """Streams one token block over every vocabulary block.

    Returns ``lse [tn]``, target logit ``[tn]``, sum of the real logits ``[tn]``, argmax ``[tn]``.
    """
    tn = hb.shape[0]

    def body(carry, vblk):
        m, s, zt, zsum, best, arg = carry
        z, valid, cols, _ = _tile_logits(hb, w, b, vblk, vb, v)
        bm = jnp.max(z, axis=1)
        m_new = jnp.maximum(m, bm)
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        hit = cols[None, :] == tb[:, None]
        zt = zt + jnp.sum(jnp.where(hit, z, 0.0), axis=1)
        zsum = zsum + jnp.sum(jnp.where(valid[None, :], z, 0.0), axis=1)
        # Strictly greater: an earlier block keeps a tie, as argmax over the whole row would.
        barg = vblk * vb + jnp.argmax(z, axis=1)
        arg = jnp.where(bm > best, barg, arg)
        best = jnp.maximum(best, bm)
        return (m_new, s, zt, zsum, best, arg), None

    init = (jnp.full((tn,), _NEG, F32), jnp.zeros((tn,), F32), jnp.zeros((tn,), F32),
            jnp.zeros((tn,), F32), jnp.full((tn,), -jnp.inf, F32), jnp.zeros((tn,), jnp.int32))
    (m, s, zt, zsum, _, arg), _ = lax.scan(body, init, jnp.arange(nvb))
    return m + jnp.log(s), zt, zsum, arg


def _layout(n, v, vocab_block, token_block):
    nvb, vb = block_layout(v, vocab_block)
    ntb, tn = block_layout(n, token_block or n)
    return nvb, vb, ntb, tn


def _to_blocks(x, ntb, tn):
    """``[N, ...]`` -> ``[tn, ntb, ...]`` (zero-padded to ``tn * ntb`` rows): column ``k`` is the
    strided token block ``k`` (see the module docstring)."""
    pad = tn * ntb - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((tn, ntb) + x.shape[1:])


def _from_blocks(x, n):
    """Inverse of :func:`_to_blocks`: ``[tn, ntb, ...]`` -> ``[N, ...]``."""
    return x.reshape((-1,) + x.shape[2:])[:n]


def _forward(h, w, b, targets, weights, eps, vocab_block, token_block):
    n, _ = h.shape
    v = w.shape[1]
    nvb, vb, ntb, tn = _layout(n, v, vocab_block, token_block)
    wp = jnp.pad(w, ((0, 0), (0, nvb * vb - v)))
    bp = jnp.pad(b, (0, nvb * vb - v))
    hblk, tblk = _to_blocks(h, ntb, tn), _to_blocks(targets, ntb, tn)

    def per_block(k):
        hb = lax.dynamic_index_in_dim(hblk, k, axis=1, keepdims=False)
        tb = lax.dynamic_index_in_dim(tblk, k, axis=1, keepdims=False)
        return _row_stats(hb, tb, wp, bp, nvb, vb, v)

    lse, zt, zsum, arg = lax.map(per_block, jnp.arange(ntb))  # each [ntb, tn]
    lse, zt, zsum, arg = (_from_blocks(jnp.swapaxes(a, 0, 1), n) for a in (lse, zt, zsum, arg))
    per_token = lse - (1.0 - eps) * zt - (eps / v) * zsum
    wsum = jnp.sum(weights)
    denom = jnp.where(wsum > 0, wsum, 1.0)
    loss = jnp.sum(weights * per_token) / denom
    correct = (arg == targets).astype(F32)
    acc = jnp.sum(weights * correct) / denom
    return loss, per_token, acc, correct, lse, denom


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(h, w, b, targets, weights, eps, vocab_block, token_block):
    loss, per_token, acc, correct, _, _ = _forward(h, w, b, targets, weights, eps, vocab_block, token_block)
    return loss, per_token, acc, correct


def _fused_fwd(h, w, b, targets, weights, eps, vocab_block, token_block):
    loss, per_token, acc, correct, lse, denom = _forward(h, w, b, targets, weights, eps, vocab_block, token_block)
    return (loss, per_token, acc, correct), (h, w, b, targets, weights, lse, per_token, loss, denom)


def _fused_bwd(eps, vocab_block, token_block, res, cts):
    h, w, b, targets, weights, lse, per_token, loss, denom = res
    g_loss, g_tok, _, _ = cts  # accuracy and correctness have no gradient
    n, d = h.shape
    v = w.shape[1]
    nvb, vb, ntb, tn = _layout(n, v, vocab_block, token_block)
    # dz_ij = c_i (softmax_ij - q_ij): c_i collects the mean's share and a per-token cotangent.
    coef = g_loss * weights / denom + g_tok
    wp = jnp.pad(w, ((0, 0), (0, nvb * vb - v)))
    bp = jnp.pad(b, (0, nvb * vb - v))
    hblk, tblk = _to_blocks(h, ntb, tn), _to_blocks(targets, ntb, tn)
    lblk, cblk = _to_blocks(lse, ntb, tn), _to_blocks(coef, ntb, tn)

    def vocab_step(dh, vblk):
        def token_step(dwb_db, k):
            dwb, dbb = dwb_db
            hb = lax.dynamic_index_in_dim(hblk, k, axis=1, keepdims=False)
            tb = lax.dynamic_index_in_dim(tblk, k, axis=1, keepdims=False)
            lb = lax.dynamic_index_in_dim(lblk, k, axis=1, keepdims=False)
            cb = lax.dynamic_index_in_dim(cblk, k, axis=1, keepdims=False)
            z, valid, cols, wb = _tile_logits(hb, wp, bp, vblk, vb, v)
            p = jnp.exp(z - lb[:, None])  # padded columns: exp(-1e30 - lse) == 0
            q = (1.0 - eps) * (cols[None, :] == tb[:, None]) + jnp.where(valid, eps / v, 0.0)[None, :]
            dz = cb[:, None] * (p - q)
            # Cast the tile's gradient to the operands' dtype, as autodiff of a bf16 matmul does.
            dhb = _dot(dz.astype(wb.dtype), wb.T)
            dwb = dwb + _dot(hb.T, dz.astype(hb.dtype))
            dbb = dbb + jnp.sum(dz, axis=0)
            return (dwb, dbb), dhb

        (dwb, dbb), dh_blocks = lax.scan(token_step, (jnp.zeros((d, vb), F32), jnp.zeros((vb,), F32)),
                                         jnp.arange(ntb))  # dh_blocks [ntb, tn, d]
        return dh + jnp.swapaxes(dh_blocks, 0, 1), (dwb, dbb)

    dh, (dw, db) = lax.scan(vocab_step, jnp.zeros((tn, ntb, d), F32), jnp.arange(nvb))
    dh = _from_blocks(dh, n)
    dw = jnp.moveaxis(dw, 0, 1).reshape(d, nvb * vb)[:, :v]  # [nvb, d, vb] -> [d, V]
    db = db.reshape(-1)[:v]
    # d loss / d w_i = (l_i - loss) / sum(w): the weights may carry a gradient (soft masks).
    dweights = g_loss * (per_token - loss) / denom
    return dh.astype(h.dtype), dw.astype(w.dtype), db.astype(b.dtype), None, dweights.astype(weights.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _dense(h, w, b, targets, weights, eps):
    logits = _dot(h, w) + b.astype(F32)[None, :]  # [N, V]: what the fused version avoids
    v = w.shape[1]
    lse = jax.nn.logsumexp(logits, axis=1)
    zt = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    per_token = lse - (1.0 - eps) * zt - (eps / v) * jnp.sum(logits, axis=1)
    wsum = jnp.sum(weights)
    denom = jnp.where(wsum > 0, wsum, 1.0)
    correct = lax.stop_gradient((jnp.argmax(logits, axis=1) == targets).astype(F32))
    acc = jnp.sum(weights * correct) / denom
    return jnp.sum(weights * per_token) / denom, per_token, lax.stop_gradient(acc), correct


def fused_cross_entropy(
    h: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    impl: str = "chunked",
    vocab_block: int = DEFAULT_VOCAB_BLOCK,
    token_block: int | None = DEFAULT_TOKEN_BLOCK,
) -> CaptionLoss:
    """Softmax cross-entropy of the logits ``h @ w + bias`` against ``targets``, never forming them.

    Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (the fused
    linear + cross-entropy with blockwise recomputation); label smoothing as in Szegedy et al.
    2016. See the module docstring for the algorithm.

    Args:
      h: ``[N, d]`` hidden states (any float dtype; ``N`` = batch x length, flatten ``[B, L, d]``
        first). The tiles are computed as ``h @ w`` in that dtype with float32 accumulation.
      w: ``[d, V]`` output projection (for tied embeddings pass ``embedding.T``; the transpose is
        free under jit). Its gradient comes back in its own dtype.
      targets: ``[N]`` int token ids in ``[0, V)`` (a masked position may hold any id in range).
      weights: ``[N]`` bool or float token weights (0 = padding, not counted); None: all 1.
        Float weights receive a gradient, ``(l_i - loss) / sum(w)``.
      bias: ``[V]`` output bias or None.
      label_smoothing: ``eps`` in ``[0, 1)``: the target distribution is ``(1 - eps)`` on the
        target plus ``eps / V`` on every word.
      impl: ``'chunked'`` (streamed, custom VJP) or ``'dense'`` (materializes ``[N, V]``
        float32 logits; the reference and the memory control).
      vocab_block: columns of ``w`` per tile (need not divide ``V``).
      token_block: rows of ``h`` per tile (strided blocks, see the module docstring), or None for
        all ``N`` rows in one block.

    Returns:
      :class:`CaptionLoss` ``(loss [] float32 in nats per token, per_token [N] float32,
      accuracy [] float32 in [0, 1], correct [N] float32 0/1)``.
    """
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[0]:
        raise ValueError(f"fused_cross_entropy needs h [N, d] and w [d, V], got {h.shape} and {w.shape}")
    n, v = h.shape[0], w.shape[1]
    if targets.shape != (n,):
        raise ValueError(f"targets must be [N]={n}, got {targets.shape}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    targets = targets.astype(jnp.int32)
    weights = jnp.ones((n,), F32) if weights is None else weights
    if weights.shape != (n,):
        raise ValueError(f"weights must be [N]={n}, got {weights.shape}")
    weights = weights.astype(F32)
    bias = jnp.zeros((v,), F32) if bias is None else bias
    if bias.shape != (v,):
        raise ValueError(f"bias must be [V]={v}, got {bias.shape}")
    if impl == "dense":
        return CaptionLoss(*_dense(h, w, bias, targets, weights, float(label_smoothing)))
    if impl != "chunked":
        raise ValueError(f"unknown impl {impl!r}; known: 'chunked', 'dense'")
    loss, per_token, acc, correct = _fused(h, w, bias, targets, weights, float(label_smoothing), int(vocab_block),
                                           None if token_block is None else int(token_block))
    return CaptionLoss(loss, per_token, lax.stop_gradient(acc), lax.stop_gradient(correct))


def caption_loss(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    **kwargs,
) -> CaptionLoss:
    """:func:`fused_cross_entropy` on a decoder's ``[B, L, d]`` output.

    ``hidden [B, L, d]``, ``targets [B, L]`` int, ``mask [B, L]`` (bool/float; None: all 1);
    ``per_token`` and ``correct`` come back as ``[B, L]``. Other keyword arguments go to
    :func:`fused_cross_entropy`.
    """
    b, l, d = hidden.shape
    out = fused_cross_entropy(hidden.reshape(b * l, d), w, targets.reshape(b * l),
                              None if mask is None else mask.reshape(b * l), bias, **kwargs)
    return CaptionLoss(out.loss, out.per_token.reshape(b, l), out.accuracy, out.correct.reshape(b, l))
