"""CoCa (Yu et al. 2022): a contrastive loss and a captioning decoder trained together.

    contrastive-jax train --config configs/coca.py --workdir runs/coca

Default: the quickstart's model and data (`shapes`, whose captions name colour, size, kind and
position) with ``model.name='coca'``: a 2-layer text decoder cross-attending to the image
tower's 64 tokens, its token cross-entropy computed inside the model without the [B, L, V]
logits, and ``loss.name='multi'`` = softmax contrastive + captioning (CoCa's caption weight 2).
Captions of held-out images: ``contrastive_jax.load(workdir).caption(images)``.

Variants: ``:capfirst`` -- CapPa-style (Tschannen et al. 2023): half the examples predict every
token in parallel from mask tokens; ``:tiny`` -- a seconds-long smoke run (tests).
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    variant = arg or ""
    c = config_file(QUICKSTART, "tiny" if variant == "tiny" else "classic")  # its results were measured on it
    width = int(c.model.text.width)
    c.model.name = "coca"
    c.model.decoder = dict(width=width, depth=1 if variant == "tiny" else 2, num_heads=int(c.model.text.num_heads),
                           mlp_dim=int(c.model.text.mlp_dim))
    c.model.caption = dict(label_smoothing=0.0, impl="chunked")
    c.loss = dict(name="multi", impl="chunked", block_size=int(c.loss.block_size),
                  multi=dict(terms=(("softmax", 1.0, 0.0), ("captioning", 2.0, 0.0))))
    if variant != "tiny":
        # Caption quality of the held-out split at every evaluation (BLEU-4, CIDEr-D, exact match).
        c.eval.evaluators = [dict(name="zero_shot"), dict(name="retrieval"), dict(name="captioning"),
                             dict(name="linear_probe", every_steps=0)]
    if variant == "capfirst":
        c.model.decoder.parallel_fraction = 0.5
    elif variant not in ("", "tiny"):
        raise ValueError(f"unknown coca variant {arg!r}; known: capfirst, tiny")
    return c
