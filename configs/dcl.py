"""Decoupled contrastive learning (DCL, Yeh et al. 2022) on the built-in shapes dataset.

    contrastive-jax train --config configs/dcl.py --workdir runs/dcl

The quickstart CLIP with the positive pair removed from the softmax denominators, streamed
(``impl="chunked"``). ``configs/dcl.py:tiny``: a seconds-long smoke run.
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
    c.loss = dict(name="dcl", impl="chunked", block_size=128)
    return c
