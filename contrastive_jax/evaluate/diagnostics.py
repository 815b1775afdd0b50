"""Representation diagnostics on embedding matrices: RankMe, alignment and uniformity, the
modality gap, norm statistics, and Matryoshka prefixes.

Inputs are host numpy arrays ``[N, D]``; everything is computed in float64, blockwise where a
pairwise quantity would otherwise need an ``[N, N]`` matrix.
"""
from __future__ import annotations

import numpy as np


def rankme(emb, eps: float = 1e-7) -> float:
    """RankMe effective rank (Garrido et al., 2023, "RankMe: Assessing the downstream
    performance of pretrained self-supervised representations by their rank").

    With singular values ``σ`` of ``emb`` ``[N, D]``, ``p_k = σ_k / Σσ + eps`` and
    ``RankMe = exp(-Σ_k p_k log p_k)``: between 1 and ``min(N, D)``; it equals ``r`` for a matrix
    with ``r`` equal non-zero singular values.
    """
    emb = np.asarray(emb, np.float64)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"rankme needs a non-empty [N, D] matrix, got shape {emb.shape}")
    sigma = np.linalg.svd(emb, compute_uv=False)
    p = sigma / max(sigma.sum(), np.finfo(np.float64).tiny) + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def alignment(x, y, alpha: float = 2.0) -> float:
    """Alignment loss of positive pairs (Wang & Isola, 2020, "Understanding contrastive
    representation learning through alignment and uniformity on the hypersphere"):
    ``mean_i ||x_i - y_i||₂^alpha``; 0 when every pair coincides, 4 for antipodal unit pairs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"alignment needs two [N, D] arrays of one shape, got {x.shape} and {y.shape}")
    return float(np.mean(np.linalg.norm(x - y, axis=1) ** alpha))


def uniformity(x, t: float = 2.0, *, max_items: int = 8192, seed: int = 0, block: int = 1024) -> float:
    """Uniformity loss (Wang & Isola, 2020): ``log mean_{i<j} exp(-t ||x_i - x_j||²)``.

    Lower is more uniform; ``-2t`` for two antipodal points (the minimum for N = 2). Pairs are
    summed blockwise (no ``[N, N]`` matrix); above ``max_items`` rows a seeded random subset of
    that size is used. A log-sum-exp keeps the sum exact when every term underflows.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs [N >= 2, D] embeddings, got shape {x.shape}")
    if x.shape[0] > max_items:
        x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_items, replace=False))]
    n = x.shape[0]
    sq = np.sum(x * x, axis=1)
    chunks = []
    for s in range(0, n, block):
        d2 = sq[s:s + block, None] + sq[None, :] - 2.0 * x[s:s + block] @ x.T  # [b, N]
        rows = np.arange(s, min(s + block, n))
        upper = np.arange(n)[None, :] > rows[:, None]  # i < j only
        if upper.any():
            chunks.append(-t * np.maximum(d2[upper], 0.0))
    e = np.concatenate(chunks)
    m = e.max()
    return float(m + np.log(np.mean(np.exp(e - m))))


def modality_gap(x, y) -> float:
    """Modality gap (Liang et al., 2022, "Mind the Gap"): ``||mean(x) - mean(y)||₂`` of the two
    modalities' (L2-normalized) embeddings."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x.mean(axis=0) - y.mean(axis=0)))


def norm_stats(emb) -> dict[str, float]:
    """Row L2 norms of ``emb`` ``[N, D]``: ``norm_mean``, ``norm_std``, ``norm_min``, ``norm_max``."""
    norms = np.linalg.norm(np.asarray(emb, np.float64), axis=1)
    return {"norm_mean": float(norms.mean()), "norm_std": float(norms.std()),
            "norm_min": float(norms.min()), "norm_max": float(norms.max())}


def matryoshka_prefix(emb, dim: int) -> np.ndarray:
    """The first ``dim`` coordinates of each row, re-normalized to unit length: the embedding a
    Matryoshka model (Kusupati et al., 2022) offers at size ``dim``. float32 ``[N, dim]``."""
    emb = np.asarray(emb, np.float32)
    if not 0 < dim <= emb.shape[1]:
        raise ValueError(f"Matryoshka prefix {dim} is not in [1, {emb.shape[1]}] (config.model.matryoshka_dims)")
    p = emb[:, :dim]
    return p / np.sqrt(np.sum(p * p, axis=1, keepdims=True) + 1e-12)


def representation_diagnostics(image_emb, text_emb=None, *, raw_image=None, raw_text=None,
                               max_items: int = 8192) -> dict[str, float]:
    """Every diagnostic for one eval set, flat.

    Args:
      image_emb / text_emb: ``[N, D]`` L2-normalized; ``text_emb`` row i pairs with image i.
      raw_image / raw_text: optional pre-normalization embeddings for the norm statistics
        (default: the given ones).

    Returns:
      ``image/rankme``, ``image/uniformity``, ``image/norm_*`` (and ``text/...``), plus with
      text ``alignment`` and ``modality_gap``.
    """
    out = {}
    sides = {"image": (image_emb, raw_image)}
    if text_emb is not None:
        sides["text"] = (text_emb, raw_text)
    for name, (emb, raw) in sides.items():
        out[f"{name}/rankme"] = rankme(emb)
        out[f"{name}/uniformity"] = uniformity(emb, max_items=max_items)
        for k, v in norm_stats(emb if raw is None else raw).items():
            out[f"{name}/{k}"] = v
    if text_emb is not None:
        out["alignment"] = alignment(image_emb, text_emb)
        out["modality_gap"] = modality_gap(image_emb, text_emb)
    return out
