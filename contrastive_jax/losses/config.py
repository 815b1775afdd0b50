"""Schema of ``config.loss``: which objective and which implementation of it.

Merged into the run schema by :func:`contrastive_jax.train.config.default_config` as
``config.loss``; this package owns these fields.
"""
from __future__ import annotations

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """Every ``config.loss`` field with its default."""
    c = ml_collections.ConfigDict()
    c.name = "softmax"  # 'softmax' (CLIP InfoNCE) | 'sigmoid' (SigLIP)
    c.impl = "dense"  # 'dense' | 'chunked' | 'ring'
    c.block_size = 1024
    return c
