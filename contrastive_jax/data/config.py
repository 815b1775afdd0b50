"""Schema of ``config.data``: which dataset, where it lives, and how examples are preprocessed.

Merged into the run schema by :func:`contrastive_jax.train.config.default_config` as
``config.data``; this package owns these fields.
"""
from __future__ import annotations

import os

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """Every ``config.data`` field with its default."""
    c = ml_collections.ConfigDict()
    c.name = "shapes"  # built-in procedurally rendered dataset
    c.data_dir = os.path.join("~", ".cache", "contrastive_jax", "tfds")
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 64
    c.num_train = 20000  # shapes: examples in the train split
    c.num_validation = 1000
    c.num_test = 2000
    c.dataset_seed = 0  # shapes: seed of the procedural generator
    c.shuffle_seed = 0
    c.worker_count = 0  # grain worker processes (0 = in the main process)
    c.max_text_len = 16  # tokens, including EOS
    c.mean = (0.5, 0.5, 0.5)
    c.std = (0.5, 0.5, 0.5)
    return c
