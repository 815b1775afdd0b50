"""Zero-shot classifier weights from class names and prompt templates (CLIP prompt ensembling)."""
from __future__ import annotations

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
