"""Matryoshka representation learning (Kusupati et al. 2022): CLIP summed over nested
re-normalized prefixes of the embedding (model.matryoshka_dims); evaluation reports each prefix.

    contrastive-jax train --config configs/matryoshka.py --workdir runs/matryoshka
"""
import importlib.util
import os


def _quickstart(arg):
    """configs/quickstart.py's config (its ``tiny`` variant for arg='tiny')."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
    spec = importlib.util.spec_from_file_location("_quickstart_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if arg not in (None, "tiny"):
        raise ValueError(f"unknown variant {arg!r}; known: tiny")
    return module.get_config(arg)


def get_config(arg=None):
    c = _quickstart(arg)
    c.loss = dict(name="matryoshka", impl="chunked", block_size=128, matryoshka=dict(base="softmax"))
    dim = c.model.embed_dim
    c.model.matryoshka_dims = (dim // 8, dim // 4, dim // 2, dim)
    return c
