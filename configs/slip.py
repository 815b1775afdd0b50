"""SLIP (Mu et al. 2022): CLIP plus a SimCLR term on two image views, weights in config.

    contrastive-jax train --config configs/slip.py --workdir runs/slip
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
    c.model.name = "slip"
    c.data.num_views = 2
    c.loss = dict(name="slip", impl="chunked", block_size=128,
                  simclr=dict(temperature=0.1, clip_weight=1.0, ssl_weight=1.0))
    return c
