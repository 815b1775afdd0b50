"""MoCo on shapes: a momentum encoder (the EMA teacher) and a queue of its past keys.

    contrastive-jax train --config configs/moco.py --workdir runs/moco

Variants (``configs/moco.py:<arg>``):

* (none): image-only MoCo (He et al. 2020) with v3's symmetrized loss: model ``multiview`` with two
  augmented views, a queue of 4096 keys plus the batch's other keys as negatives, temperature 0.2,
  constant momentum 0.99.
* ``v3``: MoCo v3 (Chen, Xie & He 2021): no queue (in-batch negatives only), momentum 0.99 rising
  to 1 on a cosine over the run. (v3's query-side prediction head is not built: see
  ``contrastive_jax/losses/moco.py``.)
* ``image_text``: cross-modal queues as in BriVL (Huo et al. 2021): the two-tower CLIP model of
  ``quickstart.py``; image queries against the teacher's text keys + a text queue and vice versa.
* ``tiny`` / ``image_text_tiny``: seconds-long smoke runs of the first / third (used by the tests).

The cosine momentum schedule runs over ``loss.moco.momentum_steps``; 0 (the default) means the
run's length, filled in by the trainer, as is ``loss.moco.embed_dim`` (0: ``model.embed_dim``).
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
VARIANTS = (None, "v3", "image_text", "tiny", "image_text_tiny")


def get_config(arg=None):
    if arg not in VARIANTS:
        raise ValueError(f"unknown moco variant {arg!r}; known: {', '.join(v for v in VARIANTS if v)}")
    tiny = arg is not None and arg.endswith("tiny")
    image_text = arg is not None and arg.startswith("image_text")
    c = config_file(QUICKSTART, "tiny" if tiny else "classic")  # its results were measured on it
    D = c.model.embed_dim  # the MLP head's hidden width below
    # 4096 keys: 8 batches of 2 x 256 views (16 batches of text / image keys in image_text).
    # Tiny: 96 keys, not a multiple of the 64 keys enqueued per step, so the pointer wraps mid-batch.
    K = 96 if tiny else 4096
    c.loss = dict(name="moco", impl="chunked", block_size=128,
                  moco=dict(mode="image", queue_size=K, temperature=0.2, momentum=0.99))
    c.optim.ema_decay = 0.0  # the teacher's decay is the objective's (loss.moco.momentum)
    if image_text:
        c.loss.moco.update(mode="image_text", temperature=0.07)
        if tiny:
            c.eval.update(evaluators=["retrieval"])
        return c
    c.model.name = "multiview"
    c.model.head_hidden = D * 2
    c.data.num_views = 2
    # Two views must differ or the task is trivial: MoCo v2's recipe (crop scale from 0.2, flip,
    # colour jitter, grayscale) without blur (32-64 px images) and with hue fixed (shapes' colour
    # is one of the attributes its probes read).
    c.data.augment = dict(crop="random_resized_crop", crop_scale=(0.2, 1.0), flip_prob=0.5, jitter_prob=0.8,
                          brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, grayscale_prob=0.2)
    if arg == "v3":
        c.loss.moco.update(queue_size=0, momentum_schedule="cosine")
    c.eval.evaluators = (["diagnostics", dict(name="knn", every_steps=0)] if tiny else
                         ["diagnostics", dict(name="linear_probe", every_steps=0), dict(name="knn", every_steps=0)])
    c.eval.write_report = False  # the PNG report draws caption panels; image-only model
    return c
