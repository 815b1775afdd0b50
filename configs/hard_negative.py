"""Hard-negative reweighting (Robinson et al. 2021) with debiasing and false-negative masking.

    contrastive-jax train --config configs/hard_negative.py --workdir runs/hard_negative

Shapes captions repeat (a few kinds x colours x sizes x positions), so a batch holds many true
matches among its "negatives": ``tau_plus`` debiases for them and pairs whose cosine exceeds
``fn_threshold`` are dropped as false negatives.
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.loss = dict(name="hard_negative", impl="chunked", block_size=128,
                  hard_negative=dict(beta=0.5, tau_plus=0.05, fn_threshold=0.95))
    return c
