"""MoCo: a momentum encoder (the teacher) and FIFO queues of its past keys as negatives.

``config.loss.name = 'moco'`` builds :class:`MoCo`, a
:class:`contrastive_jax.losses.StatefulObjective` with ``teacher = True``: the train step runs
the model a second time with ``TrainState.ema_params`` (the momentum encoder, no gradient) and
moves those parameters toward the student after each update with :meth:`MoCo.teacher_decay`.

Two modes (``config.loss.moco.mode``):

``'image'`` (MoCo v1/v2/v3, model ``'multiview'`` with ``config.data.num_views >= 2``)
    The query of view a (student) is contrasted against the key of view b (teacher) and vice
    versa; the loss is the mean of both directions (v3's symmetrized loss). Both views' keys
    ``[2B, D]`` enter one queue.
``'image_text'`` (cross-modal queues, as in BriVL)
    Image queries (student) against the teacher's text keys plus a text queue, and text queries
    against the teacher's image keys plus an image queue; the loss is the mean of both
    directions. Each modality keeps its own queue.

For one direction with queries ``q`` ``[B, D]``, keys ``k`` ``[B, D]`` and a queue ``Q`` ``[K, D]``
(all unit vectors; ``k`` and ``Q`` constants), the loss is the InfoNCE (cross-entropy of the
positive ``k_i`` among the candidates)::

    l_i = log( sum_{j in negatives(i) + {i}} exp(s <q_i, k_j>) + sum_{m < filled} exp(s <q_i, Q_m>) )
          - s <q_i, k_i>

with ``s = 1 / temperature`` (or the model's learned ``scale``). ``negatives(i)`` is every other
key of the global batch (``in_batch_negatives=True``, MoCo v3; the only negatives when
``queue_size = 0``) or nothing (False: MoCo v1/v2, positive + queue only). Queue slots not yet
written are masked out rather than filled with random vectors as in the paper's code, so step 0
is the in-batch loss and the loss never sees made-up negatives.

Implementations (``config.loss.impl``): ``'dense'`` materializes the ``[B, B + K]`` logits (the
reference); ``'chunked'`` never does: it streams over blocks of the candidate columns with an
online log-sum-exp under a ``jax.custom_vjp`` that saves only the per-row log-sum-exp and
recomputes each block in the backward (the recipe of :mod:`.streaming`, specialised to
``B x (B + K)`` with constant columns, so the backward only accumulates ``dq``). On a mesh it runs
inside ``shard_map``: queries and keys are batch-sharded, the queue is sharded along ``K``; step
``t`` all-gathers the ``t``-th slice of every device's candidate columns (keys then queue slots),
so a device holds one gathered block at a time. Memory per device: O((b + K/n) D + block^2).

Queue update (after the loss, from the teacher's keys): FIFO with a write pointer. ``N`` new keys
go to slots ``ptr, ptr + 1, ... (mod K)``; ``ptr <- (ptr + N) mod K``; ``filled <- min(filled + N,
K)``. ``K`` need not be a multiple of ``N``: writes wrap around the end of the buffer; when
``N > K`` only the newest ``K`` keys are kept.

References: MoCo (He, Fan, Wu, Xie & Girshick 2020, "Momentum Contrast for Unsupervised Visual
Representation Learning"); MoCo v2 (Chen, Fan, Girshick & He 2020, "Improved Baselines with
Momentum Contrastive Learning"); MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training
Self-Supervised Vision Transformers": symmetrized loss, no queue, cosine momentum schedule);
BriVL / WenLan (Huo et al. 2021, "WenLan: Bridging Vision and Language by Large-Scale Multi-Modal
Pre-Training": momentum encoders with one queue per modality for image-text pairs); the streamed
log-sum-exp as in Inf-CL (Cheng et al. 2024). MoCo v3's prediction head on the query side is not
part of this objective (it is a model component; ``models/`` has none yet).
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses.stateful import StatefulObjective
from contrastive_jax.losses.streaming import NEG, block_layout, dot_nt, online_logsumexp, pack_blocks, resolve_mesh

F32 = jnp.float32
MODES = ("image", "image_text")
IMPLS = ("dense", "chunked")
SCHEDULES = ("constant", "cosine")


# --------------------------------------------------------------------------------------------
# momentum schedule
# --------------------------------------------------------------------------------------------


def momentum_at(step, *, base: float, schedule: str = "constant", total_steps: int = 0) -> jax.Array:
    """Teacher EMA decay after update ``step`` (int scalar) -> float32 scalar.

    ``'constant'``: ``base`` (MoCo v1/v2: 0.999). ``'cosine'`` (MoCo v3): ``1 - (1 - base) *
    (1 + cos(pi * t / T)) / 2`` with ``t = min(step, T)``, ``T = total_steps``: ``base`` at step 0,
    rising to 1 at ``T`` and held there.
    """
    if schedule == "constant":
        return jnp.asarray(base, F32)
    t = jnp.minimum(jnp.asarray(step, F32), float(total_steps))
    return (1.0 - (1.0 - base) * 0.5 * (1.0 + jnp.cos(math.pi * t / float(total_steps)))).astype(F32)


# --------------------------------------------------------------------------------------------
# InfoNCE against keys + queue: dense reference and streamed implementation
# --------------------------------------------------------------------------------------------


def queue_bias(queue_size: int, filled) -> jax.Array:
    """Additive mask of the queue slots, float32 [K]: 0 for the ``filled`` written slots (slots are
    written from 0 upward, so they are the first ``filled``), ``NEG`` for the rest."""
    return jnp.where(jnp.arange(queue_size) < filled, 0.0, NEG).astype(F32)


def _dense_lse(q, s, k, queue, qbias, in_batch_negatives):
    cos = jnp.dot(q, k.astype(q.dtype).T, preferred_element_type=F32)
    t = s[:, None] * cos
    if not in_batch_negatives:
        t = jnp.where(jnp.eye(q.shape[0], dtype=bool), t, NEG)
    parts = [t]
    if queue is not None:
        parts.append(s[:, None] * jnp.dot(q, queue.astype(q.dtype).T, preferred_element_type=F32) + qbias[None, :])
    return jax.nn.logsumexp(jnp.concatenate(parts, axis=1), axis=1)


class _Cfg(NamedTuple):
    block_size: int
    in_batch_negatives: bool
    mesh: Any
    axes: Any


def _sweep(cfg, n, axes, q, s, k, queue, qbias, row_extra, row_init, tile):
    """Visit every (row block x candidate-column block) tile of this device's queries once.

    Columns are this device's keys ``[b]`` then its queue slots ``[K/n]``; step ``t`` gathers the
    ``t``-th slice of every device's columns (one block of ``n * c``). ``tile(r, rst, c, t_ij) ->
    rst`` updates the row state from the masked logits ``t_ij`` float32 [rb, n*c]; ``r`` holds
    ``x``, ``s`` and ``row_extra``. Returns the row state unpacked to [b, ...].
    """
    b = q.shape[0]
    dev = 0 if axes is None else lax.axis_index(axes)
    ys, gids, biases = [k.astype(q.dtype)], [dev * b + jnp.arange(b, dtype=jnp.int32)], [jnp.zeros((b,), F32)]
    if queue is not None:
        ys.append(queue.astype(q.dtype))
        gids.append(jnp.full((queue.shape[0],), -1, jnp.int32))  # -1: a queue slot, never a positive
        biases.append(qbias)
    cols = dict(y=jnp.concatenate(ys), gid=jnp.concatenate(gids), mb=jnp.concatenate(biases))
    nsteps, c = block_layout(cols["y"].shape[0], -(-cfg.block_size // n))
    fills = dict(y=0, gid=-1, mb=NEG)
    C = {key: pack_blocks(v, nsteps, c, fills[key]) for key, v in cols.items()}
    nr, rb = block_layout(b, cfg.block_size)
    # Padded rows have s = 0 and id -2 (matches no key); their results are dropped.
    rows = dict(row_extra, x=q, s=s, gid=dev * b + jnp.arange(b, dtype=jnp.int32))
    rfills = dict(x=0, s=0.0, gid=-2)
    R = {key: pack_blocks(v, nr, rb, rfills.get(key, 0)) for key, v in rows.items()}
    take = lambda tree, i: jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)
    put = lambda tree, i, v: jax.tree.map(lambda a, u: lax.dynamic_update_index_in_dim(a, u, i, 0), tree, v)

    def step(row_state, Ct):
        G = Ct if axes is None else jax.tree.map(lambda a: lax.all_gather(a, axes, axis=0, tiled=True), Ct)

        def inner(i, row_state):
            r = take(R, i)
            t = r["s"][:, None] * dot_nt(r["x"], G["y"]) + G["mb"][None, :]
            if not cfg.in_batch_negatives:
                # MoCo v1/v2: another example's key is not a negative (queue slots have gid -1).
                other = (G["gid"][None, :] >= 0) & (G["gid"][None, :] != r["gid"][:, None])
                t = jnp.where(other, NEG, t)
            return put(row_state, i, tile(r, take(row_state, i), G, t))

        return lax.fori_loop(0, nr, inner, row_state), None

    row_state, _ = lax.scan(step, row_init(nr, rb), C)
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:b], row_state)


def _lse_local(cfg, n, axes, q, s, k, queue, qbias):
    def tile(r, rst, G, t):
        m, l = online_logsumexp(rst["m"], rst["l"], t, 1)
        return dict(m=m, l=l)

    init = lambda nr, rb: dict(m=jnp.full((nr, rb), -jnp.inf, F32), l=jnp.zeros((nr, rb), F32))
    st = _sweep(cfg, n, axes, q, s, k, queue[0] if queue else None, qbias[0] if qbias else None, {}, init, tile)
    return st["m"] + jnp.log(st["l"])


def _grad_local(cfg, n, axes, q, s, k, queue, qbias, lse, g):
    """``dq``, ``ds`` of ``sum_i g_i lse_i``: ``u_i = g_i sum_j p_ij y_j``, ``dq = s u``, ``ds = <q, u>``."""
    D = q.shape[1]

    def tile(r, rst, G, t):
        p = r["_g"][:, None] * jnp.exp(t - r["_lse"][:, None])
        u = lax.dot_general(p.astype(G["y"].dtype), G["y"], (((1,), (0,)), ((), ())), preferred_element_type=F32)
        return dict(u=rst["u"] + u)

    init = lambda nr, rb: dict(u=jnp.zeros((nr, rb, D), F32))
    st = _sweep(cfg, n, axes, q, s, k, queue[0] if queue else None, qbias[0] if qbias else None,
                dict(_lse=lse, _g=g), init, tile)
    u = st["u"]
    return (s[:, None] * u).astype(q.dtype), jnp.einsum("bd,bd->b", q.astype(F32), u)


def _sharded(cfg, fn, n_in, out_specs):
    """``fn(n, axes, *args)`` for global arrays: ``shard_map`` with every argument split along its
    leading dim (queries, keys by batch; the queue along K), or the plain call without a mesh."""
    if cfg.mesh is None:
        return functools.partial(fn, 1, None)
    n = math.prod(cfg.mesh.shape[a] for a in cfg.axes)
    return jax.shard_map(functools.partial(fn, n, cfg.axes), mesh=cfg.mesh, in_specs=(P(cfg.axes),) * n_in,
                         out_specs=out_specs, check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _streamed_lse(cfg, q, s, k, queue, qbias):
    return _streamed_lse_fwd(cfg, q, s, k, queue, qbias)[0]


def _streamed_lse_fwd(cfg, q, s, k, queue, qbias):
    lse = _sharded(cfg, functools.partial(_lse_local, cfg), 5, P(cfg.axes))(q, s, k, queue, qbias)
    return lse, (q, s, k, queue, qbias, lse)


def _streamed_lse_bwd(cfg, res, g):
    q, s, k, queue, qbias, lse = res
    spec = P(cfg.axes)
    dq, ds = _sharded(cfg, functools.partial(_grad_local, cfg), 7, (spec, spec))(
        q, s, k, queue, qbias, lse, g.astype(F32))
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    return dq, ds, jnp.zeros_like(k), zeros(queue), zeros(qbias)


_streamed_lse.defvjp(_streamed_lse_fwd, _streamed_lse_bwd)


def moco_infonce(q, k, queue=None, *, scale, queue_filled=None, in_batch_negatives: bool = True,
                 impl: str = "dense", block_size: int = 1024, mesh=None, batch_axes=None) -> jax.Array:
    """Mean InfoNCE of queries against their keys, the other keys and a queue (module docstring).

    Args:
      q: ``[B, D]`` float32 / bfloat16 unit-norm queries (the student's); differentiated.
      k: ``[B, D]`` unit-norm keys (the teacher's); ``k[i]`` is the positive of ``q[i]``. Constant
        (stop-gradient).
      queue: ``[K, D]`` unit-norm past keys, or None (no queue). Constant.
      scale: float32 scalar or ``[B]``: the inverse temperature ``s`` (differentiable).
      queue_filled: int scalar, how many queue slots (from slot 0) hold keys; None: all ``K``.
      in_batch_negatives: whether the other keys of the batch are negatives.
      impl: ``'dense'`` (materializes ``[B, B + K]``) or ``'chunked'`` (streams, same value and
        gradient). block_size: tile edge for ``'chunked'``.
      mesh, batch_axes: the mesh and the axes the batch (and the queue's K) are split over, as in
        :func:`contrastive_jax.losses.streaming.resolve_mesh`; B and K must divide over them.

    Returns:
      float32 scalar, ``mean_i l_i`` (nats).
    """
    if impl not in IMPLS:
        raise ValueError(f"moco_infonce impl={impl!r} is not supported; valid: {', '.join(IMPLS)}")
    if q.ndim != 2 or k.shape != q.shape:
        raise ValueError(f"moco_infonce needs queries and keys of one shape [B, D]; got {q.shape} and {k.shape}")
    if queue is not None and (queue.ndim != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"moco_infonce queue must be [K, {q.shape[1]}]; got {queue.shape}")
    if queue is not None and queue.shape[0] == 0:
        queue = None
    if queue is None and not in_batch_negatives:
        raise ValueError("moco_infonce without in-batch negatives needs a non-empty queue (no negatives otherwise)")
    B = q.shape[0]
    s = jnp.broadcast_to(jnp.asarray(scale, F32), (B,))
    k, queue = lax.stop_gradient(k), None if queue is None else lax.stop_gradient(queue)
    qbias = None
    if queue is not None:
        qbias = queue_bias(queue.shape[0], queue.shape[0] if queue_filled is None else queue_filled)
    if impl == "dense":
        lse = _dense_lse(q, s, k, queue, qbias, in_batch_negatives)
    else:
        mesh_, axes = resolve_mesh(mesh, batch_axes, q)
        cfg = _Cfg(int(block_size), bool(in_batch_negatives), mesh_, axes)
        if mesh_ is not None:
            n = math.prod(mesh_.shape[a] for a in axes)
            if B % n or (queue is not None and queue.shape[0] % n):
                raise ValueError(f"moco_infonce: batch {B} and queue size {0 if queue is None else queue.shape[0]} "
                                 f"must both divide over the {n} devices of batch axes {axes}")
        wrap = lambda a: () if a is None else (a,)
        lse = _streamed_lse(cfg, q, s, k, wrap(queue), wrap(qbias))
    pos = s * jnp.einsum("bd,bd->b", q, k.astype(q.dtype), preferred_element_type=F32)
    return jnp.mean(lse - pos)


# --------------------------------------------------------------------------------------------
# queue update
# --------------------------------------------------------------------------------------------


def enqueue(queue: jax.Array, ptr: jax.Array, filled: jax.Array, keys: jax.Array):
    """FIFO write of ``keys`` ``[N, D]`` into the ring buffer ``queue`` ``[K, D]`` (K > 0).

    Slots ``ptr .. ptr + N - 1 (mod K)`` receive the keys in order (wrapping past the end);
    with ``N > K`` only the last ``K`` keys are written (the earlier ones would be overwritten
    within the same step). Returns ``(queue, ptr, filled)``: ``ptr <- (ptr + N) mod K``,
    ``filled <- min(filled + N, K)`` (int32 scalars). Written as a per-slot select so that a
    K-sharded queue is updated in place on every device.
    """
    K, N = queue.shape[0], keys.shape[0]
    kept = min(N, K)
    keys = lax.stop_gradient(keys[N - kept:]).astype(queue.dtype)
    start = (ptr + (N - kept)) % K
    off = (jnp.arange(K, dtype=jnp.int32) - start) % K  # position of each slot in the write order
    new = jnp.where((off < kept)[:, None], jnp.take(keys, jnp.minimum(off, kept - 1), axis=0), queue)
    return new, ((ptr + N) % K).astype(jnp.int32), jnp.minimum(filled + N, K).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------


class MoCo(StatefulObjective):
    """The MoCo / cross-modal-queue objective (module docstring); built by :func:`build`.

    State (``init_state``): ``queue_<name>`` float32 ``[K, D]`` per queue (``'image'`` in image
    mode; ``'image'`` and ``'text'`` in image-text mode; none when ``K = 0``), split along K over
    the batch axes; ``ptr`` int32 (next slot to write) and ``filled`` int32 (written slots),
    replicated.

    Metrics: ``loss_<direction>`` per direction (``a_to_b``/``b_to_a`` or
    ``image_to_text``/``text_to_image``), ``pos_cos`` (mean cosine of a query and its positive
    key), ``momentum`` (this step's teacher decay), ``queue_filled`` (fraction of the queue in use
    after this step).
    """

    teacher = True

    def __init__(self, *, mode: str = "image", queue_size: int = 0, embed_dim: int = 0, temperature: float = 0.2,
                 learned_scale: bool = False, momentum: float = 0.99, momentum_schedule: str = "constant",
                 momentum_steps: int = 0, in_batch_negatives: bool = True, views_key: str = "image_views",
                 image_key: str = "image", text_key: str = "text", impl: str = "dense", block_size: int = 1024,
                 mesh=None, batch_axes=None):
        self.mode, self.K, self.D = mode, int(queue_size), int(embed_dim)
        self.temperature, self.learned_scale = float(temperature), bool(learned_scale)
        self.momentum, self.schedule, self.momentum_steps = float(momentum), momentum_schedule, int(momentum_steps)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.views_key, self.image_key, self.text_key = views_key, image_key, text_key
        self.kw = dict(impl=impl, block_size=int(block_size), mesh=mesh,
                       batch_axes=tuple(batch_axes) if batch_axes is not None else None)

    @property
    def queue_names(self) -> tuple[str, ...]:
        if not self.K:
            return ()
        return ("image",) if self.mode == "image" else ("image", "text")

    def init_state(self):
        st = {f"queue_{m}": jnp.zeros((self.K, self.D), F32) for m in self.queue_names}
        st.update(ptr=jnp.zeros((), jnp.int32), filled=jnp.zeros((), jnp.int32))
        return st

    def state_specs(self, batch_axes):
        spec = P(tuple(batch_axes)) if batch_axes else P()
        st = {f"queue_{m}": spec for m in self.queue_names}
        st.update(ptr=P(), filled=P())
        return st

    def teacher_decay(self, step):
        return momentum_at(step, base=self.momentum, schedule=self.schedule, total_steps=self.momentum_steps)

    def _pairs(self, out):
        """[(name, query, key, queue name)] per direction, and the keys to enqueue per queue."""
        teacher = out.get("teacher")
        if teacher is None:
            raise KeyError("config.loss.name='moco' needs the teacher's outputs in outputs['teacher'] (the train "
                           "step provides them for objectives with teacher=True)")
        sg = lax.stop_gradient
        if self.mode == "image":
            v, tv = out[self.views_key], sg(teacher[self.views_key])
            if v.ndim != 3 or v.shape[1] < 2:
                raise ValueError(f"config.loss.moco.mode='image' needs outputs[{self.views_key!r}] of shape [B, V>=2, "
                                 f"D] (model 'multiview', config.data.num_views >= 2); got {v.shape}")
            pairs = [("a_to_b", v[:, 0], tv[:, 1], "image"), ("b_to_a", v[:, 1], tv[:, 0], "image")]
            return pairs, {"image": jnp.concatenate([tv[:, 0], tv[:, 1]], axis=0)}
        x, y = out[self.image_key], out[self.text_key]
        tx, ty = sg(teacher[self.image_key]), sg(teacher[self.text_key])
        pairs = [("image_to_text", x, ty, "text"), ("text_to_image", y, tx, "image")]
        return pairs, {"image": tx, "text": ty}

    def __call__(self, outputs, batch, state, step):
        pairs, new_keys = self._pairs(outputs)
        D = pairs[0][1].shape[-1]
        if self.K and D != self.D:
            raise ValueError(f"config.loss.moco.embed_dim={self.D} is invalid: the model's embeddings have D={D} "
                             "(set it to config.model.embed_dim)")
        scale = outputs["scale"] if self.learned_scale else jnp.float32(1.0 / self.temperature)
        metrics, total = {}, 0.0
        for name, q, k, qname in pairs:
            queue = state.get(f"queue_{qname}")
            loss = moco_infonce(q, k, queue, scale=scale, queue_filled=state["filled"],
                                in_batch_negatives=self.in_batch_negatives, **self.kw)
            metrics[f"loss_{name}"] = loss
            total = total + loss / len(pairs)
        metrics["pos_cos"] = lax.stop_gradient(
            sum(jnp.mean(jnp.sum(q.astype(F32) * k.astype(F32), -1)) for _, q, k, _ in pairs) / len(pairs))
        metrics["momentum"] = self.teacher_decay(step)
        new_state = dict(state)
        if self.K:
            ptr, filled = state["ptr"], state["filled"]
            for qname, keys in new_keys.items():
                new_state[f"queue_{qname}"], p, f = enqueue(state[f"queue_{qname}"], ptr, filled, keys)
            new_state.update(ptr=p, filled=f)
            metrics["queue_filled"] = f.astype(F32) / self.K
        return total, metrics, jax.tree.map(lax.stop_gradient, new_state)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.loss.moco.{field}={value!r} is invalid: {why}")


def _int(m, field, lo):
    v = m.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(field, v, f"must be an integer >= {lo}")
    return v


def _float(m, field, lo, hi, lo_open=False):
    v = m.get(field)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
        raise _bad(field, v, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def build(loss_config, mesh, batch_axes) -> MoCo:
    """The :class:`MoCo` of ``config.loss`` (its ``impl``, ``block_size`` and ``moco`` group; see
    :mod:`contrastive_jax.losses.config`). Raises ValueError naming the first invalid field."""
    m = loss_config.moco
    impl = str(loss_config.impl)
    if impl not in IMPLS:
        raise ValueError(f"config.loss.impl={impl!r} is not supported by config.loss.name='moco'; valid: "
                         f"{', '.join(IMPLS)}")
    mode = m.get("mode")
    if mode not in MODES:
        raise _bad("mode", mode, f"must be one of {', '.join(MODES)}")
    K = _int(m, "queue_size", 0)
    D = _int(m, "embed_dim", 0)
    if K and not D:
        raise _bad("embed_dim", D, "must be the model's embedding dim (config.model.embed_dim) when queue_size > 0")
    if K and mesh is not None:
        _, axes = resolve_mesh(mesh, batch_axes, None)
        n = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if K % n:
            raise _bad("queue_size", K, f"must be a multiple of the {n} devices the batch is split over "
                                        "(the queue is sharded along K)")
    temperature = _float(m, "temperature", 0.0, math.inf, lo_open=True)
    learned = m.get("learned_scale")
    if not isinstance(learned, bool):
        raise _bad("learned_scale", learned, "must be true or false")
    momentum = _float(m, "momentum", 0.0, 1.0)
    schedule = m.get("momentum_schedule")
    if schedule not in SCHEDULES:
        raise _bad("momentum_schedule", schedule, f"must be one of {', '.join(SCHEDULES)}")
    steps = _int(m, "momentum_steps", 0)
    if schedule == "cosine" and steps < 1:
        raise _bad("momentum_steps", steps, "must be >= 1 with momentum_schedule='cosine' (set it to the run's "
                                            "total steps)")
    ibn = m.get("in_batch_negatives")
    if not isinstance(ibn, bool):
        raise _bad("in_batch_negatives", ibn, "must be true or false")
    if not ibn and not K:
        raise _bad("in_batch_negatives", ibn, "False needs queue_size > 0 (there would be no negatives)")
    block = loss_config.block_size
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"config.loss.block_size={block!r} is invalid: must be a positive integer")
    return MoCo(mode=mode, queue_size=K, embed_dim=D, temperature=temperature, learned_scale=learned,
                momentum=momentum, momentum_schedule=schedule, momentum_steps=steps, in_batch_negatives=ibn,
                views_key=str(m.get("views_key")), image_key=str(m.get("image_key")), text_key=str(m.get("text_key")),
                impl=impl, block_size=int(block), mesh=mesh, batch_axes=batch_axes)
