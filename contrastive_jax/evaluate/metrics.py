"""Zero-shot top-k accuracy on the host, from the exact rank of each image's true class.

Ties (documented convention, pessimistic): the *rank* of the true item is the number of other
candidates whose similarity is ``>=`` the true one's. A query is a hit at ``k`` iff ``rank < k``,
i.e. the true item is strictly above all but fewer than ``k`` other candidates. So a true item
tied with others counts as ranked after all of them, and the result never depends on the order
of candidates. Retrieval uses the same convention, sharded and with several positives per query
(:mod:`contrastive_jax.evaluate.retrieval`).

Why a host implementation next to the sharded one: zero-shot candidates are the ``C`` class
embeddings (a handful to a thousand rows), which fit anywhere, and a device program would be
compiled per class count. Similarities are computed in float32 numpy in blocks of queries, so
memory is O(block_size · C).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

DEFAULT_BLOCK_SIZE = 1024


def _as_2d_float32(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {x.shape}")
    return x


def true_item_ranks(
    queries: np.ndarray,
    candidates: np.ndarray,
    targets: np.ndarray,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    candidate_groups: np.ndarray | None = None,
) -> np.ndarray:
    """Pessimistic rank of each query's true candidate under dot-product similarity.

    Args:
      queries: ``[Nq, D]`` float.
      candidates: ``[Nc, D]`` float.
      targets: ``[Nq]`` int, index of each query's true candidate in ``[0, Nc)``.
      block_size: queries per block (memory O(block_size · Nc)).
      candidate_groups: deprecated; optional ``[Nc]`` int: candidates sharing the true one's
        group count as correct, the rank being ``#{j : g_j != g_t, s_j >= max_{i: g_i = g_t} s_i}``.
        Computed by :func:`~contrastive_jax.evaluate.retrieval.streaming_retrieval` (label
        sets), the one implementation of ranks with several positives; use it directly.

    Returns:
      ``[Nq]`` int64: ``#{j != t : s_j >= s_t}`` (0 = strictly best). A NaN true similarity gets
      rank ``Nc`` (a miss at every k), since comparisons with NaN are all False.
    """
    queries = _as_2d_float32(queries, "queries")
    candidates = _as_2d_float32(candidates, "candidates")
    targets = np.asarray(targets)
    if targets.shape != (queries.shape[0],):
        raise ValueError(f"targets must be [{queries.shape[0]}], got shape {targets.shape}")
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"embedding dims differ: {queries.shape[1]} vs {candidates.shape[1]}")
    num_c = candidates.shape[0]
    if targets.size and (targets.min() < 0 or targets.max() >= num_c):
        raise ValueError(f"targets must lie in [0, {num_c}), got [{targets.min()}, {targets.max()}]")
    targets = targets.astype(np.int64)
    if candidate_groups is not None:
        return _grouped_ranks(queries, candidates, targets, candidate_groups, block_size)
    ranks = np.empty(queries.shape[0], dtype=np.int64)
    for start in range(0, queries.shape[0], block_size):
        stop = min(start + block_size, queries.shape[0])
        sims = queries[start:stop] @ candidates.T  # [b, Nc]
        # The true similarity is read from the same matrix, so the true item compares equal to
        # itself exactly once (hence the -1) whatever rounding the matmul did.
        true = sims[np.arange(stop - start), targets[start:stop]]
        r = np.sum(sims >= true[:, None], axis=1) - 1
        ranks[start:stop] = np.where(np.isnan(true), num_c, r)
    return ranks


def _grouped_ranks(queries, candidates, targets, candidate_groups, block_size) -> np.ndarray:
    """The deprecated ``candidate_groups`` path of :func:`true_item_ranks`: the group id is a
    one-label set on both sides of :func:`streaming_retrieval` (one device)."""
    warnings.warn(
        "true_item_ranks(candidate_groups=) is deprecated: ranks with several positives come from "
        "contrastive_jax.evaluate.retrieval.streaming_retrieval (or retrieval_eval(text_strings=) for "
        "identical captions)", DeprecationWarning, stacklevel=3)
    from contrastive_jax.evaluate.retrieval import shard_gallery, streaming_retrieval

    candidate_groups = np.asarray(candidate_groups)
    if candidate_groups.shape != (candidates.shape[0],):
        raise ValueError(f"candidate_groups must be [{candidates.shape[0]}], got shape {candidate_groups.shape}")
    # Dense ids >= 0: negative labels are padding in label sets.
    _, group = np.unique(candidate_groups, return_inverse=True)
    group = group.reshape(-1)
    gallery = shard_gallery(candidates, group)
    return streaming_retrieval(queries, gallery, query_labels=group[targets], k=1,
                               query_block=block_size)["ranks"]


def zero_shot_accuracy(
    image_emb: np.ndarray,
    class_emb: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 5),
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """Top-k zero-shot classification accuracy (pessimistic ties, see module docstring).

    Args:
      image_emb: ``[N, D]`` float (normally L2-normalized).
      class_emb: ``[C, D]`` float, one row per class.
      labels: ``[N]`` int in ``[0, C)``.
      ks: the k's to report; those with ``k > C`` are skipped (trivially 1.0).

    Returns:
      ``{'top{k}': float for k in ks if k <= C, 'per_class_top1': [C] float64 (NaN for classes
      without examples), 'mean_per_class_top1': float (mean over classes with examples)}``, all
      fractions in [0, 1].
    """
    class_emb = _as_2d_float32(class_emb, "class_emb")
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    num_classes = class_emb.shape[0]
    ranks = true_item_ranks(image_emb, class_emb, labels, block_size=block_size)
    out: dict = {}
    for k in ks:
        if k <= num_classes:
            out[f"top{k}"] = float(np.mean(ranks < k)) if ranks.size else float("nan")
    hits = (ranks < 1).astype(np.float64)
    counts = np.bincount(labels, minlength=num_classes)
    sums = np.bincount(labels, weights=hits, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    out["per_class_top1"] = per_class
    out["mean_per_class_top1"] = float(np.nanmean(per_class)) if np.any(counts > 0) else float("nan")
    return out
