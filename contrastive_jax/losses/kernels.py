"""The streamed statistics of the losses, as kernels of the one driver in :mod:`.streaming`.

Only the parts of a loss that are NOT linear in the logits need a pass over all B^2 pairs; the
callers add the linear parts (positive logits, label smoothing) with O(B*D) jnp ops. Two kernels
cover every loss of the package, each one tile function for the forward and one ``dL/dt`` tile
function for the (shared) block-recompute backward:

* :func:`pair_stats`: masked, multi-temperature log-sum-exps and target-weighted logit sums,
  per row and per column of ``l_ij = s_i <x_i, y_j>``. The softmax loss (CLIP, Radford et al.
  2021) is its plainest case; the objectives of :mod:`.objectives` need the rest:

  - a *mask* removing pairs from the softmax denominators (DCL drops the positives, SupCon drops
    self-pairs, hard-negative sampling drops suspected false negatives above a cosine threshold);
  - *several temperatures* of the same logits (hard-negative reweighting needs
    ``log sum_j exp((1 + beta) l_ij)`` and ``log sum_j exp(beta l_ij)``);
  - *weighted sums* ``sum_j W_ij l_ij`` and ``sum_j W_ij`` with target weights ``W`` that are
    constants for the gradient (CWCL soft targets, multi-positive targets, distillation targets).

* :func:`sigmoid_rowsum`: per-row sums ``sum_j softplus(s_i <x_i, y_j> + b_i)`` (SigLIP, Zhai et
  al. 2023: every pair scored as a negative; the caller corrects the positive pair, a linear term).

Both can also track, for the in-batch metrics, the largest logit among the OTHER valid examples
of each row and column.

Mask and weight functions receive the row block ``r`` and column block ``c`` as dicts: ``gid``
(global example index, int32 [rb] / [cb]) plus the caller's ``row_extra`` / ``col_extra`` arrays
under their own names (leading dim the block), and ``cos``, the unscaled ``<x_i, y_j>`` tile
(float32 [rb, cb]). They must be pure jnp functions of these and are recomputed per tile in the
forward and the backward, so ``chunked`` / ``ring`` hold no [B, B] array.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from contrastive_jax.losses import streaming
from contrastive_jax.losses.streaming import NEG, dot_nt

F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# pieces shared by both kernels
# --------------------------------------------------------------------------------------------


def _track_max_off(r, rst, c, cst, t):
    """Running max of the off-diagonal (i != j) logits over valid columns / rows (metrics)."""
    to = jnp.where(r["gid"][:, None] == c["gid"][None, :], -jnp.inf, t)
    rst["mo"] = jnp.maximum(rst["mo"], jnp.max(to + c["mb"][None, :], axis=1))
    cst["mo"] = jnp.maximum(cst["mo"], jnp.max(to + r["mb"][:, None], axis=0))


def _merge_cols(st, axes):
    """Chunked on a mesh: merge partial column states by their names (``m<k>``/``l<k>``: online
    log-sum-exp; ``wl``, ``w``: sums; ``mo``: max)."""
    out = {}
    for key in st:
        if key[0] == "m" and key[1:].isdigit():
            out[key], out["l" + key[1:]] = streaming.merge_logsumexp(st[key], st["l" + key[1:]], axes)
        elif key in ("wl", "w"):
            out[key] = streaming.merge_sum(st[key], axes)
        elif key == "mo":
            out[key] = streaming.merge_max(st[key], axes)
    return out


def _add(g, term):
    # Starting from the first term (not from zeros) keeps the plain softmax gradient bit-identical
    # to a hand-written one.
    return term if g is None else g + term


# --------------------------------------------------------------------------------------------
# pair_stats: masked multi-temperature log-sum-exps and target-weighted sums
# --------------------------------------------------------------------------------------------


class _PairSpec(NamedTuple):
    alphas: tuple  # temperatures multiplying the logits, one log-sum-exp each
    with_col: bool
    mask_fn: Callable | None  # (r, c, cos) -> bool [rb, cb] kept pairs, or None (all kept)
    weight_fn: Callable | None  # (r, c, cos) -> (W_row, W_col) float32 [rb, cb], or None
    with_metrics: bool


def _pair_bias(spec, r, c, cos):
    """Additive mask of the pairs ``mask_fn`` drops (None: no mask)."""
    if spec.mask_fn is None:
        return None
    return jnp.where(spec.mask_fn(r, c, cos), 0.0, NEG).astype(F32)


def _tempered(a, l, pb):
    """``a * l + pair_bias`` without the identity operations (a == 1, no mask)."""
    al = l if a == 1.0 else a * l
    return al if pb is None else al + pb


def _target_weights(spec, r, c, cos):
    """Row and column target weights of a tile, zero on padded / invalid rows and columns."""
    wr, wc = spec.weight_fn(r, c, cos)
    ok = (r["mb"] == 0)[:, None] & (c["mb"] == 0)[None, :]
    wr = jnp.where(ok, jnp.asarray(wr, F32), 0.0)
    wc = jnp.where(ok, jnp.asarray(wc, F32), 0.0)
    return lax.stop_gradient(wr), lax.stop_gradient(wc)


def _pair_forward(spec):
    def forward(r, rst, c, cst, cos, l):
        rst, cst = dict(rst), dict(cst)
        pb = _pair_bias(spec, r, c, cos)
        for k, a in enumerate(spec.alphas):
            al = _tempered(a, l, pb)
            m, s = f"m{k}", f"l{k}"
            rst[m], rst[s] = streaming.online_logsumexp(rst[m], rst[s], al + c["mb"][None, :], 1)
            if spec.with_col:
                cst[m], cst[s] = streaming.online_logsumexp(cst[m], cst[s], al + r["mb"][:, None], 0)
        if spec.weight_fn is not None:
            wr, wc = _target_weights(spec, r, c, cos)
            rst.update(wl=rst["wl"] + jnp.sum(wr * l, 1), w=rst["w"] + jnp.sum(wr, 1))
            if spec.with_col:
                cst.update(wl=cst["wl"] + jnp.sum(wc * l, 0), w=cst["w"] + jnp.sum(wc, 0))
        if spec.with_metrics:
            _track_max_off(r, rst, c, cst, l)
        return rst, cst

    return forward


def _pair_state(spec, col):
    def init(n, b):
        st = {}
        if spec.with_col or not col:
            for k in range(len(spec.alphas)):
                st.update({f"m{k}": jnp.full((n, b), -jnp.inf, F32), f"l{k}": jnp.full((n, b), 0.0, F32)})
            if spec.weight_fn is not None:
                st.update(wl=jnp.zeros((n, b), F32), w=jnp.zeros((n, b), F32))
        if spec.with_metrics:
            st["mo"] = jnp.full((n, b), -jnp.inf, F32)
        return st

    return init


def _pair_finish(spec):
    def finish(rst, cst):
        out = {}
        if spec.alphas:
            lse = lambda st: jnp.stack([st[f"m{k}"] + jnp.log(st[f"l{k}"]) for k in range(len(spec.alphas))], -1)
            out["lse_r"] = lse(rst)
            out["lse_c"] = lse(cst) if spec.with_col else jnp.zeros_like(out["lse_r"])
        if spec.weight_fn is not None:
            out.update(wl_r=rst["wl"], w_r=rst["w"])
            col = cst if spec.with_col else dict(wl=jnp.zeros_like(rst["wl"]), w=jnp.zeros_like(rst["w"]))
            out.update(wl_c=col["wl"], w_c=col["w"])
        if spec.with_metrics:
            out.update(max_off_r=rst["mo"], max_off_c=cst["mo"])
        return out

    return finish


def _pair_grad_inputs(spec):
    # Underscored names are the kernel's own; caller extras may not start with "_".
    def grad_inputs(out, ct):
        rows, cols = {}, {}
        for k in range(len(spec.alphas)):
            rows.update({f"_lse{k}": out["lse_r"][:, k], f"_g{k}": ct["lse_r"][:, k].astype(F32)})
            if spec.with_col:
                cols.update({f"_lse{k}": out["lse_c"][:, k], f"_g{k}": ct["lse_c"][:, k].astype(F32)})
        if spec.weight_fn is not None:
            rows["_gw"] = ct["wl_r"].astype(F32)
            if spec.with_col:
                cols["_gw"] = ct["wl_c"].astype(F32)
        return rows, cols

    return grad_inputs


def _pair_grad(spec):
    """dL/dl: d lse_i / d l_ij = a * softmax weight, d wl_i / d l_ij = W_ij (W constant)."""

    def grad(r, c, cos, l):
        pb = _pair_bias(spec, r, c, cos)
        g = None
        for k, a in enumerate(spec.alphas):
            al = _tempered(a, l, pb)
            gr = r[f"_g{k}"] if a == 1.0 else a * r[f"_g{k}"]
            g = _add(g, gr[:, None] * jnp.exp(al + (c["mb"][None, :] - r[f"_lse{k}"][:, None])))
            if spec.with_col:
                gc = c[f"_g{k}"] if a == 1.0 else a * c[f"_g{k}"]
                g = _add(g, gc[None, :] * jnp.exp(al + (r["mb"][:, None] - c[f"_lse{k}"][None, :])))
        if spec.weight_fn is not None:
            wr, wc = _target_weights(spec, r, c, cos)
            g = _add(g, r["_gw"][:, None] * wr)
            if spec.with_col:
                g = _add(g, c["_gw"][None, :] * wc)
        return jnp.zeros_like(l) if g is None else g

    return grad


def _pair_kernel(spec) -> streaming.Kernel:
    return streaming.Kernel(
        forward=_pair_forward(spec), row_init=_pair_state(spec, col=False), col_init=_pair_state(spec, col=True),
        col_merge=_merge_cols, finish=_pair_finish(spec), grad_inputs=_pair_grad_inputs(spec), grad=_pair_grad(spec))


def pair_stats(
    x, y, s, valid, *, alphas: tuple = (1.0,), with_col: bool = True,
    mask_fn: Callable | None = None, weight_fn: Callable | None = None,
    row_extra: dict | None = None, col_extra: dict | None = None, with_metrics: bool = False,
    impl: str = "chunked", block_size: int = 1024, mesh=None, batch_axes=None,
) -> dict:
    """Masked multi-temperature log-sum-exps and target-weighted sums of ``l = s x y^T``.

    Args:
      x, y: ``[B, D]`` float32/bfloat16 (rows / columns). ``s``: float32 ``[B]`` per-row scale.
      valid: bool ``[B]``; invalid examples are removed as rows and as columns.
      alphas: static floats ``a_k``; output ``lse_r[i, k] = log sum_{j valid, kept} exp(a_k l_ij)``
        (and ``lse_c[j, k]`` over i when ``with_col``). ``()``: no log-sum-exp.
      mask_fn: ``(r, c, cos) -> bool [rb, cb]``: pairs kept in the log-sum-exps (None: all).
      weight_fn: ``(r, c, cos) -> (W_row, W_col)`` float ``[rb, cb]``: constant target weights;
        outputs ``wl_r[i] = sum_j W_row_ij l_ij``, ``w_r[i] = sum_j W_row_ij`` (and the column
        sums ``wl_c``, ``w_c`` over i with ``W_col``), valid pairs only.
      row_extra / col_extra: dicts of ``[B, ...]`` arrays visible to the two functions under
        their names in ``r`` / ``c`` (no gradient flows to them).
      with_metrics: also output ``max_off_r[i] = max_{j != i valid} l_ij`` and ``max_off_c``
        (over i), float32 ``[B]``, -inf where there is none; no gradient.
      impl: ``"dense"`` evaluates the same formulas on the materialized [B, B] logits, XLA-
        differentiated (the reference path); ``"chunked"`` / ``"ring"`` stream (:mod:`.streaming`).

    Returns:
      dict of float32 arrays: ``lse_r``, ``lse_c`` ``[B, K]`` (``lse_c`` zeros without
      ``with_col``); ``wl_r``, ``w_r``, ``wl_c``, ``w_c`` ``[B]``; ``max_off_r``, ``max_off_c``
      ``[B]``. Differentiable in x, y, s.
    """
    streaming.check_impl(impl)
    for k in list(row_extra or {}) + list(col_extra or {}):
        if k.startswith("_") or k in ("x", "y", "s", "b", "mb", "gid"):
            raise ValueError(f"pair_stats extra name {k!r} is reserved (x, y, s, b, mb, gid, _*)")
    spec = _PairSpec(tuple(float(a) for a in alphas), bool(with_col), mask_fn, weight_fn, bool(with_metrics))
    if impl == "dense":
        out = _dense(spec, x, y, s, jnp.where(valid, 0.0, NEG).astype(F32), row_extra or {}, col_extra or {})
    else:
        out = streaming.stream(_pair_kernel(spec), x, y, s, valid, row_extra=row_extra, col_extra=col_extra,
                               impl=impl, block_size=block_size, mesh=mesh, batch_axes=batch_axes)
    if with_metrics:
        out.update(max_off_r=lax.stop_gradient(out["max_off_r"]), max_off_c=lax.stop_gradient(out["max_off_c"]))
    return out


def _dense(spec, x, y, s, mb, rex, cex):
    """The materialized [B, B] reference (XLA inserts any all-gather), differentiated by XLA."""
    rex = {k: lax.stop_gradient(v) for k, v in rex.items()}
    cex = {k: lax.stop_gradient(v) for k, v in cex.items()}
    gid = jnp.arange(x.shape[0], dtype=jnp.int32)
    r = dict(rex, x=x, s=s, mb=mb, gid=gid)
    c = dict(cex, y=y, mb=mb, gid=gid)
    cos = dot_nt(x, y)
    l = s[:, None] * cos
    pb = _pair_bias(spec, r, c, cos)
    out = {}
    if spec.alphas:
        a = jnp.asarray(spec.alphas, F32)[None, None, :]
        al = a * l[..., None] + pb[..., None] if pb is not None else a * l[..., None]
        out["lse_r"] = jax.nn.logsumexp(al + mb[None, :, None], axis=1)
        out["lse_c"] = (jax.nn.logsumexp(al + mb[:, None, None], axis=0) if spec.with_col
                        else jnp.zeros_like(out["lse_r"]))
    if spec.weight_fn is not None:
        wr, wc = _target_weights(spec, r, c, cos)
        out.update(wl_r=jnp.sum(wr * l, 1), w_r=jnp.sum(wr, 1), wl_c=jnp.sum(wc * l, 0), w_c=jnp.sum(wc, 0))
    if spec.with_metrics:
        st = {"mo": jnp.full(mb.shape, -jnp.inf, F32)}
        cst = dict(st)
        _track_max_off(r, st, c, cst, l)
        out.update(max_off_r=st["mo"], max_off_c=cst["mo"])
    return out


# --------------------------------------------------------------------------------------------
# sigmoid_rowsum: per-row sums of softplus(t)
# --------------------------------------------------------------------------------------------


def _sigmoid_kernel(with_metrics: bool) -> streaming.Kernel:
    def forward(r, rst, c, cst, cos, t):
        rst, cst = dict(rst, acc=rst["acc"] + jnp.sum(jax.nn.softplus(t + c["mb"][None, :]), axis=1)), dict(cst)
        if with_metrics:
            _track_max_off(r, rst, c, cst, t)
        return rst, cst

    def row_init(n, b):
        st = dict(acc=jnp.full((n, b), 0.0, F32))
        if with_metrics:
            st["mo"] = jnp.full((n, b), -jnp.inf, F32)
        return st

    def col_init(n, b):
        return dict(mo=jnp.full((n, b), -jnp.inf, F32)) if with_metrics else {}

    def finish(rst, cst):
        out = dict(rowsum=rst["acc"])
        if with_metrics:
            out.update(max_off_r=rst["mo"], max_off_c=cst["mo"])
        return out

    return streaming.Kernel(
        forward=forward, row_init=row_init, col_init=col_init, col_merge=_merge_cols, finish=finish,
        grad_inputs=lambda out, ct: (dict(_g=ct["rowsum"].astype(F32)), {}),
        # d softplus(t) / dt = sigmoid(t); masked columns have sigmoid(NEG) = 0.
        grad=lambda r, c, cos, t: r["_g"][:, None] * jax.nn.sigmoid(t + c["mb"][None, :]))


def sigmoid_rowsum(x, y, s, bias, valid, *, impl, block_size, mesh=None, batch_axes=None, with_metrics=False):
    """``sum_{j valid} softplus(s_i <x_i, y_j> + b_i)`` per row, streamed (``impl`` chunked/ring).

    Args:
      x, y: ``[B, D]`` float32/bfloat16. s, bias: float32 ``[B]`` per-row scale and bias.
      valid: bool ``[B]``; invalid examples are removed as rows and columns.

    Returns:
      ``(rowsum, aux)``: float32 ``[B]``, differentiable in x, y, s, bias; ``aux = (max_off_r,
      max_off_c)`` (largest logit ``t`` among the other valid examples, no gradient) if
      ``with_metrics`` else ``()``.
    """
    out = streaming.stream(_sigmoid_kernel(bool(with_metrics)), x, y, s, valid, bias=bias, impl=impl,
                           block_size=block_size, mesh=mesh, batch_axes=batch_axes)
    aux = (out["max_off_r"], out["max_off_c"]) if with_metrics else ()
    return out["rowsum"], lax.stop_gradient(aux)
