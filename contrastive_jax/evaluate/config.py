"""Schema of ``config.eval``: what is evaluated, how often and on how much data.

Merged into the run schema by :func:`contrastive_jax.train.config.default_config` as
``config.eval``; this package owns these fields.
"""
from __future__ import annotations

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """Every ``config.eval`` field with its default."""
    c = ml_collections.ConfigDict()
    # Evaluation interval during training: set at most one (none set: only at the end).
    c.every_steps = -1
    c.every_epochs = -1.0
    c.every_examples = -1
    c.batch_size = 512
    c.max_examples = -1  # -1: the whole split
    c.recall_ks = (1, 5)
    return c
