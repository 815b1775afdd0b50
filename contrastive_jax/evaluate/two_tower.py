"""One call that evaluates a two-tower model on an eval set: zero-shot per attribute + retrieval."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from contrastive_jax.evaluate.encode import encode_in_batches
from contrastive_jax.evaluate.metrics import retrieval_metrics, zero_shot_accuracy
from contrastive_jax.evaluate.zero_shot import l2_normalize_np, prompt_class_embeddings, zero_shot_class_embeddings

DEFAULT_TEMPLATES = ("{}",)


def evaluate_two_tower(
    encode_image: Callable,
    encode_text: Callable,
    eval_data: Mapping[str, np.ndarray],
    *,
    tokenizer,
    class_names: Mapping[str, Sequence[str]],
    templates: Mapping[str, Sequence[str]],
    batch_size: int,
    recall_ks: Sequence[int] = (1, 5),
    zero_shot_ks: Sequence[int] = (1, 5),
    prompts: Mapping[str, Sequence[Sequence[str]]] | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy for each labelled attribute and image↔text retrieval.

    Args:
      encode_image: ``[batch_size, H, W, 3] float32 -> [batch_size, D]`` (caller jits/shards).
      encode_text: ``[batch_size, L] int32 -> [batch_size, D]``.
      eval_data: ``image [N, H, W, 3] float32``, optional ``text [N, L] int32`` (item i's caption;
        enables retrieval), optional ``caption`` (N strings: identical captions form one retrieval
        group), and for each attribute in ``class_names`` an int label array ``[N]``.
      tokenizer: ``encode(list[str]) -> np.int32 [M, L]``.
      class_names: attribute -> class names, index = label value.
      templates: attribute -> prompt templates; an attribute without an entry uses ``'{}'``.
      prompts: optional attribute -> ready-made prompts per class (``[C][T_c]`` strings); where
        given, they replace ``templates`` for that attribute (e.g. prompt ensembles that fill the
        other slots of a caption template with every value).
      batch_size: rows per encoder call (the last batch is padded).
      recall_ks / zero_shot_ks: k's for retrieval recall and zero-shot top-k (k larger than the
        candidate count is skipped).

    Returns:
      Flat floats: ``zeroshot/{attr}/top{k}``, ``zeroshot/{attr}/mean_per_class_top1``,
      ``retrieval/image_to_text/R@{k}``, ``retrieval/text_to_image/R@{k}``, ``num_examples``.
    """
    images = np.asarray(eval_data["image"])
    n = images.shape[0]
    # Renormalize defensively: the metrics are cosine-similarity rankings.
    image_emb = l2_normalize_np(encode_in_batches(encode_image, images, batch_size))
    results: dict[str, float] = {"num_examples": float(n)}
    for attr, names in class_names.items():
        if attr not in eval_data:
            raise KeyError(f"eval_data has no label array for attribute {attr!r}")
        labels = np.asarray(eval_data[attr])
        if labels.shape != (n,):
            raise ValueError(f"labels {attr!r} must be [{n}], got shape {labels.shape}")
        if prompts and attr in prompts:
            if len(prompts[attr]) != len(names):
                raise ValueError(f"prompts[{attr!r}] has {len(prompts[attr])} classes, class_names has {len(names)}")
            class_emb = prompt_class_embeddings(encode_text, tokenizer, prompts[attr], batch_size)
        else:
            class_emb = zero_shot_class_embeddings(
                encode_text, tokenizer, list(names), list(templates.get(attr, DEFAULT_TEMPLATES)), batch_size
            )
        acc = zero_shot_accuracy(image_emb, class_emb, labels, ks=zero_shot_ks)
        for key, value in acc.items():
            if np.ndim(value) == 0:  # the per-class array is not a scalar metric
                results[f"zeroshot/{attr}/{key}"] = float(value)
    if "text" in eval_data:
        text_emb = l2_normalize_np(encode_in_batches(encode_text, np.asarray(eval_data["text"]), batch_size))
        groups = None
        if "caption" in eval_data:
            # Items whose captions are the same string are one retrieval target (see metrics).
            _, groups = np.unique(np.asarray(eval_data["caption"], dtype=object).astype(str), return_inverse=True)
        for key, value in retrieval_metrics(image_emb, text_emb, ks=recall_ks, groups=groups).items():
            results[f"retrieval/{key}"] = value
    return results
