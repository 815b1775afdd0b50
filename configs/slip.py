"""SLIP (Mu et al. 2022): CLIP plus a SimCLR term on two image views, weights in config.

    contrastive-jax train --config configs/slip.py --workdir runs/slip
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.model.name = "slip"
    c.data.num_views = 2
    c.loss = dict(name="slip", impl="chunked", block_size=128,
                  simclr=dict(temperature=0.1, clip_weight=1.0, ssl_weight=1.0))
    return c
