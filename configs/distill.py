"""Similarity distillation (TinyCLIP affinity mimicking, Wu et al. 2023) from a frozen teacher.

The teacher is a finished run of the classic (64 px, unscanned) quickstart; the student is a
half-width, shallower two-tower model trained on the KL between the teacher's and its own image->text / text->image distributions over
the batch, plus a small CLIP term:

    contrastive-jax train --config configs/quickstart.py:classic --workdir runs/teacher   # the teacher
    contrastive-jax train --config configs/distill.py --workdir runs/distill \\
        --config.checkpoint.init_from=runs/teacher

The teacher's parameters are loaded under 'teacher/' (checkpoint.init_into) and frozen
(optim.freeze): no optimizer state and no backward pass through them.
"""
import copy
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")
    teacher = copy.deepcopy(dict(c.model))  # the architecture the teacher run was trained with
    student = copy.deepcopy(dict(c.model))
    student["image"] = dict(student["image"], width=student["image"]["width"] // 2,
                            mlp_dim=student["image"]["mlp_dim"] // 2,
                            depth=max(student["image"]["depth"] // 2, 1))
    student["text"] = dict(student["text"], width=student["text"]["width"] // 2,
                           mlp_dim=student["text"]["mlp_dim"] // 2)
    c.model = dict(student, name="distill", teacher=teacher)
    c.loss = dict(name="distill", impl="chunked", block_size=128,
                  distill=dict(teacher_scale=50.0, clip_weight=0.5))
    c.optim.freeze = ("teacher/.*",)
    c.checkpoint.init_into = "teacher"
    return c
