"""Matryoshka representation learning (Kusupati et al. 2022): CLIP summed over nested
re-normalized prefixes of the embedding (model.matryoshka_dims); evaluation reports each prefix.

    contrastive-jax train --config configs/matryoshka.py --workdir runs/matryoshka
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.loss = dict(name="matryoshka", impl="chunked", block_size=128, matryoshka=dict(base="softmax"))
    dim = c.model.embed_dim
    c.model.matryoshka_dims = (dim // 8, dim // 4, dim // 2, dim)
    return c
