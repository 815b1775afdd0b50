"""Streaming kernel with per-pair masks and weights, for the objective family.

The core kernels in :mod:`._streaming` know one kind of pair: the diagonal is the positive, all
else a negative. The objectives of :mod:`.objectives` need more, always as a function of the two
examples of a pair that can be evaluated on one (row block x column block) tile:

* a *mask* removing pairs from the softmax denominators (DCL drops the positives, SupCon drops
  self-pairs, hard-negative sampling drops suspected false negatives above a cosine threshold);
* *several temperatures* of the same logits (hard-negative reweighting needs
  ``log sum_j exp((1 + beta) l_ij)`` and ``log sum_j exp(beta l_ij)``);
* *weighted sums* ``sum_j W_ij l_ij`` and ``sum_j W_ij`` with target weights ``W`` that are
  constants for the gradient (CWCL soft targets, multi-positive targets, distillation targets).

:func:`pair_stats` computes all of them for rows and columns of ``l_ij = s_i <x_i, y_j>`` in one
sweep of the same drivers as the core kernels (single device, ``chunked`` all-gather of column
blocks, ``ring`` ppermute), under a ``custom_vjp`` that saves only the O(B) statistics and
recomputes every tile (mask, weights and logits) in the backward. No [B, B] array exists.

Mask and weight functions receive the row block ``r`` and column block ``c`` as dicts: ``gid``
(global example index, int32 [rb] / [cb]), ``cos`` is passed separately (the unscaled ``<x_i,
y_j>`` tile, float32 [rb, cb]), plus the caller's ``row_extra`` / ``col_extra`` arrays under their
own names (leading dim the block). They must be pure jnp functions of these.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from contrastive_jax.losses import _streaming as S

F32 = jnp.float32
NEG = S.NEG


class _PCfg(NamedTuple):
    impl: str
    block_size: int
    mesh: Any
    axes: Any
    alphas: tuple  # temperatures multiplying the logits, one LSE each
    with_col: bool
    mask_fn: Any  # (r, c, cos) -> bool [rb, cb] kept pairs, or None (all kept)
    weight_fn: Any  # (r, c, cos) -> (W_row, W_col) float32 [rb, cb], or None


def _pair_bias(cfg, r, c, cos):
    if cfg.mask_fn is None:
        return 0.0
    return jnp.where(cfg.mask_fn(r, c, cos), 0.0, NEG).astype(F32)


def _weights(cfg, r, c, cos):
    """Row and column target weights of a tile, zero on padded / invalid rows and columns."""
    wr, wc = cfg.weight_fn(r, c, cos)
    ok = (r["mb"] == 0)[:, None] & (c["mb"] == 0)[None, :]
    wr = jnp.where(ok, jnp.asarray(wr, F32), 0.0)
    wc = jnp.where(ok, jnp.asarray(wc, F32), 0.0)
    return lax.stop_gradient(wr), lax.stop_gradient(wc)


def _online(m, lsum, z, axis):
    """One online log-sum-exp step: state (m, l) [n] and new terms z reduced along ``axis``."""
    m_new = jnp.maximum(m, jnp.max(z, axis=axis))
    zc = z - (m_new[:, None] if axis == 1 else m_new[None, :])
    return m_new, lsum * jnp.exp(m - m_new) + jnp.sum(jnp.exp(zc), axis=axis)


def _tile_fwd(cfg):
    def tile(r, rst, c, cst):
        cos = S._dot_nt(r["x"], c["y"])
        l = r["s"][:, None] * cos
        pb = _pair_bias(cfg, r, c, cos)
        rst, cst = dict(rst), dict(cst)
        if cfg.alphas:
            ms, ls, cms, cls = [], [], [], []
            for k, a in enumerate(cfg.alphas):
                al = a * l + pb
                m, s_ = _online(rst["m"][:, k], rst["l"][:, k], al + c["mb"][None, :], 1)
                ms.append(m), ls.append(s_)
                if cfg.with_col:
                    m, s_ = _online(cst["m"][:, k], cst["l"][:, k], al + r["mb"][:, None], 0)
                    cms.append(m), cls.append(s_)
            rst.update(m=jnp.stack(ms, -1), l=jnp.stack(ls, -1))
            if cfg.with_col:
                cst.update(m=jnp.stack(cms, -1), l=jnp.stack(cls, -1))
        if cfg.weight_fn is not None:
            wr, wc = _weights(cfg, r, c, cos)
            rst.update(wl=rst["wl"] + jnp.sum(wr * l, 1), w=rst["w"] + jnp.sum(wr, 1))
            if cfg.with_col:
                cst.update(wl=cst["wl"] + jnp.sum(wc * l, 0), w=cst["w"] + jnp.sum(wc, 0))
        return rst, cst

    return tile


def _tile_bwd(cfg):
    def tile(r, rst, c, cst):
        cos = S._dot_nt(r["x"], c["y"])
        l = r["s"][:, None] * cos
        pb = _pair_bias(cfg, r, c, cos)
        g = jnp.zeros_like(l)
        for k, a in enumerate(cfg.alphas):
            al = a * l + pb
            g = g + (a * r["_g"][:, k])[:, None] * jnp.exp(al + (c["mb"][None, :] - r["_lse"][:, k][:, None]))
            if cfg.with_col:
                g = g + (a * c["_g"][:, k])[None, :] * jnp.exp(al + (r["mb"][:, None] - c["_lse"][:, k][None, :]))
        if cfg.weight_fn is not None:
            wr, wc = _weights(cfg, r, c, cos)
            g = g + r["_gw"][:, None] * wr
            if cfg.with_col:
                g = g + c["_gw"][None, :] * wc
        rst = dict(rst, u=rst["u"] + S._dot_nn(g, c["y"]))
        cst = dict(cst, dy=cst["dy"] + S._dot_tn(g, S._scaled(r)))
        return rst, cst

    return tile


def _state(cfg, n, b, col):
    st = {}
    if cfg.alphas and (cfg.with_col or not col):
        K = len(cfg.alphas)
        st.update(m=jnp.full((n, b, K), -jnp.inf, F32), l=jnp.zeros((n, b, K), F32))
    if cfg.weight_fn is not None and (cfg.with_col or not col):
        st.update(wl=jnp.zeros((n, b), F32), w=jnp.zeros((n, b), F32))
    return st


def _fwd_local(cfg, n, axes, x, y, s, mb, rex, cex):
    b = x.shape[0]
    gid = S._local_ids(b, axes)
    rows = dict(rex, x=x, s=s, mb=mb, gid=gid)
    cols = dict(cex, y=y, mb=mb, gid=gid)

    def col_merge(st, axes):
        out = {}
        if "m" in st:
            M = lax.pmax(st["m"], axes)
            out.update(m=S._own(M, axes),
                       l=lax.psum_scatter(st["l"] * jnp.exp(st["m"] - M), axes, scatter_dimension=1, tiled=False))
        for k in ("wl", "w"):
            if k in st:
                out[k] = lax.psum_scatter(st[k], axes, scatter_dimension=1, tiled=False)
        return out

    kernel = S._Kernel(_tile_fwd(cfg), lambda nr, rb: _state(cfg, nr, rb, False),
                       lambda nc, cb: _state(cfg, nc, cb, True), col_merge=col_merge)
    rst, cst = S._run_local(kernel, rows, cols, block_size=cfg.block_size, n=n, axes=axes, ring=cfg.impl == "ring")
    out = {}
    if cfg.alphas:
        out["lse_r"] = rst["m"] + jnp.log(rst["l"])
        out["lse_c"] = cst["m"] + jnp.log(cst["l"]) if cfg.with_col else jnp.zeros_like(out["lse_r"])
    if cfg.weight_fn is not None:
        out.update(wl_r=rst["wl"], w_r=rst["w"])
        out.update(wl_c=cst["wl"], w_c=cst["w"]) if cfg.with_col else out.update(
            wl_c=jnp.zeros_like(rst["wl"]), w_c=jnp.zeros_like(rst["w"]))
    return out


def _bwd_local(cfg, n, axes, x, y, s, mb, rex, cex, lse_r, lse_c, g_r, g_c, gw_r, gw_c):
    b, D = x.shape
    gid = S._local_ids(b, axes)
    # Underscored names are the kernel's own; user extras may not start with "_".
    rows = dict(rex, x=x, s=s, mb=mb, gid=gid, _lse=lse_r, _g=g_r, _gw=gw_r)
    cols = dict(cex, y=y, mb=mb, gid=gid, _lse=lse_c, _g=g_c, _gw=gw_c)
    kernel = S._Kernel(
        _tile_bwd(cfg),
        lambda nr, rb: dict(u=jnp.zeros((nr, rb, D), F32)),
        lambda nc, cb: dict(dy=jnp.zeros((nc, cb, D), F32)),
        col_step=lambda st, axes: dict(dy=lax.psum_scatter(st["dy"], axes, scatter_dimension=0, tiled=False)),
    )
    rst, cst = S._run_local(kernel, rows, cols, block_size=cfg.block_size, n=n, axes=axes, ring=cfg.impl == "ring")
    u = rst["u"]
    return (s[:, None] * u).astype(x.dtype), cst["dy"].astype(y.dtype), jnp.einsum("bd,bd->b", x.astype(F32), u)


def _out_tree(cfg):
    t = {}
    if cfg.alphas:
        t.update(lse_r=0, lse_c=0)
    if cfg.weight_fn is not None:
        t.update(wl_r=0, w_r=0, wl_c=0, w_c=0)
    return t


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, x, y, s, mb, rex, cex):
    return _core_fwd(cfg, x, y, s, mb, rex, cex)[0]


def _core_fwd(cfg, x, y, s, mb, rex, cex):
    out = S._shard(cfg, functools.partial(_fwd_local, cfg), 6, _out_tree(cfg))(x, y, s, mb, rex, cex)
    return out, (x, y, s, mb, rex, cex, out.get("lse_r"), out.get("lse_c"))


def _core_bwd(cfg, res, ct):
    x, y, s, mb, rex, cex, lse_r, lse_c = res
    B = x.shape[0]
    K = len(cfg.alphas)
    z = lambda *shape: jnp.zeros(shape, F32)
    g_r = ct["lse_r"].astype(F32) if K else z(B, 0)
    g_c = ct["lse_c"].astype(F32) if K and cfg.with_col else z(B, K)
    gw_r = ct["wl_r"].astype(F32) if cfg.weight_fn is not None else z(B)
    gw_c = ct["wl_c"].astype(F32) if cfg.weight_fn is not None and cfg.with_col else z(B)
    lse_r = lse_r if K else z(B, 0)
    lse_c = lse_c if K else z(B, 0)
    dx, dy, ds = S._shard(cfg, functools.partial(_bwd_local, cfg), 12, (0, 0, 0))(
        x, y, s, mb, rex, cex, lse_r, lse_c, g_r, g_c, gw_r, gw_c)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    return dx, dy, ds, jnp.zeros_like(mb), zeros(rex), zeros(cex)


_core.defvjp(_core_fwd, _core_bwd)


def pair_stats(
    x, y, s, valid, *, alphas: tuple = (1.0,), with_col: bool = True,
    mask_fn: Callable | None = None, weight_fn: Callable | None = None,
    row_extra: dict | None = None, col_extra: dict | None = None,
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
      impl: ``"dense"`` runs the same tile code once on the whole batch (the reference path, an
        O(B^2) tile), ``"chunked"`` / ``"ring"`` stream as in :mod:`._streaming`.

    Returns:
      dict of float32 arrays: ``lse_r``, ``lse_c`` ``[B, K]``; ``wl_r``, ``w_r``, ``wl_c``, ``w_c``
      ``[B]``. Differentiable in x, y, s.
    """
    if impl not in ("dense", "chunked", "ring"):
        raise ValueError(f"unknown impl {impl!r}; known: dense, chunked, ring")
    B = x.shape[0]
    if impl == "dense":
        # One tile covering everything: the same formulas, XLA-differentiated (no custom_vjp).
        mesh_, axes, block_size = None, None, B
    else:
        mesh_, axes = S.resolve_mesh(mesh, batch_axes, x)
    cfg = _PCfg(impl, int(block_size), mesh_, axes, tuple(float(a) for a in alphas), bool(with_col),
                mask_fn, weight_fn)
    S._check_divisible(cfg, B)
    for k in list(row_extra or {}) + list(col_extra or {}):
        if k.startswith("_") or k in ("x", "y", "s", "mb", "gid"):
            raise ValueError(f"pair_stats extra name {k!r} is reserved (x, y, s, mb, gid, _*)")
    mb = jnp.where(valid, 0.0, NEG).astype(F32)
    rex = {k: lax.stop_gradient(v) for k, v in (row_extra or {}).items()}
    cex = {k: lax.stop_gradient(v) for k, v in (col_extra or {}).items()}
    if impl == "dense":
        return _dense(cfg, x, y, s, mb, rex, cex)
    return _core(cfg, x, y, s, mb, rex, cex)


def _dense(cfg, x, y, s, mb, rex, cex):
    """The materialized [B, B] reference (XLA inserts any all-gather), differentiated by XLA."""
    gid = jnp.arange(x.shape[0], dtype=jnp.int32)
    r = dict(rex, x=x, s=s, mb=mb, gid=gid)
    c = dict(cex, y=y, mb=mb, gid=gid)
    cos = S._dot_nt(x, y)
    l = s[:, None] * cos
    pb = _pair_bias(cfg, r, c, cos)
    out = {}
    if cfg.alphas:
        a = jnp.asarray(cfg.alphas, F32)[None, None, :]
        al = a * l[..., None] + jnp.asarray(pb, F32)[..., None] if cfg.mask_fn else a * l[..., None]
        out["lse_r"] = jax.nn.logsumexp(al + mb[None, :, None], axis=1)
        out["lse_c"] = jax.nn.logsumexp(al + mb[:, None, None], axis=0) if cfg.with_col else jnp.zeros_like(out["lse_r"])
    if cfg.weight_fn is not None:
        wr, wc = _weights(cfg, r, c, cos)
        out.update(wl_r=jnp.sum(wr * l, 1), w_r=jnp.sum(wr, 1), wl_c=jnp.sum(wc * l, 0), w_c=jnp.sum(wc, 0))
    return out
