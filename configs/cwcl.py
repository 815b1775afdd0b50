"""CWCL (Srinivasa et al. 2023): soft targets from the image tower's own similarities.

    contrastive-jax train --config configs/cwcl.py --workdir runs/cwcl

Target weights ``(1 + cos(image_i, image_j)) / 2`` (no gradient through them). CWCL takes them
from a pretrained, frozen tower (``optim.freeze=('image/.*', 'image_proj/.*')`` with
``train.init_from``); this example trains both towers from scratch to stay self-contained.
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
    c.loss = dict(name="cwcl", impl="chunked", block_size=128, cwcl=dict(targets="image", target_fn="cwcl"))
    return c
