"""Ranking metrics on embeddings: zero-shot top-k accuracy and 1:1 retrieval recall@k.

Ties (documented convention, pessimistic): the *rank* of the true item is the number of other
candidates whose similarity is ``>=`` the true one's. A query is a hit at ``k`` iff ``rank < k``,
i.e. the true item is strictly above all but fewer than ``k`` other candidates. So a true item
tied with others counts as ranked after all of them, and the result never depends on the order
of candidates. Identical captions would be such ties, so retrieval takes optional ``groups``:
items of one group (e.g. the same caption string) are interchangeable, and a query is a hit when
any member of its true group is ranked within k among the candidates OUTSIDE that group.

Similarities are computed in float32 on the host in blocks of queries, so memory is
O(block_size · num_candidates), never the full [N, N] matrix.
"""
from __future__ import annotations

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
      candidate_groups: optional ``[Nc]`` int; candidates sharing the true candidate's group
        count as correct: the rank is then ``#{j : g_j != g_t, s_j >= max_{i: g_i = g_t} s_i}``.

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
        candidate_groups = np.asarray(candidate_groups)
        if candidate_groups.shape != (num_c,):
            raise ValueError(f"candidate_groups must be [{num_c}], got shape {candidate_groups.shape}")
    ranks = np.empty(queries.shape[0], dtype=np.int64)
    for start in range(0, queries.shape[0], block_size):
        stop = min(start + block_size, queries.shape[0])
        sims = queries[start:stop] @ candidates.T  # [b, Nc]
        # The true similarity is read from the same matrix, so the true item compares equal to
        # itself exactly once (hence the -1) whatever rounding the matmul did.
        true = sims[np.arange(stop - start), targets[start:stop]]
        if candidate_groups is None:
            r = np.sum(sims >= true[:, None], axis=1) - 1
        else:
            same = candidate_groups[None, :] == candidate_groups[targets[start:stop]][:, None]
            best = np.max(np.where(same, sims, -np.inf), axis=1)
            r = np.sum((sims >= best[:, None]) & ~same, axis=1)
        ranks[start:stop] = np.where(np.isnan(true), num_c, r)
    return ranks


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
      without examples), 'mean_per_class_top1': float (mean over classes with examples)}``.
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


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    ks: Sequence[int] = (1, 5),
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Image↔text recall@k with 1:1 pairing (item i's caption is text i), pessimistic ties.

    Args:
      image_emb: ``[N, D]`` float; text_emb: ``[N, D]`` float.
      groups: optional ``[N]`` int; items with equal group are interchangeable (e.g. their
        captions are the same string, so no model can tell their texts apart): retrieving any
        member of the true item's group is a hit.
      ks: the k's to report; those with ``k > N`` are skipped (trivially 1.0).

    Returns:
      ``{'image_to_text/R@k': float, 'text_to_image/R@k': float}`` for each reported k.
    """
    image_emb = _as_2d_float32(image_emb, "image_emb")
    text_emb = _as_2d_float32(text_emb, "text_emb")
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"1:1 retrieval needs as many texts as images: {image_emb.shape} vs {text_emb.shape}")
    n = image_emb.shape[0]
    ids = np.arange(n)
    ranks = {
        "image_to_text": true_item_ranks(image_emb, text_emb, ids, block_size=block_size),
        "text_to_image": true_item_ranks(text_emb, image_emb, ids, block_size=block_size),
    }
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must be [{n}], got shape {groups.shape}")
        # A caption list shows each distinct caption once: rank images against one representative
        # text per group; a text query is right if it finds any image of its group.
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        ranks["image_to_text"] = true_item_ranks(image_emb, text_emb[first], inverse, block_size=block_size)
        ranks["text_to_image"] = true_item_ranks(
            text_emb, image_emb, ids, block_size=block_size, candidate_groups=inverse
        )
    out = {}
    for direction, r in ranks.items():
        for k in ks:
            if k <= n:
                out[f"{direction}/R@{k}"] = float(np.mean(r < k))
    return out
