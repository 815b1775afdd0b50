"""Evaluation: zero-shot classification, image↔text retrieval, batched encoding.

Pure numpy functions on embeddings plus :func:`evaluate_two_tower`, which takes the caller's
(jitted, sharded) ``encode_image`` / ``encode_text`` functions.
"""
from contrastive_jax.evaluate.encode import encode_in_batches
from contrastive_jax.evaluate.metrics import retrieval_metrics, true_item_ranks, zero_shot_accuracy
from contrastive_jax.evaluate.runner import EvalRunner, make_encoders
from contrastive_jax.evaluate.two_tower import evaluate_two_tower
from contrastive_jax.evaluate.zero_shot import l2_normalize_np, prompt_class_embeddings, zero_shot_class_embeddings

__all__ = [
    "EvalRunner",
    "make_encoders",
    "encode_in_batches",
    "evaluate_two_tower",
    "l2_normalize_np",
    "prompt_class_embeddings",
    "retrieval_metrics",
    "true_item_ranks",
    "zero_shot_accuracy",
    "zero_shot_class_embeddings",
]
