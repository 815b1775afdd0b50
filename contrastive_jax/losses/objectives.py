"""The contrastive objective family, written on the streaming pair kernel.

Every function takes GLOBAL ``[B, D]`` embeddings (batch-sharded ``jax.Array``s are fine inside
the caller's ``jit``) and an ``impl``: ``"dense"`` materializes the [B, B] logits (the reference),
``"chunked"`` / ``"ring"`` stream over blocks with :func:`.kernels.pair_stats` (the one driver of
:mod:`.streaming`) and never hold a [B, B] array. Shared keyword arguments:

* ``scale``: float scalar or ``[B]`` per-row scale ``1 / temperature`` (already exponentiated);
* ``impl``, ``block_size``, ``mesh``, ``batch_axes``: as in :func:`.contrastive.softmax_contrastive_loss`;
* ``valid``: optional bool ``[B]``; ``False`` rows are padding, removed as rows and columns.

Each returns ``(loss, metrics)``: a float32 scalar (mean over valid anchors) and a dict of float32
scalars. Logits are always ``l_ij = scale_i * <x_i, y_j>``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from contrastive_jax.losses import kernels
from contrastive_jax.losses.contrastive import softmax_contrastive_loss
from contrastive_jax.losses.inputs import check_pair, example_mask, per_row
from contrastive_jax.losses.streaming import dot_nt

F32 = jnp.float32
Array = jax.Array

__all__ = [
    "decoupled_contrastive_loss", "hard_negative_loss", "soft_target_loss", "multi_positive_loss",
    "sigmoid_multi_positive_loss", "nt_xent_loss", "matryoshka_prefixes", "symile_loss",
    "similarity_distillation_loss", "alignment", "uniformity", "TARGET_FUNCTIONS",
]


def _prep(x, y, scale, valid, impl):
    """(float32 [B] per-row scale, bool [B] mask) after checking impl and shapes."""
    check_pair(x, y, impl)
    B = x.shape[0]
    return per_row(scale, B, "scale"), example_mask(valid, B)


def _mean(per, valid):
    vf = valid.astype(F32)
    return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.maximum(jnp.sum(vf), 1.0)


def _diag(x, y, s):
    return s * jnp.einsum("bd,bd->b", x, y, preferred_element_type=F32)


def _off_diag(r, c, cos):
    return r["gid"][:, None] != c["gid"][None, :]


def _kw(impl, block_size, mesh, batch_axes):
    return dict(impl=impl, block_size=int(block_size), mesh=mesh, batch_axes=batch_axes)


# --------------------------------------------------------------------------------------------
# 1. DCL / DCLW
# --------------------------------------------------------------------------------------------


def decoupled_contrastive_loss(x, y, *, scale, sigma: float = 0.0, valid=None, impl="dense",
                               block_size=1024, mesh=None, batch_axes=None):
    """Decoupled contrastive loss (Yeh et al. 2022, "Decoupled Contrastive Learning", ECCV).

    InfoNCE with the positive pair removed from the denominator, both directions averaged:

        row_i = -w_i l_ii + log sum_{j != i} exp(l_ij),   col_j likewise over i.

    ``sigma = 0``: DCL, ``w_i = 1``. ``sigma > 0``: DCLW, the von Mises-Fisher weighting of the
    positive term ``w_i = 2 - exp(c_ii / sigma) / mean_k exp(c_kk / sigma)`` with ``c_ii =
    <x_i, y_i>`` (mean over valid k; weights average to 1 and grow for hard positives). The
    weight is a function of the B positive pairs only, so it is O(B) and differentiated.
    A batch of one valid example has no negatives: its loss is not defined (-inf terms).
    """
    s, v = _prep(x, y, scale, valid, impl)
    st = kernels.pair_stats(x, y, s, v, alphas=(1.0,), mask_fn=_off_diag, **_kw(impl, block_size, mesh, batch_axes))
    c = jnp.einsum("bd,bd->b", x, y, preferred_element_type=F32)
    if sigma:
        e = jnp.where(v, c / sigma, -jnp.inf)
        w = 2.0 - jnp.sum(v) * jax.nn.softmax(e)
    else:
        w = jnp.ones_like(c)
    pos = w * s * c
    per = 0.5 * ((st["lse_r"][:, 0] - pos) + (st["lse_c"][:, 0] - pos))
    loss = _mean(per, v)
    return loss, {"pos_weight_min": jnp.min(jnp.where(v, w, jnp.inf))}


# --------------------------------------------------------------------------------------------
# 2. hard-negative reweighting with debiasing and false-negative masking
# --------------------------------------------------------------------------------------------


def hard_negative_loss(x, y, *, scale, beta: float = 1.0, tau_plus: float = 0.0, fn_threshold: float = 1.0,
                       constant_weights: bool = False, valid=None, impl="dense", block_size=1024, mesh=None,
                       batch_axes=None):
    """Hard-negative sampling (Robinson et al. 2021, "Contrastive Learning with Hard Negative
    Samples", ICLR), image->text and text->image averaged.

    For anchor i with positive ``p = exp(l_ii)`` and the M_i kept negatives j:

        R_i  = M_i * sum_j exp((1 + beta) l_ij) / sum_j exp(beta l_ij)   (importance-weighted)
        N_i  = max((R_i - tau_plus * M_i * p) / (1 - tau_plus), M_i * exp(-scale_i))
        row_i = log(p + N_i) - l_ii

    The negatives' weights ``exp(beta l_ij)`` are normalized to mean 1, so beta = 0 and
    tau_plus = 0 give InfoNCE exactly. ``tau_plus`` is the class prior of the debiased estimator
    (Chuang et al. 2020); the floor ``M exp(-scale)`` is the smallest value the negative term can
    take for unit vectors. Pairs with cosine ``<x_i, y_j> > fn_threshold`` are treated as false
    negatives and dropped (``fn_threshold >= 1`` disables). Both log-sum-exps stream.

    ``constant_weights=True`` keeps the value and treats the importance weights ``exp(beta l_ij)``
    (and their mean) as constants of the backward pass, as a sampling distribution is in importance
    sampling: d R_i / d l_ij = R_i * softmax_j((1 + beta) l_i.), so every negative is pushed away,
    the harder ones more. In the paper's form (False, its released code) the weights are
    differentiated too: d log R_i / d l_ij = (1 + beta) w1_ij - beta w0_ij (w1, w0 the softmaxes
    of (1 + beta) l and beta l), which is negative for negatives below the weighted mean, i.e.
    easy negatives are pulled CLOSER. On ``shapes`` that pull turned the zero-shot size classifier
    (prompts averaged over the other attributes) upside down (docs/benchmarks.md).
    """
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1); got {tau_plus}")
    s, v = _prep(x, y, scale, valid, impl)
    thr = float(fn_threshold)

    def keep(r, c, cos):
        k = _off_diag(r, c, cos)
        return k & (cos <= thr) if thr < 1.0 else k

    count = lambda r, c, cos: (keep(r, c, cos).astype(F32),) * 2
    st = kernels.pair_stats(x, y, s, v, alphas=(1.0 + beta, beta), mask_fn=keep, weight_fn=count,
                            **_kw(impl, block_size, mesh, batch_axes))
    pos = _diag(x, y, s)

    def direction(lse, m):
        log_m = jnp.log(jnp.maximum(m, 1.0))
        log_r = log_m + lse[:, 0] - lse[:, 1]
        if constant_weights:
            # Same value; the gradient of log sum exp((1 + beta) l) divided by (1 + beta), i.e.
            # softmax((1 + beta) l): the factor exp(beta l) of each term and the normalizer are constants.
            hi = lse[:, 0]
            log_r = jax.lax.stop_gradient(log_r) + (hi - jax.lax.stop_gradient(hi)) / (1.0 + beta)
        # exp() of values shifted by a (constant) max keeps the debiasing difference finite.
        c = jax.lax.stop_gradient(jnp.maximum(jnp.maximum(log_r, pos), log_m - s))
        num = jnp.exp(log_r - c) - tau_plus * m * jnp.exp(pos - c)
        floor = (1.0 - tau_plus) * m * jnp.exp(-s - c)
        log_n = jnp.log(jnp.maximum(num, floor)) + c - jnp.log1p(-tau_plus)
        return jnp.logaddexp(pos, log_n) - pos

    per = 0.5 * (direction(st["lse_r"], st["w_r"]) + direction(st["lse_c"], st["w_c"]))
    n_valid = jnp.sum(v.astype(F32))
    masked_frac = 1.0 - jnp.sum(jnp.where(v, st["w_r"], 0.0)) / jnp.maximum(n_valid * (n_valid - 1), 1.0)
    return _mean(per, v), {"fn_masked_frac": masked_frac}


# --------------------------------------------------------------------------------------------
# 3./4. target-weighted softmax: CWCL soft targets, multi-positive groups, SupCon
# --------------------------------------------------------------------------------------------


def cwcl_targets(cos_t):
    """CWCL's continuous target weights ``(1 + cos) / 2`` in [0, 1] from target cosines."""
    return 0.5 * (1.0 + cos_t)


def identity_targets(cos_t):
    """One-hot targets for unit vectors without duplicates (cos == 1 only on the diagonal)."""
    return (cos_t >= 1.0 - 1e-6).astype(F32)


TARGET_FUNCTIONS: dict[str, Callable] = {"cwcl": cwcl_targets, "identity": identity_targets}


def _target_weighted(x, y, s, v, weight_fn, extra, mask_fn, bidirectional, kw):
    st = kernels.pair_stats(x, y, s, v, alphas=(1.0,), with_col=bidirectional, mask_fn=mask_fn,
                            weight_fn=weight_fn, row_extra=extra, col_extra=extra, **kw)
    # A row whose targets are all zero has no defined target distribution: excluded.
    ok_r = v & (st["w_r"] > 0)
    row = st["lse_r"][:, 0] - st["wl_r"] / jnp.where(ok_r, st["w_r"], 1.0)
    if not bidirectional:
        return _mean(row, ok_r)
    ok_c = v & (st["w_c"] > 0)
    col = st["lse_c"][:, 0] - st["wl_c"] / jnp.where(ok_c, st["w_c"], 1.0)
    return 0.5 * (_mean(row, ok_r) + _mean(col, ok_c))


def soft_target_loss(x, y, *, scale, targets, target_fn: Callable | str = "cwcl", valid=None,
                     impl="dense", block_size=1024, mesh=None, batch_axes=None):
    """Continuously weighted contrastive loss (CWCL; Srinivasa et al. 2023, "CWCL: Cross-Modal
    Transfer with Continuously Weighted Contrastive Loss", NeurIPS) and its general form.

    With target weights ``w_ij = f(<t_i, t_j>)`` from ``targets`` ``[B, Dt]`` (unit vectors of a
    typically frozen modality; no gradient), each direction is

        row_i = -sum_j w_ij log softmax_j(l_i.)_j / sum_j w_ij

    averaged over both directions. ``f = cwcl_targets`` is CWCL's ``(1 + cos) / 2``;
    ``target_fn`` may be any name in :data:`TARGET_FUNCTIONS` or a jnp-traceable callable of the
    ``[rb, cb]`` target-cosine tile (values in any range >= 0). The weights are recomputed per
    block in the forward and backward, so ``chunked`` / ``ring`` hold no [B, B] array.
    """
    s, v = _prep(x, y, scale, valid, impl)
    f = TARGET_FUNCTIONS[target_fn] if isinstance(target_fn, str) else target_fn
    if targets.ndim != 2 or targets.shape[0] != x.shape[0]:
        raise ValueError(f"targets must be [B={x.shape[0]}, Dt]; got {targets.shape}")

    def weights(r, c, cos):
        w = f(dot_nt(r["t"], c["t"]))
        return w, w

    return _target_weighted(x, y, s, v, weights, {"t": targets}, None, True,
                            _kw(impl, block_size, mesh, batch_axes)), {}


def _check_groups(groups, B):
    g = jnp.asarray(groups)
    if g.shape != (B,) or not jnp.issubdtype(g.dtype, jnp.integer):
        raise ValueError(f"group ids must be an integer [B]={B} array; got {g.dtype}{list(g.shape)}")
    return g.astype(jnp.int32)


def multi_positive_loss(x, y, *, scale, groups, exclude_self: bool = False, bidirectional: bool = True,
                        valid=None, impl="dense", block_size=1024, mesh=None, batch_axes=None):
    """Softmax contrastive loss with every same-group pair a positive.

    ``row_i = log sum_{j in A(i)} exp(l_ij) - mean_{p in P(i)} l_ip`` with ``P(i) = {j : g_j = g_i}``
    (several captions per image share the image's group id). ``exclude_self=True`` is the
    supervised contrastive loss (SupCon "L_out", Khosla et al. 2020, "Supervised Contrastive
    Learning"): x and y are the same set of views, self-pairs leave both ``A(i)`` and ``P(i)``.
    With unique groups it is InfoNCE (``exclude_self=False``).
    """
    s, v = _prep(x, y, scale, valid, impl)
    g = _check_groups(groups, x.shape[0])

    def weights(r, c, cos):
        w = (r["g"][:, None] == c["g"][None, :]).astype(F32)
        if exclude_self:
            w = w * _off_diag(r, c, cos)
        return w, w

    return _target_weighted(x, y, s, v, weights, {"g": g}, _off_diag if exclude_self else None, bidirectional,
                            _kw(impl, block_size, mesh, batch_axes)), {}


def nt_xent_loss(views, *, scale, valid=None, impl="dense", block_size=1024, mesh=None, batch_axes=None):
    """SimCLR's NT-Xent (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations") for ``V >= 2`` views.

    ``views``: ``[B, V, D]`` unit vectors. The ``B*V`` views form a ``BV x BV`` similarity with
    the self-similarity excluded; each view's positives are the other ``V - 1`` views of its
    example (for V = 2 exactly the paper's 2N x 2N loss, mean over all 2N anchors). ``scale``
    is ``1 / temperature`` (scalar). ``valid`` is per example ``[B]``.
    """
    if views.ndim != 3 or views.shape[1] < 2:
        raise ValueError(f"views must be [B, V >= 2, D]; got {views.shape}")
    B, V, D = views.shape
    z = views.reshape(B * V, D)
    g = jnp.repeat(jnp.arange(B, dtype=jnp.int32), V)
    v = None if valid is None else jnp.repeat(jnp.asarray(valid).astype(bool), V)
    return multi_positive_loss(z, z, scale=scale, groups=g, exclude_self=True, bidirectional=False, valid=v,
                               impl=impl, block_size=block_size, mesh=mesh, batch_axes=batch_axes)


def sigmoid_multi_positive_loss(x, y, *, scale, bias, groups, valid=None, impl="dense", block_size=1024,
                                mesh=None, batch_axes=None):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) with the label matrix from group ids:
    ``z_ij = +1`` if ``g_i == g_j`` else ``-1``; ``loss = mean_i sum_j softplus(-z_ij t_ij)``,
    ``t_ij = l_ij + b_i``.

    Streams as ``sum_j softplus(t_ij) - sum_{j: g_j = g_i} t_ij`` (softplus(-t) = softplus(t) - t):
    the core sigmoid kernel plus a group-weighted sum of logits.
    """
    s, v = _prep(x, y, scale, valid, impl)
    B = x.shape[0]
    b = per_row(bias, B, "bias")
    g = _check_groups(groups, B)
    same = lambda r, c, cos: ((r["g"][:, None] == c["g"][None, :]).astype(F32),) * 2
    kw = _kw(impl, block_size, mesh, batch_axes)
    st = kernels.pair_stats(x, y, s, v, alphas=(), with_col=False, weight_fn=same, row_extra={"g": g},
                            col_extra={"g": g}, **kw)
    if impl == "dense":
        t = s[:, None] * jnp.dot(x, y.T, preferred_element_type=F32) + b[:, None]
        neg_sum = jnp.sum(jnp.where(v[None, :], jax.nn.softplus(t), 0.0), axis=1)
    else:
        neg_sum, _ = kernels.sigmoid_rowsum(x, y, s, b, v, **kw)
    per = neg_sum - (st["wl_r"] + b * st["w_r"])
    return _mean(per, v), {}


# --------------------------------------------------------------------------------------------
# 6. Matryoshka
# --------------------------------------------------------------------------------------------


def matryoshka_prefixes(emb, dims: Sequence[int]):
    """Nested prefixes of ``emb`` ``[..., D]``, each re-normalized to unit length (Kusupati et al.
    2022, "Matryoshka Representation Learning"). Returns a list of ``[..., d]`` arrays."""
    D = emb.shape[-1]
    out = []
    for d in dims:
        if not 0 < int(d) <= D:
            raise ValueError(f"matryoshka dim {d} outside 1..{D}")
        p = emb[..., : int(d)].astype(F32)
        out.append((p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)).astype(emb.dtype))
    return out


# --------------------------------------------------------------------------------------------
# 7. Symile
# --------------------------------------------------------------------------------------------


def symile_loss(embs: Sequence[Array], *, scale, negatives: str = "n", valid=None, impl="dense",
                block_size=1024, mesh=None, batch_axes=None):
    """Symile (Saporta et al. 2024, "Contrasting with Symile: Simple Model-Agnostic Representation
    Learning for Unlimited Modalities"), averaged over every modality as the anchor.

    The score of a tuple is the multilinear inner product ``MIP(a, b, c) = sum_d a_d b_d c_d``.
    For anchor modality m and example i the positive is the aligned tuple; the negatives

    * ``negatives="n"`` (O(N)): the B - 1 tuples ``(anchor_i, others from example j)`` where the
      other modalities of column j come from DIFFERENT examples: modality k is rolled by k
      places (a fixed derangement, so the objective is a pure function of the batch; Symile
      shuffles randomly). Streams: the diagonal is replaced by the positive via a masked
      log-sum-exp, so ``chunked`` / ``ring`` hold no [B, B] array.
    * ``negatives="n_squared"`` (O(N^2)): all ``B^(M-1)`` combinations of the other modalities.
      Each anchor needs a score for every combination, a ``[B, B^(M-1)]`` logit matrix, so this
      variant is dense only (``impl="dense"``; chunked/ring are rejected): memory O(B^M).

    Args:
      embs: M >= 3 arrays ``[B, D]`` (unit vectors). scale: scalar ``1 / temperature``.
    """
    M = len(embs)
    if M < 2:
        raise ValueError(f"symile needs at least 2 modalities; got {M}")
    if negatives not in ("n", "n_squared"):
        raise ValueError(f"symile negatives must be 'n' or 'n_squared'; got {negatives!r}")
    if negatives == "n_squared" and impl != "dense":
        raise ValueError(
            "symile negatives='n_squared' scores all B^(M-1) combinations per anchor and needs "
            f"impl='dense'; got impl={impl!r} (use negatives='n' to stream)")
    x0 = embs[0]
    s, v = _prep(x0, x0, scale, valid, impl)
    if any(e.shape != x0.shape for e in embs):
        raise ValueError(f"symile embeddings must share one [B, D] shape; got {[e.shape for e in embs]}")
    # The MIP is symmetric, so the positive score is the same for every anchor modality.
    pos = s * jnp.sum(jnp.prod(jnp.stack([e.astype(F32) for e in embs]), axis=0), axis=-1)
    terms = []
    for m in range(M):
        anchor = embs[m]
        others = [e for k, e in enumerate(embs) if k != m]
        if negatives == "n":
            q = others[0].astype(F32)
            for k, e in enumerate(others[1:], start=1):
                q = q * jnp.roll(e.astype(F32), k, axis=0)
            q = q.astype(anchor.dtype)
            st = kernels.pair_stats(anchor, q, s, v, alphas=(1.0,), with_col=False, mask_fn=_off_diag,
                                    **_kw(impl, block_size, mesh, batch_axes))
            lse = jnp.logaddexp(st["lse_r"][:, 0], pos)
        else:
            # Column (j, k, ...) = j * B^(M-2) + k * B^(M-3) + ...; the positive is (i, i, ...).
            prod, cols_valid = others[0].astype(F32), v
            for e in others[1:]:
                prod = (prod[:, None, :] * e.astype(F32)[None, :, :]).reshape(-1, prod.shape[-1])
                cols_valid = (cols_valid[:, None] & v[None, :]).reshape(-1)
            logits = s[:, None] * jnp.dot(anchor.astype(F32), prod.T)
            lse = jax.nn.logsumexp(jnp.where(cols_valid[None, :], logits, -jnp.inf), axis=1)
        terms.append(_mean(lse - pos, v))
    return sum(terms) / M, {}


# --------------------------------------------------------------------------------------------
# 8. similarity distillation (TinyCLIP affinity mimicking)
# --------------------------------------------------------------------------------------------


def similarity_distillation_loss(x, y, tx, ty, *, scale, teacher_scale, valid=None, impl="dense",
                                 block_size=1024, mesh=None, batch_axes=None):
    """Affinity mimicking (Wu et al. 2023, "TinyCLIP: CLIP Distillation via Affinity Mimicking and
    Weight Inheritance", ICCV): the KL divergence from the teacher's in-batch image->text and
    text->image distributions to the student's, averaged over anchors and both directions.

        KL_i = sum_j p^T_ij (log p^T_ij - log p^S_ij),  p^T = softmax_j(teacher_scale <tx_i, ty_j>)

    ``tx``, ``ty``: ``[B, Dt]`` teacher embeddings (frozen model or precomputed; no gradient).
    Streams as ``lse^S_i - sum_j p^T_ij l^S_ij`` plus the teacher's negative entropy, with the
    teacher probabilities recomputed per block from the teacher's O(B) log-sum-exps (three
    streaming passes: teacher LSE, student, teacher entropy; the teacher passes have no backward).
    """
    s, v = _prep(x, y, scale, valid, impl)
    if tx.shape[0] != x.shape[0] or ty.shape != tx.shape or tx.ndim != 2:
        raise ValueError(f"teacher embeddings must be [B={x.shape[0]}, Dt] each; got {tx.shape}, {ty.shape}")
    tx, ty = jax.lax.stop_gradient(tx), jax.lax.stop_gradient(ty)
    ts = jax.lax.stop_gradient(per_row(teacher_scale, x.shape[0], "teacher_scale"))
    kw = _kw(impl, block_size, mesh, batch_axes)
    t_st = jax.lax.stop_gradient(kernels.pair_stats(tx, ty, ts, v, alphas=(1.0,), **kw))
    rex = dict(tx=tx, ts=ts, lse=t_st["lse_r"][:, 0])
    cex = dict(ty=ty, lse=t_st["lse_c"][:, 0])

    def teacher_probs(r, c, cos):
        lt = r["ts"][:, None] * dot_nt(r["tx"], c["ty"])
        return jnp.exp(lt - r["lse"][:, None]), jnp.exp(lt - c["lse"][None, :])

    st = kernels.pair_stats(x, y, s, v, alphas=(1.0,), weight_fn=teacher_probs, row_extra=rex, col_extra=cex, **kw)
    te = jax.lax.stop_gradient(kernels.pair_stats(tx, ty, ts, v, alphas=(), weight_fn=teacher_probs,
                                                  row_extra=rex, col_extra=cex, **kw))
    # sum_j p^T log p^T = sum_j p^T l^T - lse^T (the p^T sum to 1 over valid columns).
    neg_ent_r = te["wl_r"] - t_st["lse_r"][:, 0]
    neg_ent_c = te["wl_c"] - t_st["lse_c"][:, 0]
    kl_r = neg_ent_r - st["wl_r"] + st["lse_r"][:, 0]
    kl_c = neg_ent_c - st["wl_c"] + st["lse_c"][:, 0]
    return _mean(0.5 * (kl_r + kl_c), v), {}


# --------------------------------------------------------------------------------------------
# 9. alignment and uniformity
# --------------------------------------------------------------------------------------------


def alignment(x, y, *, alpha: float = 2.0, valid=None):
    """Alignment (Wang & Isola 2020, "Understanding Contrastive Representation Learning through
    Alignment and Uniformity on the Hypersphere"): ``mean_i ||x_i - y_i||^alpha``. O(B*D)."""
    v = jnp.ones(x.shape[:1], bool) if valid is None else jnp.asarray(valid).astype(bool)
    d = jnp.sum(jnp.square(x.astype(F32) - y.astype(F32)), axis=-1)
    return _mean(d ** (alpha / 2.0), v)


def uniformity(x, *, t: float = 2.0, valid=None, impl="dense", block_size=1024, mesh=None, batch_axes=None):
    """Uniformity (Wang & Isola 2020): ``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over valid
    pairs, for unit vectors ``x`` ``[B, D]``. Uses ``||x_i - x_j||^2 = 2 - 2 <x_i, x_j>``, so it is
    a log-sum-exp of ``2t <x_i, x_j>`` over the off-diagonal pairs and streams like the losses."""
    s, v = _prep(x, x, 2.0 * t, valid, impl)
    st = kernels.pair_stats(x, x, s, v, alphas=(1.0,), with_col=False, mask_fn=_off_diag,
                            **_kw(impl, block_size, mesh, batch_axes))
    n = jnp.sum(v.astype(F32))
    total = jax.nn.logsumexp(jnp.where(v, st["lse_r"][:, 0], -jnp.inf))
    return total - 2.0 * t - jnp.log(n * (n - 1.0))


def softmax_loss(x, y, *, scale, valid=None, impl="dense", block_size=1024, mesh=None, batch_axes=None) -> Any:
    """CLIP InfoNCE as ``(loss, metrics)`` with the objective-family signature."""
    return softmax_contrastive_loss(x, y, scale=scale, valid=valid, impl=impl, block_size=block_size, mesh=mesh,
                                    batch_axes=batch_axes, return_metrics=True)
