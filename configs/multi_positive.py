"""Multi-positive softmax: every pair with the same shape ``kind`` label is a positive
(SupCon-style class targets across modalities).

    contrastive-jax train --config configs/multi_positive.py --workdir runs/multi_positive
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.loss = dict(name="multi_positive", group_key="kind", impl="chunked", block_size=128)
    return c
