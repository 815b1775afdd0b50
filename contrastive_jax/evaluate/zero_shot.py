"""Zero-shot classifier weights from class names and prompt templates (CLIP prompt ensembling)."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from contrastive_jax.evaluate.encode import encode_in_batches


def l2_normalize_np(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Float32 numpy ``x / ||x||`` over the last dim (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def zero_shot_class_embeddings(
    encode_text: Callable,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int,
) -> np.ndarray:
    """One embedding per class: the normalized mean over templates of normalized text embeddings.

    Args:
      encode_text: ``[batch_size, L] int32 -> [batch_size, D]``.
      tokenizer: has ``encode(list[str]) -> np.int32 [N, L]`` (pad 0, ends with EOS).
      class_names: ``C`` names; templates: ``T`` format strings with one ``{}``.
      batch_size: rows per ``encode_text`` call.

    Returns:
      ``[C, D]`` float32, unit L2 norm.
    """
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty")
    prompts = [[template.format(name) for template in templates] for name in class_names]
    return prompt_class_embeddings(encode_text, tokenizer, prompts, batch_size)


def prompt_class_embeddings(
    encode_text: Callable,
    tokenizer,
    prompts: Sequence[Sequence[str]],
    batch_size: int,
) -> np.ndarray:
    """Like :func:`zero_shot_class_embeddings` for ready-made prompts, ``prompts[c]`` being class
    ``c``'s list (classes may have different numbers of prompts).

    Returns:
      ``[C, D]`` float32, unit L2 norm: per class, the normalized mean of its normalized prompt
      embeddings.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every class needs at least one prompt")
    texts = [t for per_class in prompts for t in per_class]
    tokens = np.asarray(tokenizer.encode(texts))
    emb = l2_normalize_np(encode_in_batches(encode_text, tokens, batch_size))  # [sum T_c, D]
    bounds = np.cumsum([0] + [len(p) for p in prompts])
    means = np.stack([emb[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
    return l2_normalize_np(means)


BUILTIN_TEMPLATES = {"imagenet": "imagenet_templates.txt"}


def read_lines(path: str, *, what: str = "lines") -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped; lines starting with ``#`` are comments.

    Raises:
      FileNotFoundError / ValueError naming ``path`` (missing or without any entry).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {path} has no entries")
    return lines


def load_templates(spec: str) -> list[str]:
    """Prompt templates by built-in name (``'imagenet'``: CLIP's 80 ImageNet templates, shipped
    with the package) or from a file path; every template must contain one ``{}``."""
    if spec in BUILTIN_TEMPLATES:
        path = os.path.join(os.path.dirname(__file__), "data", BUILTIN_TEMPLATES[spec])
    else:
        path = os.path.expanduser(spec)
    templates = read_lines(path, what="templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"templates file {path}: each template needs exactly one '{{}}', got {bad[:3]}")
    return templates


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Average precision of one ranking: ``Σ_n (R_n - R_{n-1}) P_n`` over the distinct score
    thresholds, highest first (tied items enter together, so the order among ties is irrelevant).

    Args:
      scores: ``[N]`` float; positives: ``[N]`` bool. Returns NaN when there is no positive.
    """
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    n_pos = positives.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positives[order]
    tp = np.cumsum(p)
    last = np.r_[s[1:] != s[:-1], True]  # the last item of each run of equal scores
    tp, seen = tp[last], (np.arange(len(s)) + 1)[last]
    precision, recall = tp / seen, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def zero_shot_multilabel(image_emb, class_emb, label_matrix) -> dict:
    """Multi-label zero-shot: each image may belong to several classes.

    Args:
      image_emb: ``[N, D]``; class_emb: ``[C, D]``; label_matrix: ``[N, C]`` 0/1.

    Returns:
      ``mAP`` (mean over classes with a positive of the class's average precision when images
      are ranked by similarity to it), ``per_class_ap`` ``[C]`` (NaN without positives),
      ``precision@1`` (fraction of images whose most similar class is one of theirs; a tie
      counts as a hit only if every tied class is a label).
    """
    image_emb = np.asarray(image_emb, np.float32)
    class_emb = np.asarray(class_emb, np.float32)
    labels = np.asarray(label_matrix).astype(bool)
    if labels.shape != (image_emb.shape[0], class_emb.shape[0]):
        raise ValueError(f"label_matrix must be [{image_emb.shape[0]}, {class_emb.shape[0]}], got {labels.shape}")
    sims = image_emb @ class_emb.T  # [N, C]: C is a class count, small next to N
    ap = np.array([average_precision(sims[:, c], labels[:, c]) for c in range(labels.shape[1])])
    top = sims >= sims.max(axis=1, keepdims=True)
    p_at_1 = np.all(~top | labels, axis=1)
    return {
        "mAP": float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan"),
        "per_class_ap": ap,
        "precision@1": float(np.mean(p_at_1)),
    }
