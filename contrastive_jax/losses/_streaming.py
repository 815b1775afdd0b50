"""Streaming kernels behind ``impl="chunked"`` and ``impl="ring"``.

Only the parts of the losses that are NOT linear in the logits live here:

* softmax: per-row and per-column log-sum-exp, ``lse_r[i] = log sum_j exp(l_ij)`` and
  ``lse_c[j] = log sum_i exp(l_ij)`` with ``l_ij = s_i <x_i, y_j>``;
* sigmoid: per-row sums ``sum_j softplus(s_i <x_i, y_j> + b_i)`` (every pair scored as a
  negative; the caller corrects the positive pair, a linear term).

Each is a ``jax.custom_vjp`` whose residuals are the inputs plus O(B) statistics; the backward
recomputes each logit block and turns it straight into gradient contributions, so no [B, B]
array ever exists (Inf-CL, Cheng et al. 2024, does the same tile recomputation in Triton).

Layout. One *sweep* visits a grid of (row block x column block) tiles: the rows are this
device's examples, the columns a *panel* of the other modality. The forward of one tile updates
the online row statistics and the column statistics of its column block together, so a single
pass serves both softmax directions. The drivers differ only in where panels come from:

* single device: one panel = all of ``y``;
* chunked on a mesh: step ``k`` all-gathers the k-th slice of every device's ``y`` (one column
  block of ``n * c`` columns); partial column statistics are merged across devices at the end
  with one ``pmax`` + ``psum_scatter`` of O(B) floats; the backward all-gathers the same blocks
  and reduce-scatters each block's ``dy`` back to its owners;
* ring: the panel is the neighbour's whole ``y`` shard, passed on with ``lax.ppermute``; the
  column statistics (forward) and the ``dy`` accumulator (backward) travel with it and arrive
  home complete after ``n`` hops.

Masking. Padding (block sizes need not divide the batch) and user-masked examples are removed
with an additive bias of ``NEG`` on their row (for column statistics) or column (for row
statistics); ``exp``, ``softplus`` and ``sigmoid`` of ``NEG`` are exactly 0.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

NEG = -1e30  # additive mask; finite so that masked-minus-masked never makes a NaN
F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# mesh resolution
# --------------------------------------------------------------------------------------------


def resolve_mesh(mesh, batch_axes, x):
    """(mesh or None, tuple of batch axis names or None).

    Order: explicit ``mesh``; the ambient mesh of ``jax.set_mesh``; the legacy ``with mesh:``
    context; the mesh of a concrete input's ``NamedSharding``; else None (single device).
    """
    if mesh is None:
        am = jax.sharding.get_abstract_mesh()
        if not am.empty:
            mesh = am
    if mesh is None:
        try:  # deprecated `with mesh:` context manager (no public accessor)
            from jax._src import mesh as _mesh_lib

            pm = _mesh_lib.thread_resources.env.physical_mesh
            if not pm.empty:
                mesh = pm
        except Exception:  # pragma: no cover - private API moved
            pass
    if mesh is None:
        sh = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        if isinstance(sh, NamedSharding):
            mesh = sh.mesh
    if mesh is None:
        return None, None
    if batch_axes is None:
        axes = tuple(mesh.axis_names)
    elif isinstance(batch_axes, str):
        axes = (batch_axes,)
    else:
        axes = tuple(batch_axes)
    for a in axes:
        if a not in mesh.axis_names:
            raise ValueError(f"batch axis {a!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
    if not axes:  # batch not sharded: nothing to communicate
        return None, None
    return mesh, axes


class _Cfg(NamedTuple):
    impl: str
    block_size: int
    mesh: Any
    axes: Any
    with_col: bool
    with_metrics: bool


def _n_devices(cfg) -> int:
    return math.prod(cfg.mesh.shape[a] for a in cfg.axes)


def _blocks(n: int, target: int) -> tuple[int, int]:
    """(count, size) of blocks of at most ``target`` covering ``n`` with the least padding."""
    count = max(1, -(-n // max(1, target)))
    return count, -(-n // count)


# --------------------------------------------------------------------------------------------
# packing helpers: pad a leading axis and fold it into [count, size, ...]
# --------------------------------------------------------------------------------------------


def _pack(a, count, size, fill):
    pad = count * size - a.shape[0]
    if pad:
        a = jnp.concatenate([a, jnp.full((pad,) + a.shape[1:], fill, a.dtype)], axis=0)
    return a.reshape((count, size) + a.shape[1:])


def _unpack(a, n):
    return a.reshape((-1,) + a.shape[2:])[:n]


def _dot_nt(a, b):
    """a [m, D] @ b[n, D].T -> [m, n] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_nn(g, b):
    """g [m, n] float32 @ b [n, D] -> [m, D] float32 (g cast to b's dtype, as autodiff does)."""
    return lax.dot_general(g.astype(b.dtype), b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _dot_tn(g, a):
    """g[m, n].T @ a [m, D] -> [n, D] float32."""
    return lax.dot_general(g.astype(a.dtype), a, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _sweep(tile_fn, rows, row_state, cols, col_state):
    """Visit every (row block, column block) tile once, column blocks outermost.

    ``rows``/``row_state`` are pytrees with leading axis [n_row_blocks]; ``cols``/``col_state``
    with leading axis [n_col_blocks]. ``tile_fn(row, row_st, col, col_st) -> (row_st, col_st)``.
    States are loop carries updated in place (dynamic_update_slice), so XLA keeps one buffer
    of each, e.g. of the [b, D] gradient accumulator.
    """
    take = lambda tree, i: jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)
    put = lambda tree, i, v: jax.tree.map(lambda a, u: lax.dynamic_update_index_in_dim(a, u, i, 0), tree, v)
    nr = jax.tree.leaves(rows)[0].shape[0]
    nc = jax.tree.leaves(cols)[0].shape[0]

    def outer(j, carry):
        row_state, col_state = carry
        col = take(cols, j)

        def inner(i, carry):
            row_state, col_st = carry
            row_st, col_st = tile_fn(take(rows, i), take(row_state, i), col, col_st)
            return put(row_state, i, row_st), col_st

        row_state, col_st = lax.fori_loop(0, nr, inner, (row_state, take(col_state, j)))
        return row_state, put(col_state, j, col_st)

    return lax.fori_loop(0, nc, outer, (row_state, col_state))


def _scaled(r):
    """s_i * x_i for one row block, in x's dtype (cheap: rb*D work per rb*cb*D tile)."""
    return (r["s"][:, None] * r["x"].astype(F32)).astype(r["x"].dtype)


def _offdiag(l, rgid, cgid):
    return jnp.where(rgid[:, None] == cgid[None, :], -jnp.inf, l)


# --------------------------------------------------------------------------------------------
# tile functions
# --------------------------------------------------------------------------------------------
# rows: dict(x [rb, D], s [rb], mb [rb] (mask bias), gid [rb], + kernel extras)
# cols: dict(y [cb, D], mb [cb], gid [cb], + kernel extras)


def _softmax_tile_fwd(with_col, with_metrics):
    def tile(r, rst, c, cst):
        l = r["s"][:, None] * _dot_nt(r["x"], c["y"])
        lr = l + c["mb"][None, :]
        m_new = jnp.maximum(rst["m"], jnp.max(lr, axis=1))
        rsum = rst["l"] * jnp.exp(rst["m"] - m_new) + jnp.sum(jnp.exp(lr - m_new[:, None]), axis=1)
        rst = dict(rst, m=m_new, l=rsum)
        if with_col:
            lc = l + r["mb"][:, None]
            cm_new = jnp.maximum(cst["m"], jnp.max(lc, axis=0))
            csum = cst["l"] * jnp.exp(cst["m"] - cm_new) + jnp.sum(jnp.exp(lc - cm_new[None, :]), axis=0)
            cst = dict(cst, m=cm_new, l=csum)
        if with_metrics:
            lo = _offdiag(l, r["gid"], c["gid"])
            rst["mo"] = jnp.maximum(rst["mo"], jnp.max(lo + c["mb"][None, :], axis=1))
            cst["mo"] = jnp.maximum(cst["mo"], jnp.max(lo + r["mb"][:, None], axis=0))
        return rst, cst

    return tile


def _softmax_tile_bwd(with_col):
    def tile(r, rst, c, cst):
        l = r["s"][:, None] * _dot_nt(r["x"], c["y"])
        g = r["g"][:, None] * jnp.exp(l + (c["mb"][None, :] - r["lse"][:, None]))
        if with_col:
            g = g + c["g"][None, :] * jnp.exp(l + (r["mb"][:, None] - c["lse"][None, :]))
        rst = dict(rst, u=rst["u"] + _dot_nn(g, c["y"]))
        cst = dict(cst, dy=cst["dy"] + _dot_tn(g, _scaled(r)))
        return rst, cst

    return tile


def _sigmoid_tile_fwd(with_metrics):
    def tile(r, rst, c, cst):
        t = r["s"][:, None] * _dot_nt(r["x"], c["y"]) + r["b"][:, None]
        rst = dict(rst, acc=rst["acc"] + jnp.sum(jax.nn.softplus(t + c["mb"][None, :]), axis=1))
        if with_metrics:
            to = _offdiag(t, r["gid"], c["gid"])
            rst["mo"] = jnp.maximum(rst["mo"], jnp.max(to + c["mb"][None, :], axis=1))
            cst = dict(cst, mo=jnp.maximum(cst["mo"], jnp.max(to + r["mb"][:, None], axis=0)))
        return rst, cst

    return tile


def _sigmoid_tile_bwd(r, rst, c, cst):
    t = r["s"][:, None] * _dot_nt(r["x"], c["y"]) + r["b"][:, None]
    g = r["g"][:, None] * jax.nn.sigmoid(t + c["mb"][None, :])
    rst = dict(rst, u=rst["u"] + _dot_nn(g, c["y"]), db=rst["db"] + jnp.sum(g, axis=1))
    cst = dict(cst, dy=cst["dy"] + _dot_tn(g, _scaled(r)))
    return rst, cst


# --------------------------------------------------------------------------------------------
# local drivers: run a kernel over this device's rows and every column of the global batch
# --------------------------------------------------------------------------------------------


class _Kernel(NamedTuple):
    """How one sweep starts and how chunked-on-a-mesh combines column state across devices.

    ``col_step(state [n, c, ...], axes)`` runs after each gathered block (the backward
    reduce-scatters that block's ``dy`` right away, so only [c, D] of it is kept per step);
    ``col_merge(stacked [nsteps, ...], axes) -> [nsteps, c, ...]`` runs once at the end (the
    forward merges the O(B) partial column statistics there).
    """

    tile: Any  # tile function
    row_init: Any  # (n_row_blocks, rb) -> dict of row-state arrays (fresh)
    col_init: Any  # (n_col_blocks, cb) -> dict of column-state arrays (fresh)
    col_step: Any = lambda st, axes: st
    col_merge: Any = lambda st, axes: st


def _full(shape, v):
    return jnp.full(shape, v, F32)


def _pack_rows(rows: dict, nr, rb):
    fills = dict(x=0, s=0.0, mb=NEG, gid=-1, b=0.0, g=0.0, lse=0.0)
    # Keys other kernels add (extras such as group ids) pad with 0; padding is masked by ``mb``.
    return {k: _pack(v, nr, rb, fills.get(k, 0)) for k, v in rows.items()}


def _pack_cols(cols: dict, nc, cb):
    fills = dict(y=0, mb=NEG, gid=-2, g=0.0, lse=0.0)
    return {k: _pack(v, nc, cb, fills.get(k, 0)) for k, v in cols.items()}


def _run_local(kernel, rows, cols, *, block_size, n, axes, ring):
    """Sweep this device's rows against all columns; returns (row_state, col_state), unpacked.

    ``rows``/``cols``: dicts of local [b, ...] arrays. ``n``/``axes``: devices along the batch
    axes (n == 1 and axes None: single device). ``ring`` picks the ring driver on a mesh.
    Column state returned is for THIS device's columns, complete over all rows.
    """
    b = rows["s"].shape[0]
    nr, rb = _blocks(b, block_size)
    R = _pack_rows(rows, nr, rb)
    row_state = kernel.row_init(nr, rb)

    if axes is None or ring:
        nc, cb = _blocks(b, block_size)
        C = _pack_cols(cols, nc, cb)
        col_state = kernel.col_init(nc, cb)
        if axes is None:
            row_state, col_state = _sweep(kernel.tile, R, row_state, C, col_state)
        else:
            perm = [(i, (i + 1) % n) for i in range(n)]

            def step(carry, _):
                row_state, C, col_state = carry
                # The panel's send depends only on the panel, so it can overlap the sweep; the
                # accumulators it carries go once they include this device's rows.
                C_next = lax.ppermute(C, axes, perm)
                row_state, col_state = _sweep(kernel.tile, R, row_state, C, col_state)
                col_state = lax.ppermute(col_state, axes, perm)
                return (row_state, C_next, col_state), None

            (row_state, C, col_state), _ = lax.scan(step, (row_state, C, col_state), None, length=n - 1)
            row_state, col_state = _sweep(kernel.tile, R, row_state, C, col_state)
            # The block now held came from the next device: its statistics are complete.
            col_state = lax.ppermute(col_state, axes, perm)
        return _unpack_state(row_state, b), _unpack_state(col_state, b)

    # chunked on a mesh: step k all-gathers the k-th slice of every device's columns.
    nsteps, c = _blocks(b, -(-block_size // n))
    C = _pack_cols(cols, nsteps, c)

    def step(row_state, Ck):
        G = jax.tree.map(lambda a: lax.all_gather(a, axes, axis=0, tiled=True)[None], Ck)
        row_state, col_state = _sweep(kernel.tile, R, row_state, G, kernel.col_init(1, n * c))
        col_state = jax.tree.map(lambda a: a[0].reshape((n, c) + a.shape[2:]), col_state)
        return row_state, kernel.col_step(col_state, axes)

    row_state, col_state = lax.scan(step, row_state, C)  # col_state leaves: [nsteps, ...]
    col_state = kernel.col_merge(col_state, axes)  # -> [nsteps, c, ...] for this device
    return _unpack_state(row_state, b), _unpack_state(col_state, b)


def _unpack_state(state, n):
    return {k: _unpack(v, n) for k, v in state.items()}


def _own(a, axes):
    """a [nsteps, n, ...] -> a[:, this device] ."""
    return lax.dynamic_index_in_dim(a, lax.axis_index(axes), axis=1, keepdims=False)


# --------------------------------------------------------------------------------------------
# softmax: (lse_r, lse_c) with custom VJP
# --------------------------------------------------------------------------------------------


def _lse_state(n, b, with_lse, with_metrics):
    """Initial online-LSE state for n blocks of b rows/columns: running max ``m`` and sum ``l``
    (when ``with_lse``) and the largest off-diagonal logit ``mo`` (when ``with_metrics``)."""
    st = {}
    if with_lse:
        st.update(m=_full((n, b), -jnp.inf), l=_full((n, b), 0.0))
    if with_metrics:
        st["mo"] = _full((n, b), -jnp.inf)
    return st


def _softmax_kernels(cfg):
    def row_init(nr, rb):
        return _lse_state(nr, rb, True, cfg.with_metrics)

    def col_init(nc, cb):
        return _lse_state(nc, cb, cfg.with_col, cfg.with_metrics)

    def col_merge(st, axes):
        out = {}
        if cfg.with_col:
            M = lax.pmax(st["m"], axes)
            S = lax.psum_scatter(st["l"] * jnp.exp(st["m"] - M), axes, scatter_dimension=1, tiled=False)
            out.update(m=_own(M, axes), l=S)
        if cfg.with_metrics:
            out["mo"] = _own(lax.pmax(st["mo"], axes), axes)
        return out

    return _Kernel(_softmax_tile_fwd(cfg.with_col, cfg.with_metrics), row_init, col_init, col_merge=col_merge)


def _local_ids(b, axes):
    base = 0 if axes is None else lax.axis_index(axes) * b
    return base + jnp.arange(b, dtype=jnp.int32)


def _softmax_fwd_local(cfg, n, axes, x, y, s, mb):
    b = x.shape[0]
    gid = _local_ids(b, axes)
    rows = dict(x=x, s=s, mb=mb, gid=gid)
    cols = dict(y=y, mb=mb, gid=gid)
    rst, cst = _run_local(_softmax_kernels(cfg), rows, cols, block_size=cfg.block_size, n=n, axes=axes,
                          ring=cfg.impl == "ring")
    lse_r = rst["m"] + jnp.log(rst["l"])
    lse_c = cst["m"] + jnp.log(cst["l"]) if cfg.with_col else jnp.zeros_like(lse_r)
    aux = (rst["mo"], cst["mo"]) if cfg.with_metrics else ()
    return lse_r, lse_c, aux


def _softmax_bwd_local(cfg, n, axes, x, y, s, mb, lse_r, lse_c, g_r, g_c):
    b, D = x.shape
    rows = dict(x=x, s=s, mb=mb, lse=lse_r, g=g_r)
    cols = dict(y=y, mb=mb, lse=lse_c, g=g_c)
    kernel = _Kernel(
        _softmax_tile_bwd(cfg.with_col),
        lambda nr, rb: dict(u=_full((nr, rb, D), 0.0)),
        lambda nc, cb: dict(dy=_full((nc, cb, D), 0.0)),
        col_step=lambda st, axes: dict(dy=lax.psum_scatter(st["dy"], axes, scatter_dimension=0, tiled=False)),
    )
    rst, cst = _run_local(kernel, rows, cols, block_size=cfg.block_size, n=n, axes=axes, ring=cfg.impl == "ring")
    u = rst["u"]
    dx = (s[:, None] * u).astype(x.dtype)
    ds = jnp.einsum("bd,bd->b", x.astype(F32), u)
    return dx, cst["dy"].astype(y.dtype), ds


def _shard(cfg, fn, n_in, n_out_tree):
    """Wrap a local function for the global arrays: shard_map on a mesh, identity without one."""
    if cfg.mesh is None:
        return functools.partial(fn, 1, None)
    n = _n_devices(cfg)
    spec = P(cfg.axes)
    return jax.shard_map(
        functools.partial(fn, n, cfg.axes),
        mesh=cfg.mesh,
        in_specs=(spec,) * n_in,
        out_specs=jax.tree.map(lambda _: spec, n_out_tree),
        check_vma=False,
    )


def _check_divisible(cfg, B):
    if cfg.mesh is not None:
        n = _n_devices(cfg)
        if B % n:
            raise ValueError(
                f"global batch {B} is not divisible by the {n} devices along batch axes {cfg.axes}; "
                "pad the batch and pass weights=0 for the padding"
            )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax_core(cfg, x, y, s, mb):
    return _softmax_core_fwd(cfg, x, y, s, mb)[0]


def _softmax_core_fwd(cfg, x, y, s, mb):
    aux_tree = (0, 0) if cfg.with_metrics else ()
    out = _shard(cfg, functools.partial(_softmax_fwd_local, cfg), 4, (0, 0, aux_tree))(x, y, s, mb)
    lse_r, lse_c, _ = out
    return out, (x, y, s, mb, lse_r, lse_c)


def _softmax_core_bwd(cfg, res, ct):
    x, y, s, mb, lse_r, lse_c = res
    g_r, g_c, _ = ct
    g_c = g_c if cfg.with_col else jnp.zeros_like(g_r)
    dx, dy, ds = _shard(cfg, functools.partial(_softmax_bwd_local, cfg), 8, (0, 0, 0))(
        x, y, s, mb, lse_r, lse_c, g_r.astype(F32), g_c.astype(F32)
    )
    return dx, dy, ds, jnp.zeros_like(mb)


_softmax_core.defvjp(_softmax_core_fwd, _softmax_core_bwd)


def softmax_lse(x, y, s, valid, *, impl, block_size, mesh, batch_axes, with_col, with_metrics):
    """Row and column log-sum-exp of ``l = s[:, None] * x @ y.T`` over VALID columns / rows.

    Returns ``(lse_r [B], lse_c [B], aux)``; ``aux = (row_max_off, col_max_off)`` (largest logit
    among the other valid examples) if ``with_metrics`` else ``()``. ``lse_c`` is zeros when not
    ``with_col``. Differentiable in x, y, s.
    """
    cfg = _Cfg(impl, block_size, mesh, batch_axes, bool(with_col), bool(with_metrics))
    _check_divisible(cfg, x.shape[0])
    mb = jnp.where(valid, 0.0, NEG).astype(F32)
    lse_r, lse_c, aux = _softmax_core(cfg, x, y, s, mb)
    return lse_r, lse_c, jax.lax.stop_gradient(aux)


# --------------------------------------------------------------------------------------------
# sigmoid: row sums of softplus with custom VJP
# --------------------------------------------------------------------------------------------


def _sigmoid_fwd_local(cfg, n, axes, x, y, s, bias, mb):
    b = x.shape[0]
    gid = _local_ids(b, axes)
    rows = dict(x=x, s=s, b=bias, mb=mb, gid=gid)
    cols = dict(y=y, mb=mb, gid=gid)

    def row_init(nr, rb):
        st = dict(acc=_full((nr, rb), 0.0))
        if cfg.with_metrics:
            st["mo"] = _full((nr, rb), -jnp.inf)
        return st

    def col_init(nc, cb):
        return dict(mo=_full((nc, cb), -jnp.inf)) if cfg.with_metrics else {}

    def col_merge(st, axes):
        return dict(mo=_own(lax.pmax(st["mo"], axes), axes)) if cfg.with_metrics else {}

    kernel = _Kernel(_sigmoid_tile_fwd(cfg.with_metrics), row_init, col_init, col_merge=col_merge)
    rst, cst = _run_local(kernel, rows, cols, block_size=cfg.block_size, n=n, axes=axes, ring=cfg.impl == "ring")
    aux = (rst["mo"], cst["mo"]) if cfg.with_metrics else ()
    return rst["acc"], aux


def _sigmoid_bwd_local(cfg, n, axes, x, y, s, bias, mb, g):
    b, D = x.shape
    rows = dict(x=x, s=s, b=bias, mb=mb, g=g)
    cols = dict(y=y, mb=mb)
    kernel = _Kernel(
        _sigmoid_tile_bwd,
        lambda nr, rb: dict(u=_full((nr, rb, D), 0.0), db=_full((nr, rb), 0.0)),
        lambda nc, cb: dict(dy=_full((nc, cb, D), 0.0)),
        col_step=lambda st, axes: dict(dy=lax.psum_scatter(st["dy"], axes, scatter_dimension=0, tiled=False)),
    )
    rst, cst = _run_local(kernel, rows, cols, block_size=cfg.block_size, n=n, axes=axes, ring=cfg.impl == "ring")
    u = rst["u"]
    dx = (s[:, None] * u).astype(x.dtype)
    ds = jnp.einsum("bd,bd->b", x.astype(F32), u)
    return dx, cst["dy"].astype(y.dtype), ds, rst["db"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sigmoid_core(cfg, x, y, s, bias, mb):
    return _sigmoid_core_fwd(cfg, x, y, s, bias, mb)[0]


def _sigmoid_core_fwd(cfg, x, y, s, bias, mb):
    aux_tree = (0, 0) if cfg.with_metrics else ()
    out = _shard(cfg, functools.partial(_sigmoid_fwd_local, cfg), 5, (0, aux_tree))(x, y, s, bias, mb)
    return out, (x, y, s, bias, mb)


def _sigmoid_core_bwd(cfg, res, ct):
    x, y, s, bias, mb = res
    g, _ = ct
    dx, dy, ds, db = _shard(cfg, functools.partial(_sigmoid_bwd_local, cfg), 6, (0, 0, 0, 0))(
        x, y, s, bias, mb, g.astype(F32)
    )
    return dx, dy, ds, db, jnp.zeros_like(mb)


_sigmoid_core.defvjp(_sigmoid_core_fwd, _sigmoid_core_bwd)


def sigmoid_rowsum(x, y, s, bias, valid, *, impl, block_size, mesh, batch_axes, with_metrics):
    """``sum_{j valid} softplus(s_i <x_i, y_j> + b_i)`` per row -> ``([B], aux)``.

    ``aux = (row_max_off, col_max_off)`` of the logits ``t_ij`` if ``with_metrics`` else ``()``.
    Differentiable in x, y, s, bias.
    """
    cfg = _Cfg(impl, block_size, mesh, batch_axes, False, bool(with_metrics))
    _check_divisible(cfg, x.shape[0])
    mb = jnp.where(valid, 0.0, NEG).astype(F32)
    acc, aux = _sigmoid_core(cfg, x, y, s, bias, mb)
    return acc, jax.lax.stop_gradient(aux)
