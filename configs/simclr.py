"""SimCLR (Chen et al. 2020) on shapes images alone: NT-Xent over 2 augmented views.

    contrastive-jax train --config configs/simclr.py --workdir runs/simclr

Image-only model (``model.name="multiview"``: ViT + MLP head); no text is read. Evaluation
is off for now: the evaluators encode the split's captions, which this model has no tower for.
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
    c.model.name = "multiview"
    c.model.head_hidden = c.model.embed_dim * 2
    c.data.num_views = 2
    c.loss = dict(name="simclr", impl="chunked", block_size=128, simclr=dict(temperature=0.1))
    # The evaluators encode the split's captions whenever it has them, which an image-only model
    # cannot; until they skip text for such models, the run reports training metrics only.
    c.eval.evaluators = []
    c.eval.write_report = False
    return c
