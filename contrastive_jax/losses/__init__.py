"""Contrastive losses (pure functions on global [B, D] embeddings).

``softmax_contrastive_loss`` (CLIP) and ``sigmoid_contrastive_loss`` (SigLIP), each with
``impl="dense" | "chunked" | "ring"``.
"""
from contrastive_jax.losses.contrastive import (
    DEFAULT_BLOCK_SIZE,
    IMPLS,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)
from contrastive_jax.losses.registry import OBJECTIVES, make_objective, register_objective

__all__ = ["make_objective", "register_objective", "OBJECTIVES", "softmax_contrastive_loss", "sigmoid_contrastive_loss", "IMPLS", "DEFAULT_BLOCK_SIZE"]
