"""Weighted DCL (DCLW, Yeh et al. 2022): DCL with the von Mises-Fisher weighting of the positive
term (width ``loss.dclw_sigma``), on shapes.

    contrastive-jax train --config configs/dclw.py --workdir runs/dclw
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
    c.loss = dict(name="dclw", dclw_sigma=0.5, impl="chunked", block_size=128)
    return c
