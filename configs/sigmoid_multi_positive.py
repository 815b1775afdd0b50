"""SigLIP's sigmoid loss with the label matrix from group ids (same ``kind`` = positive).

    contrastive-jax train --config configs/sigmoid_multi_positive.py --workdir runs/sigmoid_mp
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.loss = dict(name="sigmoid_multi_positive", group_key="kind", impl="chunked", block_size=128)
    c.model.update(scale_init=2.302585, bias_init=-10.0)  # SigLIP's log(10) and -10
    return c
