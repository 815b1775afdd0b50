"""The one streaming driver behind every ``impl="chunked"`` and ``impl="ring"`` loss.

A loss that streams is a :class:`Kernel`: what it accumulates from each (row block x column
block) tile of the logits ``t_ij = s_i <x_i, y_j> (+ b_i)`` in the forward, and the gradient
``dL/dt`` of one tile in the backward. :func:`stream` runs a kernel over the global batch under a
``jax.custom_vjp`` whose residuals are the inputs plus the kernel's O(B) outputs; the backward
recomputes every tile, asks the kernel for its ``dL/dt`` and turns it straight into ``dx``,
``dy``, ``ds`` (and ``db``), so no [B, B] array ever exists. Inf-CL (Cheng et al. 2024,
"Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive Loss") does the
same tile recomputation in Triton. The kernels themselves live in :mod:`.kernels`.

Layout. One *sweep* visits a grid of tiles: the rows are this device's examples, the columns a
*panel* of the other modality. The forward of one tile updates the row state and the column state
of its column block together, so a single pass serves both directions of a loss. The drivers
differ only in where panels come from:

* single device: one panel = all of ``y``;
* chunked on a mesh: step ``k`` all-gathers the k-th slice of every device's ``y`` (one column
  block of ``n * c`` columns); partial column state is merged across devices once at the end by
  the kernel's ``col_merge`` (O(B) floats); the backward all-gathers the same blocks and
  reduce-scatters each block's ``dy`` back to its owners;
* ring: the panel is the neighbour's whole ``y`` shard, passed on with ``lax.ppermute``; the
  column state (forward) and the ``dy`` accumulator (backward) travel with it and arrive home
  complete after ``n`` hops.

Memory per device: O(b * D + block^2), b the per-device batch.

Masking. Padding (block sizes need not divide the batch) and masked examples carry an additive
bias ``mb = NEG`` on their row (for column statistics) or column (for row statistics); ``exp``,
``softplus`` and ``sigmoid`` of ``NEG`` are exactly 0.

Public names (for the modules of this package): :data:`IMPLS`, :func:`check_impl`,
:data:`NEG`, :func:`resolve_mesh`, :func:`dot_nt`, :func:`online_logsumexp`,
:func:`merge_logsumexp`, :func:`merge_max`, :func:`merge_sum`, :class:`Kernel`, :func:`stream`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

IMPLS = ("dense", "chunked", "ring")
NEG = -1e30  # additive mask; finite so that masked-minus-masked never makes a NaN
F32 = jnp.float32

# Names the driver puts into every row block ``r`` / column block ``c``; a kernel's own arrays use
# other names (kernels.py prefixes its cotangents and residuals with "_").
ROW_KEYS = ("x", "s", "b", "mb", "gid")
COL_KEYS = ("y", "mb", "gid")


def check_impl(impl: str) -> None:
    """Raises ValueError unless ``impl`` is one of :data:`IMPLS` (the only place that checks)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; known: {', '.join(IMPLS)}")


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


# --------------------------------------------------------------------------------------------
# tile arithmetic
# --------------------------------------------------------------------------------------------


def dot_nt(a, b):
    """``a [m, D] @ b [n, D].T -> [m, n]`` float32 (accumulated in float32 for bfloat16 inputs)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_nn(g, b):
    """g [m, n] float32 @ b [n, D] -> [m, D] float32 (g cast to b's dtype, as autodiff does)."""
    return lax.dot_general(g.astype(b.dtype), b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _dot_tn(g, a):
    """g[m, n].T @ a [m, D] -> [n, D] float32."""
    return lax.dot_general(g.astype(a.dtype), a, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _scaled(r):
    """s_i * x_i for one row block, in x's dtype (cheap: rb*D work per rb*cb*D tile)."""
    return (r["s"][:, None] * r["x"].astype(F32)).astype(r["x"].dtype)


def _logits(r, c):
    """(cos, t) of one tile: ``cos = <x_i, y_j>`` and ``t = s_i cos (+ b_i)``, float32 [rb, cb]."""
    cos = dot_nt(r["x"], c["y"])
    t = r["s"][:, None] * cos
    if "b" in r:
        t = t + r["b"][:, None]
    return cos, t


def online_logsumexp(m, lsum, z, axis):
    """One online log-sum-exp step (running max ``m`` and sum ``lsum``, float32 [n]) over the new
    terms ``z`` [rb, cb] reduced along ``axis`` (1: rows, 0: columns) -> (m, lsum)."""
    m_new = jnp.maximum(m, jnp.max(z, axis=axis))
    zc = z - (m_new[:, None] if axis == 1 else m_new[None, :])
    return m_new, lsum * jnp.exp(m - m_new) + jnp.sum(jnp.exp(zc), axis=axis)


# --------------------------------------------------------------------------------------------
# column-state merges for chunked on a mesh: [nsteps, n, c] partials -> this device's [nsteps, c]
# --------------------------------------------------------------------------------------------


def _own(a, axes):
    """a [nsteps, n, ...] -> a[:, this device] ."""
    return lax.dynamic_index_in_dim(a, lax.axis_index(axes), axis=1, keepdims=False)


def merge_logsumexp(m, lsum, axes):
    """Combine every device's online log-sum-exp state (m, lsum) of the same columns."""
    M = lax.pmax(m, axes)
    return _own(M, axes), lax.psum_scatter(lsum * jnp.exp(m - M), axes, scatter_dimension=1, tiled=False)


def merge_max(a, axes):
    """Column-wise maximum over every device's rows."""
    return _own(lax.pmax(a, axes), axes)


def merge_sum(a, axes):
    """Column-wise sum over every device's rows."""
    return lax.psum_scatter(a, axes, scatter_dimension=1, tiled=False)


# --------------------------------------------------------------------------------------------
# the kernel interface
# --------------------------------------------------------------------------------------------


class Kernel(NamedTuple):
    """One streamed statistic. Blocks ``r`` / ``c`` are dicts of [rb, ...] / [cb, ...] arrays:
    ``r``: ``x``, ``s``, ``mb`` (0 or NEG), ``gid`` (int32 global example index), ``b`` when a
    bias is streamed, plus ``row_extra``; ``c``: ``y``, ``mb``, ``gid`` plus ``col_extra``.
    States are dicts of float32 arrays with leading dims [n_blocks, block].

    forward: ``(r, rst, c, cst, cos, t) -> (rst, cst)``, one tile's update of the row state and
      the column state (``cos``, ``t``: float32 [rb, cb], see :func:`stream`).
    row_init, col_init: ``(n_blocks, block) -> state``, fresh states.
    col_merge: ``(state [nsteps, n, c], axes) -> state [nsteps, c]``: chunked on a mesh, the
      partial column states of all n devices combined into this device's columns.
    finish: ``(row_state [b], col_state [b]) -> dict`` of float32 [b, ...] outputs.
    grad_inputs: ``(outputs, cotangents) -> (row_arrays, col_arrays)``: dicts of global [B, ...]
      arrays the backward tiles read (saved statistics, cotangents), padded with 0.
    grad: ``(r, c, cos, t) -> dL/dt`` float32 [rb, cb]. It must vanish on padded columns
      (``mb = NEG``); padded rows read 0 cotangents from ``grad_inputs``' padding.
    """

    forward: Callable
    row_init: Callable
    col_init: Callable
    col_merge: Callable
    finish: Callable
    grad_inputs: Callable
    grad: Callable


class _Cfg(NamedTuple):
    kernel: Kernel
    ring: bool
    block_size: int
    mesh: Any
    axes: Any


def _n_devices(cfg) -> int:
    return math.prod(cfg.mesh.shape[a] for a in cfg.axes)


def block_layout(n: int, target: int) -> tuple[int, int]:
    """(count, size) of blocks of at most ``target`` covering ``n`` with the least padding."""
    count = max(1, -(-n // max(1, target)))
    return count, -(-n // count)


# --------------------------------------------------------------------------------------------
# packing: pad a leading axis and fold it into [count, size, ...]
# --------------------------------------------------------------------------------------------


def pack_blocks(a, count, size, fill):
    """``a [n, ...]`` padded with ``fill`` to ``count * size`` rows -> ``[count, size, ...]``."""
    pad = count * size - a.shape[0]
    if pad:
        a = jnp.concatenate([a, jnp.full((pad,) + a.shape[1:], fill, a.dtype)], axis=0)
    return a.reshape((count, size) + a.shape[1:])


def _pack_all(arrays: dict, count, size, fills):
    # Kernel arrays pad with 0: padding is removed by ``mb`` (and its gradients are dropped).
    return {k: pack_blocks(v, count, size, fills.get(k, 0)) for k, v in arrays.items()}


_ROW_FILLS = dict(x=0, s=0.0, b=0.0, mb=NEG, gid=-1)
_COL_FILLS = dict(y=0, mb=NEG, gid=-2)  # -2: a padded column never matches a padded row's id


def _unpack_state(state, n):
    return {k: v.reshape((-1,) + v.shape[2:])[:n] for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# sweeps and the three drivers
# --------------------------------------------------------------------------------------------


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


class _Pass(NamedTuple):
    """One sweep's tile function, fresh states, and what chunked-on-a-mesh does with column
    state: ``col_step`` after each gathered block (the backward reduce-scatters that block's
    ``dy`` right away, so only [c, D] of it is kept per step), ``col_merge`` once at the end."""

    tile: Callable
    row_init: Callable
    col_init: Callable
    col_step: Callable
    col_merge: Callable


def _ring(p, R, row_state, C, col_state, n, axes):
    perm = [(i, (i + 1) % n) for i in range(n)]

    def step(carry, _):
        row_state, C, col_state = carry
        # The panel's send depends only on the panel, so it can overlap the sweep; the
        # accumulators it carries go once they include this device's rows.
        C_next = lax.ppermute(C, axes, perm)
        row_state, col_state = _sweep(p.tile, R, row_state, C, col_state)
        col_state = lax.ppermute(col_state, axes, perm)
        return (row_state, C_next, col_state), None

    (row_state, C, col_state), _ = lax.scan(step, (row_state, C, col_state), None, length=n - 1)
    row_state, col_state = _sweep(p.tile, R, row_state, C, col_state)
    # The block now held came from the next device: its statistics are complete.
    return row_state, lax.ppermute(col_state, axes, perm)


def _chunked_on_mesh(p, R, row_state, cols, b, block_size, n, axes):
    # Step k all-gathers the k-th slice of every device's columns: one block of n * c columns.
    nsteps, c = block_layout(b, -(-block_size // n))
    C = _pack_all(cols, nsteps, c, _COL_FILLS)

    def step(row_state, Ck):
        G = jax.tree.map(lambda a: lax.all_gather(a, axes, axis=0, tiled=True)[None], Ck)
        row_state, col_state = _sweep(p.tile, R, row_state, G, p.col_init(1, n * c))
        col_state = jax.tree.map(lambda a: a[0].reshape((n, c) + a.shape[2:]), col_state)
        return row_state, p.col_step(col_state, axes)

    row_state, col_state = lax.scan(step, row_state, C)  # col_state leaves: [nsteps, ...]
    return row_state, p.col_merge(col_state, axes)  # -> [nsteps, c, ...] for this device


def _run_local(p: _Pass, rows, cols, *, block_size, n, axes, ring):
    """Sweep this device's rows against all columns; returns (row_state, col_state), unpacked.

    ``rows``/``cols``: dicts of local [b, ...] arrays. ``n``/``axes``: devices along the batch
    axes (n == 1 and axes None: single device). ``ring`` picks the ring driver on a mesh.
    Column state returned is for THIS device's columns, complete over all rows.
    """
    b = rows["s"].shape[0]
    nr, rb = block_layout(b, block_size)
    R = _pack_all(rows, nr, rb, _ROW_FILLS)
    row_state = p.row_init(nr, rb)
    if axes is not None and not ring:
        row_state, col_state = _chunked_on_mesh(p, R, row_state, cols, b, block_size, n, axes)
    else:
        nc, cb = block_layout(b, block_size)
        C = _pack_all(cols, nc, cb, _COL_FILLS)
        if axes is None:
            row_state, col_state = _sweep(p.tile, R, row_state, C, p.col_init(nc, cb))
        else:
            row_state, col_state = _ring(p, R, row_state, C, p.col_init(nc, cb), n, axes)
    return _unpack_state(row_state, b), _unpack_state(col_state, b)


# --------------------------------------------------------------------------------------------
# forward and backward of one kernel on this device's shard
# --------------------------------------------------------------------------------------------


def _local_ids(b, axes):
    base = 0 if axes is None else lax.axis_index(axes) * b
    return base + jnp.arange(b, dtype=jnp.int32)


def _rows_and_cols(x, y, s, bias, mb, rex, cex, axes):
    gid = _local_ids(x.shape[0], axes)
    rows = dict(rex, x=x, s=s, mb=mb, gid=gid)
    if bias:
        rows["b"] = bias[0]
    return rows, dict(cex, y=y, mb=mb, gid=gid)


def _forward_local(cfg, n, axes, x, y, s, bias, mb, rex, cex):
    k = cfg.kernel
    rows, cols = _rows_and_cols(x, y, s, bias, mb, rex, cex, axes)
    tile = lambda r, rst, c, cst: k.forward(r, rst, c, cst, *_logits(r, c))
    p = _Pass(tile, k.row_init, k.col_init, lambda st, axes: st, k.col_merge)
    rst, cst = _run_local(p, rows, cols, block_size=cfg.block_size, n=n, axes=axes, ring=cfg.ring)
    return k.finish(rst, cst)


def _backward_local(cfg, n, axes, x, y, s, bias, mb, rex, cex, grow, gcol):
    """The one block-recompute backward: ``dL/dt`` of each tile from the kernel, then
    ``dx = s * (G @ y)``, ``dy = G^T @ (s x)``, ``ds = <x, G @ y>``, ``db = G @ 1``."""
    D = x.shape[1]
    rows, cols = _rows_and_cols(x, y, s, bias, mb, dict(rex, **grow), dict(cex, **gcol), axes)

    def tile(r, rst, c, cst):
        g = cfg.kernel.grad(r, c, *_logits(r, c))
        rst = dict(rst, u=rst["u"] + _dot_nn(g, c["y"]))
        if bias:
            rst["db"] = rst["db"] + jnp.sum(g, axis=1)
        cst = dict(cst, dy=cst["dy"] + _dot_tn(g, _scaled(r)))
        return rst, cst

    def row_init(nr, rb):
        st = dict(u=jnp.full((nr, rb, D), 0.0, F32))
        if bias:
            st["db"] = jnp.full((nr, rb), 0.0, F32)
        return st

    p = _Pass(tile, row_init, lambda nc, cb: dict(dy=jnp.full((nc, cb, D), 0.0, F32)),
              lambda st, axes: dict(dy=lax.psum_scatter(st["dy"], axes, scatter_dimension=0, tiled=False)),
              lambda st, axes: st)
    rst, cst = _run_local(p, rows, cols, block_size=cfg.block_size, n=n, axes=axes, ring=cfg.ring)
    u = rst["u"]
    dx = (s[:, None] * u).astype(x.dtype)
    ds = jnp.einsum("bd,bd->b", x.astype(F32), u)
    return dx, cst["dy"].astype(y.dtype), ds, (rst["db"],) if bias else ()


def _shard(cfg, fn, n_in):
    """Wrap a local function for the global arrays: shard_map on a mesh, identity without one.
    Every input and output leaf is split along its leading (batch) dim."""
    if cfg.mesh is None:
        return functools.partial(fn, 1, None)
    spec = P(cfg.axes)
    return jax.shard_map(functools.partial(fn, _n_devices(cfg), cfg.axes), mesh=cfg.mesh,
                         in_specs=(spec,) * n_in, out_specs=spec, check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, x, y, s, bias, mb, rex, cex):
    return _core_fwd(cfg, x, y, s, bias, mb, rex, cex)[0]


def _core_fwd(cfg, x, y, s, bias, mb, rex, cex):
    out = _shard(cfg, functools.partial(_forward_local, cfg), 7)(x, y, s, bias, mb, rex, cex)
    return out, (x, y, s, bias, mb, rex, cex, out)


def _core_bwd(cfg, res, ct):
    x, y, s, bias, mb, rex, cex, out = res
    grow, gcol = cfg.kernel.grad_inputs(out, ct)
    dx, dy, ds, db = _shard(cfg, functools.partial(_backward_local, cfg), 9)(
        x, y, s, bias, mb, rex, cex, grow, gcol)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    return dx, dy, ds, db, jnp.zeros_like(mb), zeros(rex), zeros(cex)


_core.defvjp(_core_fwd, _core_bwd)


def stream(kernel: Kernel, x, y, s, valid, *, bias=None, row_extra: dict | None = None,
           col_extra: dict | None = None, impl: str, block_size: int, mesh=None, batch_axes=None) -> dict:
    """Run ``kernel`` over all pairs of the global batch without materializing the [B, B] logits.

    Args:
      kernel: the statistic (see :class:`Kernel`); its tiles see ``cos_ij = <x_i, y_j>`` and
        ``t_ij = s_i cos_ij`` (``+ b_i`` with a bias), float32.
      x, y: ``[B, D]`` float32 or bfloat16 rows / columns, batch-sharded on a mesh.
      s: float32 ``[B]`` per-row scale. bias: optional float32 ``[B]`` per-row offset of ``t``.
      valid: bool ``[B]``; False examples are removed as rows and as columns (``mb = NEG``).
      row_extra / col_extra: dicts of ``[B, ...]`` arrays the tiles read under their names
        (constants: no gradient flows to them); may not use the driver's names ``x, s, b, mb,
        gid`` / ``y, mb, gid``.
      impl: ``"chunked"`` or ``"ring"``. block_size: tile edge (need not divide the batch).
      mesh, batch_axes: as :func:`resolve_mesh`; the global batch must divide over the devices.

    Returns:
      the kernel's ``finish`` dict of ``[B, ...]`` float32 arrays, differentiable in x, y, s and
      bias through the block-recompute backward.
    """
    check_impl(impl)
    if impl == "dense":
        raise ValueError("stream() runs impl='chunked' or 'ring'; 'dense' is the caller's reference path")
    for k in list(row_extra or {}) + list(col_extra or {}):
        if k in ROW_KEYS + COL_KEYS:
            raise ValueError(f"extra name {k!r} is reserved by the streaming driver "
                             f"({', '.join(sorted(set(ROW_KEYS + COL_KEYS)))})")
    mesh_, axes = resolve_mesh(mesh, batch_axes, x)
    cfg = _Cfg(kernel, impl == "ring", int(block_size), mesh_, axes)
    B = x.shape[0]
    if mesh_ is not None and B % _n_devices(cfg):
        raise ValueError(
            f"global batch {B} is not divisible by the {_n_devices(cfg)} devices along batch axes {axes}; "
            "pad the batch and pass valid=False for the padding")
    mb = jnp.where(valid, 0.0, NEG).astype(F32)
    rex = {k: lax.stop_gradient(v) for k, v in (row_extra or {}).items()}
    cex = {k: lax.stop_gradient(v) for k, v in (col_extra or {}).items()}
    return _core(cfg, x, y, s, () if bias is None else (bias,), mb, rex, cex)
