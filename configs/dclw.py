"""Weighted DCL (DCLW, Yeh et al. 2022): DCL with the von Mises-Fisher weighting of the positive
term (width ``loss.dclw_sigma``), on shapes.

    contrastive-jax train --config configs/dclw.py --workdir runs/dclw
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.loss = dict(name="dclw", dclw_sigma=0.5, impl="chunked", block_size=128)
    return c
