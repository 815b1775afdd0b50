"""CWCL (Srinivasa et al. 2023): soft targets from the image tower's own similarities.

    contrastive-jax train --config configs/cwcl.py --workdir runs/cwcl

Target weights ``(1 + cos(image_i, image_j)) / 2`` (no gradient through them). CWCL takes them
from a pretrained, frozen tower (``optim.freeze=('image/.*', 'image_proj/.*')`` with
``checkpoint.init_from``); this example trains both towers from scratch to stay self-contained.
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.loss = dict(name="cwcl", impl="chunked", block_size=128, cwcl=dict(targets="image", target_fn="cwcl"))
    return c
