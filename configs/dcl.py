"""Decoupled contrastive learning (DCL, Yeh et al. 2022) on the built-in shapes dataset.

    contrastive-jax train --config configs/dcl.py --workdir runs/dcl

The quickstart CLIP with the positive pair removed from the softmax denominators, streamed
(``impl="chunked"``). ``configs/dcl.py:tiny``: a seconds-long smoke run.
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.loss = dict(name="dcl", impl="chunked", block_size=128)
    return c
