"""SwAV (Caron et al. 2020) on shapes images alone: prototypes, Sinkhorn-Knopp codes, swapped
prediction across 2 global crops and 4 smaller local crops (multi-crop).

    contrastive-jax train --config configs/swav.py --workdir runs/swav

Image-only model (``model.name="multiview"``: the quickstart's ViT with a conv stem and fixed
2-D sin-cos positions, which embed the 32 px local crops as readily as the 64 px global ones, an
MLP head and ``model.prototypes`` unit prototypes). The prototypes are held fixed for the first
epoch (``optim.freeze_until``); a queue of 4 past batches' scores joins the Sinkhorn-Knopp input
from epoch 2 (``loss.swav.queue_*``). Evaluation runs the image-only evaluators.

Variant ``:tiny``: a seconds-long smoke run (32 px global / 16 px local crops, 16 prototypes, a
2-batch queue from update 2, prototypes held for 3 updates), used by the tests.
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    if arg not in (None, "tiny"):
        raise ValueError(f"unknown swav variant {arg!r}; known: tiny")
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.model.name = "multiview"
    c.model.head_hidden = c.model.embed_dim * 2
    c.model.prototypes = 128
    c.model.multicrop = True
    c.data.num_views = 2
    c.data.local_views = 4
    c.data.local_view_size = 32
    # SwAV's crops: global (0.14, 1.0) and local (0.05, 0.14) of the image area; colour
    # distortion as SimCLR (blur off: shapes are already smooth and it dominates host time).
    c.data.augment = dict(crop="random_resized_crop", crop_scale=(0.14, 1.0), local_crop_scale=(0.05, 0.14),
                          flip_prob=0.5, jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                          grayscale_prob=0.2)
    steps_per_epoch = c.data.num_train // c.train.batch_size  # 78 at batch 256
    c.loss = dict(name="swav", swav=dict(
        temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
        queue_length=4 * c.train.batch_size, queue_start_steps=steps_per_epoch, queue_views=2,
        prototypes=c.model.prototypes))
    c.optim.freeze_until = [("prototypes", steps_per_epoch)]
    if arg == "tiny":
        c.model.prototypes = 16
        c.data.local_views = 2
        c.data.local_view_size = 16
        c.loss.swav.update(queue_length=2 * c.train.batch_size, queue_start_steps=2, prototypes=16)
        c.optim.freeze_until = [("prototypes", 3)]
        c.eval.evaluators = ["diagnostics", dict(name="knn", every_steps=0)]
    else:
        c.eval.evaluators = ["diagnostics", dict(name="linear_probe", every_steps=0),
                             dict(name="knn", every_steps=0), dict(name="few_shot", every_steps=0)]
    # The PNG report draws caption-based panels; not exercised for an image-only model yet.
    c.eval.write_report = False
    return c
