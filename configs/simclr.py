"""SimCLR (Chen et al. 2020) on shapes images alone: NT-Xent over 2 augmented views.

    contrastive-jax train --config configs/simclr.py --workdir runs/simclr

Image-only model (``model.name="multiview"``: ViT + MLP head); no text is read. Evaluation runs
the image-only evaluators (representation diagnostics, linear / k-NN / few-shot probes on the
held-out split); zero-shot and retrieval need a text tower and are skipped.
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.model.name = "multiview"
    c.model.head_hidden = c.model.embed_dim * 2
    c.data.num_views = 2
    c.loss = dict(name="simclr", impl="chunked", block_size=128, simclr=dict(temperature=0.1))
    if arg == "tiny":
        c.eval.evaluators = ["diagnostics", dict(name="knn", every_steps=0)]
    else:
        c.eval.evaluators = ["diagnostics", dict(name="linear_probe", every_steps=0),
                             dict(name="knn", every_steps=0), dict(name="few_shot", every_steps=0)]
    # The PNG report draws caption-based panels; not exercised for an image-only model yet.
    c.eval.write_report = False
    return c
