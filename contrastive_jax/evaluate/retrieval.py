"""Sharded, streaming retrieval: exact ranks of the positives and the top-k list of every query.

The query × gallery similarity matrix never exists, neither on the host nor on a device. The
gallery ``[Ng, D]`` is split in contiguous row shards over the mesh's batch axes; each device
walks its shard in blocks of ``gallery_block`` rows and keeps, per query, (1) the best positive
score, (2) a count of negatives scoring at least that, (3) a running top-k. Per-device states
are merged with ``pmax`` / ``psum`` / an all-gather of the k candidates. Queries travel in
host-side blocks of ``query_block`` rows, so device memory is
O(Ng·D / devices + query_block · (gallery_block + k)).

Positives are given as small label SETS: query ``i`` and gallery item ``j`` are a positive pair
when ``query_labels[i]`` and ``gallery_labels[j]`` share a label. This covers 1:1 pairs (label =
index), several captions per image (an image carries its captions' labels) and interchangeable
identical captions (label = caption string id).

Rank convention (pessimistic, independent of gallery order): the rank of query ``i`` is the
number of NEGATIVE gallery items whose similarity is ``>=`` the best positive's; 0 = a positive
is strictly first. A query is a hit at ``k`` iff ``rank < k``. A NaN best-positive score gives
rank ``Ng`` (a miss everywhere).

Top-k order: score descending, ties broken by the lower gallery index — the same list as a
stable full sort of the row (NaN scores are treated as ``-inf``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

QUERY_PAD = -1  # label padding of query label sets; never equal to GALLERY_PAD
GALLERY_PAD = -2


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _as_label_sets(labels, n: int, pad: int, name: str) -> np.ndarray:
    """``[n]`` or ``[n, P]`` ints -> ``[n, P]`` int32 (negative entries = padding)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != n:
        raise ValueError(f"{name} must be [{n}] or [{n}, P], got shape {labels.shape}")
    if labels.size and labels.max() >= 2**31 - 1:
        raise ValueError(f"{name} must fit in int32")
    labels = labels.astype(np.int32)
    return np.where(labels < 0, pad, labels).astype(np.int32)


@dataclasses.dataclass
class ShardedGallery:
    """A gallery placed row-sharded on a mesh, padded to whole blocks, with a validity mask.

    Build with :func:`shard_gallery`. Attributes: ``emb`` ``[Ng_pad, D]`` float32 (padding rows
    are ignored through ``valid``), ``labels`` ``[Ng_pad, P]`` int32, ``valid`` ``[Ng_pad]`` bool,
    ``index`` ``[Ng_pad]`` int32 global row ids, ``num_items`` = Ng, ``block`` rows per step,
    ``mesh`` / ``axes`` (None: one device, no collectives).
    """

    emb: jax.Array
    labels: jax.Array
    valid: jax.Array
    index: jax.Array
    num_items: int
    block: int
    mesh: Mesh | None
    axes: tuple[str, ...] | None


def _num_shards(mesh: Mesh | None, axes: Sequence[str] | None) -> int:
    if mesh is None or not axes:
        return 1
    return math.prod(mesh.shape[a] for a in axes)


def padded_gallery_size(num_items: int, mesh: Mesh | None, axes: Sequence[str] | None, block: int) -> tuple[int, int]:
    """``(padded rows, block)``: rows rounded up to whole blocks on every shard; the block shrinks
    for small galleries so padding stays below one block per shard."""
    shards = _num_shards(mesh, axes)
    per_shard = max(-(-num_items // shards), 1)
    block = max(8, min(int(block), _round_up(per_shard, 8)))
    return _round_up(per_shard, block) * shards, block


def _place(mesh, spec, shape, dtype, fill_fn):
    """Global array of ``shape`` built shard by shard (no padded host copy of the whole array)."""
    if mesh is None:
        idx = tuple(slice(0, s) for s in shape)
        return jnp.asarray(fill_fn(idx))
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(shape, sharding, fill_fn)


def _padded_slice(array: np.ndarray, idx, n_rows: int, fill) -> np.ndarray:
    rows = idx[0]
    start, stop = rows.start or 0, rows.stop if rows.stop is not None else n_rows
    part = array[start:min(stop, array.shape[0])]
    if part.shape[0] < stop - start:
        pad = np.full((stop - start - part.shape[0],) + array.shape[1:], fill, array.dtype)
        part = np.concatenate([part, pad], axis=0)
    return part[(slice(None),) + tuple(idx[1:])]


def shard_gallery(
    emb,
    labels=None,
    *,
    mesh: Mesh | None = None,
    axes: Sequence[str] | None = None,
    block: int = 4096,
    num_items: int | None = None,
) -> ShardedGallery:
    """Places a gallery for :func:`streaming_retrieval`.

    Args:
      emb: ``[Ng, D]`` float (numpy: placed shard by shard, padded with zero rows), or a global
        ``jax.Array`` already of the padded size (``padded_gallery_size``) — e.g. generated on
        the devices — whose first ``num_items`` rows are real.
      labels: ``[Ng]`` or ``[Ng, P]`` ints, the positive-label set of each item (negative =
        none); default: no labels (top-k only).
      mesh, axes: the mesh and the axes the rows are split over (None: one device).
      block: gallery rows per streaming step on each device.
      num_items: real rows when ``emb`` is pre-padded.
    """
    axes = tuple(axes) if axes else None
    if mesh is not None and not axes:
        mesh = None  # nothing to split over: one logical device
    is_jax = isinstance(emb, jax.Array)
    n = int(num_items if num_items is not None else emb.shape[0])
    if len(emb.shape) != 2:
        raise ValueError(f"gallery embeddings must be [Ng, D], got shape {tuple(emb.shape)}")
    n_pad, block = padded_gallery_size(n, mesh, axes, block)
    d = int(emb.shape[1])
    row_spec = P(axes) if axes else P()
    if is_jax:
        if emb.shape[0] != n_pad:
            raise ValueError(f"a pre-placed gallery must have {n_pad} rows (padded_gallery_size), got {emb.shape[0]}")
        g = emb.astype(jnp.float32)
    else:
        host = np.asarray(emb, np.float32)
        g = _place(mesh, P(axes, None) if axes else P(), (n_pad, d), np.float32,
                   lambda idx: _padded_slice(host, idx, n_pad, 0.0))
    if labels is None:
        lab = np.full((n, 1), GALLERY_PAD, np.int32)
    else:
        lab = _as_label_sets(labels, n, GALLERY_PAD, "gallery labels")
    lab_arr = _place(mesh, P(axes, None) if axes else P(), (n_pad, lab.shape[1]), np.int32,
                     lambda idx: _padded_slice(lab, idx, n_pad, GALLERY_PAD))
    rows = np.arange(n_pad)
    valid = _place(mesh, row_spec, (n_pad,), bool, lambda idx: rows[idx] < n)
    index = _place(mesh, row_spec, (n_pad,), np.int32, lambda idx: rows[idx].astype(np.int32))
    return ShardedGallery(g, lab_arr, valid, index, n, block, mesh, axes)


def _local_search(q, ql, g, gl, valid, gidx, *, k, block, axes, with_ranks):
    """One device: queries ``q [qb, D]`` (replicated) against its gallery shard ``g [n, D]``."""
    qb = q.shape[0]
    n_blocks = g.shape[0] // block
    neg_inf = jnp.float32(-jnp.inf)

    def block_at(i):
        sl = lambda a: lax.dynamic_slice_in_dim(a, i * block, block, axis=0)  # noqa: E731
        gb, glb, vb, ib = sl(g), sl(gl), sl(valid), sl(gidx)
        s = jnp.dot(q, gb.T, precision=lax.Precision.HIGHEST)  # [qb, block]
        pos = jnp.zeros(s.shape, bool)
        for a in range(ql.shape[1]):  # label sets are small: unrolled pairwise comparisons
            for b in range(glb.shape[1]):
                pos = pos | (ql[:, a, None] == glb[None, :, b])
        return s, pos & vb[None, :], vb, ib

    def pass1(i, carry):
        best, nan, top_s, top_i = carry
        s, pos, vb, ib = block_at(i)
        if with_ranks:
            best = jnp.maximum(best, jnp.max(jnp.where(pos, s, neg_inf), axis=1))
            # A NaN positive score makes the query a miss (flagged, since comparisons with NaN
            # would otherwise count nothing and look like a hit).
            nan = nan | jnp.any(pos & jnp.isnan(s), axis=1)
        # NaN scores sort like -inf; padding rows can never enter the list.
        s_top = jnp.where(vb[None, :] & ~jnp.isnan(s), s, neg_inf)
        cand_s = jnp.concatenate([top_s, s_top], axis=1)
        cand_i = jnp.concatenate([top_i, jnp.broadcast_to(jnp.where(vb, ib, -1)[None, :], s.shape)], axis=1)
        # lax.top_k keeps the earlier position among equal scores; the running list holds lower
        # gallery indices than the current block, so ties resolve to the lower index.
        top_s, pos_k = lax.top_k(cand_s, k)
        top_i = jnp.take_along_axis(cand_i, pos_k, axis=1)
        return best, nan, top_s, top_i

    init = (jnp.full((qb,), neg_inf), jnp.zeros((qb,), bool), jnp.full((qb, k), neg_inf),
            jnp.full((qb, k), -1, jnp.int32))
    best, has_nan, top_s, top_i = lax.fori_loop(0, n_blocks, pass1, init)
    if axes:
        best = lax.pmax(best, axes)
        all_s = lax.all_gather(top_s, axes, axis=1, tiled=True)  # [qb, shards * k], shard order
        all_i = lax.all_gather(top_i, axes, axis=1, tiled=True)
        top_s, pos_k = lax.top_k(all_s, k)
        top_i = jnp.take_along_axis(all_i, pos_k, axis=1)
    if not with_ranks:
        return jnp.zeros((qb,), jnp.int32), jnp.zeros((qb,), bool), top_s, top_i

    def pass2(i, count):
        s, pos, vb, _ = block_at(i)
        neg = vb[None, :] & ~pos
        return count + jnp.sum(neg & (s >= best[:, None]), axis=1, dtype=jnp.int32)

    count = lax.fori_loop(0, n_blocks, pass2, jnp.zeros((qb,), jnp.int32))
    if axes:
        count = lax.psum(count, axes)
        has_nan = lax.psum(has_nan.astype(jnp.int32), axes) > 0
    return count, has_nan, top_s, top_i


@functools.lru_cache(maxsize=32)
def _compiled(mesh, axes, k, block, with_ranks):
    fn = functools.partial(_local_search, k=k, block=block, axes=axes, with_ranks=with_ranks)
    if mesh is None:
        return jax.jit(fn)
    rows = P(axes)
    mapped = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(P(), P(), P(axes, None), P(axes, None), rows, rows),
        out_specs=(P(), P(), P(), P()),
        check_vma=False,
    )
    return jax.jit(mapped)


def _replicated(x: np.ndarray, mesh: Mesh | None):
    if mesh is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


def _fetch(x) -> np.ndarray:
    # Outputs are replicated: every process reads its first local copy (multi-host safe).
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def streaming_retrieval(
    queries,
    gallery: ShardedGallery,
    *,
    query_labels=None,
    k: int = 10,
    query_block: int = 256,
) -> dict[str, np.ndarray]:
    """Ranks of the positives and the top-k gallery items of every query, streamed and sharded.

    Args:
      queries: ``[Nq, D]`` float (every process holds all of them).
      gallery: from :func:`shard_gallery`.
      query_labels: ``[Nq]`` or ``[Nq, P]`` ints, each query's positive-label set (negative =
        padding); None: top-k only.
      k: length of the top list (clipped to the gallery size).
      query_block: queries per device call (memory O(query_block · gallery.block)).

    Returns:
      ``topk_scores [Nq, k]`` float32 and ``topk_indices [Nq, k]`` int64 (gallery rows, sorted
      by score desc then index asc); with labels also ``ranks [Nq]`` int64 (see module
      docstring). Raises ValueError when a query has no positive in the gallery.
    """
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != gallery.emb.shape[1]:
        raise ValueError(f"queries must be [Nq, {gallery.emb.shape[1]}], got shape {queries.shape}")
    nq = queries.shape[0]
    k = max(1, min(int(k), gallery.num_items))
    with_ranks = query_labels is not None
    ql = (_as_label_sets(query_labels, nq, QUERY_PAD, "query labels") if with_ranks
          else np.full((nq, 1), QUERY_PAD, np.int32))
    if with_ranks:
        glab = _fetch_gallery_labels(gallery)
        has_pos = np.isin(ql, glab[glab >= 0]).any(axis=1)
        if not has_pos.all():
            bad = np.flatnonzero(~has_pos)[:5].tolist()
            raise ValueError(f"queries {bad} have no positive item in the gallery (query labels {ql[bad].tolist()})")
    qb = max(1, min(int(query_block), nq))
    fn = _compiled(gallery.mesh, gallery.axes, k, gallery.block, with_ranks)
    ranks = np.zeros(nq, np.int64)
    top_s = np.zeros((nq, k), np.float32)
    top_i = np.zeros((nq, k), np.int64)
    pending = []
    # Dispatch every query block before reading results back, so the device never waits on the host.
    for start in range(0, nq, qb):
        stop = min(start + qb, nq)
        qpart = np.zeros((qb, queries.shape[1]), np.float32)
        lpart = np.full((qb, ql.shape[1]), QUERY_PAD, np.int32)
        qpart[: stop - start], lpart[: stop - start] = queries[start:stop], ql[start:stop]
        out = fn(_replicated(qpart, gallery.mesh), _replicated(lpart, gallery.mesh),
                 gallery.emb, gallery.labels, gallery.valid, gallery.index)
        pending.append((start, stop, out))
    for start, stop, (count, has_nan, s, i) in pending:
        m = stop - start
        ranks[start:stop] = np.where(_fetch(has_nan)[:m], gallery.num_items, _fetch(count)[:m])
        top_s[start:stop], top_i[start:stop] = _fetch(s)[:m], _fetch(i)[:m]
    out = {"topk_scores": top_s, "topk_indices": top_i}
    if with_ranks:
        out["ranks"] = ranks
    return out


def _fetch_gallery_labels(gallery: ShardedGallery) -> np.ndarray:
    from contrastive_jax.parallel.mesh import to_host

    return np.asarray(to_host(gallery.labels))[: gallery.num_items]


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int], num_candidates: int) -> dict[str, float]:
    """``{'R@k': mean(rank < k)}`` for ``k <= num_candidates`` and ``median_rank`` (1 = first)."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float(np.mean(ranks < k)) for k in ks if k <= num_candidates}
    out["median_rank"] = float(np.median(ranks + 1)) if ranks.size else float("nan")
    return out


def retrieval_eval(
    image_emb,
    text_emb,
    *,
    text_image=None,
    text_strings: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    mesh: Mesh | None = None,
    axes: Sequence[str] | None = None,
    gallery_block: int = 4096,
    query_block: int = 256,
    return_topk: int = 0,
) -> dict:
    """Image→text and text→image recall@k and median rank, several captions per image allowed.

    Args:
      image_emb: ``[Ni, D]`` float, L2-normalized.
      text_emb: ``[Nt, D]`` float, L2-normalized.
      text_image: ``[Nt]`` int, the image each text describes (default: 1:1, ``Nt == Ni``).
      text_strings: optional ``Nt`` caption strings. Identical strings are one text: image→text
        ranks over the DISTINCT captions, and a text query is right on any image that has it.
      ks: recall cut-offs (those above the gallery size are skipped).
      mesh, axes: shard galleries over these mesh axes (None: one device).
      return_topk: also return the top-``return_topk`` gallery rows of every query (for
        pictures): ``'image_to_text/topk'`` indexes texts, ``'text_to_image/topk'`` images.

    Returns:
      ``{'image_to_text/R@k', 'image_to_text/median_rank', 'text_to_image/...'}`` floats (and
      the top-k arrays when asked).
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    ni, nt = image_emb.shape[0], text_emb.shape[0]
    if text_image is None:
        if ni != nt:
            raise ValueError(f"1:1 retrieval needs as many texts as images ({nt} vs {ni}); pass text_image")
        text_image = np.arange(nt)
    text_image = np.asarray(text_image).astype(np.int64)
    if text_image.shape != (nt,) or (nt and (text_image.min() < 0 or text_image.max() >= ni)):
        raise ValueError(f"text_image must be [{nt}] ints in [0, {ni})")
    if text_strings is not None:
        if len(text_strings) != nt:
            raise ValueError(f"text_strings has {len(text_strings)} entries for {nt} texts")
        uniq, first, string_id = np.unique(np.asarray(text_strings, dtype=object).astype(str),
                                           return_index=True, return_inverse=True)
    else:
        first, string_id = np.arange(nt), np.arange(nt)
    string_id = string_id.reshape(-1)
    # Each image's label set: the string ids of its captions, padded to the most captions any has.
    per_image = [[] for _ in range(ni)]
    for t, i in enumerate(text_image):
        if string_id[t] not in per_image[i]:
            per_image[i].append(int(string_id[t]))
    if any(len(p) == 0 for p in per_image):
        missing = [i for i, p in enumerate(per_image) if not p][:5]
        raise ValueError(f"images {missing} have no caption")
    width = max(len(p) for p in per_image)
    image_labels = np.full((ni, width), -1, np.int64)
    for i, p in enumerate(per_image):
        image_labels[i, : len(p)] = p
    kmax = max([k for k in ks] + [return_topk, 1])
    results: dict = {}
    texts_gallery = shard_gallery(text_emb[first], np.arange(len(first)), mesh=mesh, axes=axes, block=gallery_block)
    i2t = streaming_retrieval(image_emb, texts_gallery, query_labels=image_labels, k=kmax, query_block=query_block)
    for key, v in recall_from_ranks(i2t["ranks"], ks, len(first)).items():
        results[f"image_to_text/{key}"] = v
    images_gallery = shard_gallery(image_emb, image_labels, mesh=mesh, axes=axes, block=gallery_block)
    t2i = streaming_retrieval(text_emb, images_gallery, query_labels=string_id, k=kmax, query_block=query_block)
    for key, v in recall_from_ranks(t2i["ranks"], ks, ni).items():
        results[f"text_to_image/{key}"] = v
    if return_topk:
        # Map the distinct-caption rows back to text rows (the first text with that string).
        results["image_to_text/topk"] = first[i2t["topk_indices"][:, :return_topk]]
        results["text_to_image/topk"] = t2i["topk_indices"][:, :return_topk]
    return results
