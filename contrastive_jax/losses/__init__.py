"""Contrastive losses (pure functions on global [B, D] embeddings).

``softmax_contrastive_loss`` (CLIP) and ``sigmoid_contrastive_loss`` (SigLIP), each with
``impl="dense" | "chunked" | "ring"``, and the objective family of :mod:`.objectives` (DCL,
hard negatives, CWCL, multi-positive / SupCon / NT-Xent, Symile, distillation, alignment and
uniformity) on the same implementations, and FILIP's token-wise ``filip_loss`` (``[B, L, D]``
tokens, ``impl="dense" | "chunked"``, optional token pruning ``prune_tokens``);
``make_objective`` maps ``config.loss`` to one. Objectives with state across steps (iSogCLR, MoCo,
SwAV, several terms with ``multi``) follow :class:`StatefulObjective`; ``fused_cross_entropy`` is a
captioning decoder's token cross-entropy without the ``[N, V]`` logits.

Every loss takes the per-example mask as ``valid=`` (``[B]`` bool; the softmax and sigmoid losses
also accept non-negative float weights there); ``weights=``, its former name on those two, still
works with a DeprecationWarning. ``chunked`` / ``ring`` all run on the one streaming driver of
:mod:`.streaming` (kernels in :mod:`.kernels`).
"""
from contrastive_jax.losses.contrastive import (
    DEFAULT_BLOCK_SIZE,
    IMPLS,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)
from contrastive_jax.losses.captioning import CaptionLoss, caption_loss, fused_cross_entropy
from contrastive_jax.losses.filip import filip_loss, prune_tokens
from contrastive_jax.losses.objectives import (
    TARGET_FUNCTIONS,
    alignment,
    decoupled_contrastive_loss,
    hard_negative_loss,
    matryoshka_prefixes,
    multi_positive_loss,
    nt_xent_loss,
    sigmoid_multi_positive_loss,
    similarity_distillation_loss,
    soft_target_loss,
    symile_loss,
    uniformity,
)
from contrastive_jax.losses.registry import OBJECTIVES, make_objective, register_objective
from contrastive_jax.losses.stateful import StatefulObjective, is_stateful

__all__ = ["make_objective", "register_objective", "OBJECTIVES", "softmax_contrastive_loss", "sigmoid_contrastive_loss", "IMPLS", "DEFAULT_BLOCK_SIZE",
           "decoupled_contrastive_loss", "hard_negative_loss", "soft_target_loss", "multi_positive_loss",
           "sigmoid_multi_positive_loss", "nt_xent_loss", "matryoshka_prefixes", "symile_loss",
           "similarity_distillation_loss", "alignment", "uniformity", "TARGET_FUNCTIONS", "filip_loss",
           "prune_tokens", "StatefulObjective", "is_stateful", "CaptionLoss", "caption_loss", "fused_cross_entropy"]
