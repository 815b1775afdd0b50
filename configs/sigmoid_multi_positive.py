"""SigLIP's sigmoid loss with the label matrix from group ids (same ``kind`` = positive).

    contrastive-jax train --config configs/sigmoid_multi_positive.py --workdir runs/sigmoid_mp
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
    c.loss = dict(name="sigmoid_multi_positive", group_key="kind", impl="chunked", block_size=128)
    c.model.update(scale_init=2.302585, bias_init=-10.0)  # SigLIP's log(10) and -10
    return c
