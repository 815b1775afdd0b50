"""A student model distilled from a frozen teacher model run in the same step.

``model.name = 'distill'`` (TinyCLIP affinity mimicking, Wu et al. 2023, "TinyCLIP: CLIP
Distillation via Affinity Mimicking and Weight Inheritance"): ``config.model`` describes the
STUDENT (a two-tower model, all the usual fields) and ``config.model.teacher`` the TEACHER (any
model config, merged onto the model defaults; it must be the architecture of the checkpoint it is
loaded from). Both see the same batch; the outputs are the student's plus ``teacher_image`` and
``teacher_text`` ``[B, D_teacher]`` under ``stop_gradient``, which ``config.loss.name='distill'``
reads. Parameters live under ``student/`` and ``teacher/``; a run freezes the teacher
(``optim.freeze=('teacher/.*',)``: no optimizer state, no backward pass) and loads it with
``checkpoint.init_from=TEACHER_WORKDIR`` + ``checkpoint.init_into='teacher'``. Evaluation encodes
with the student. Example: ``configs/distill.py``. Built from config by ``models.build``
(``build_distill`` in :mod:`contrastive_jax.models.build`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from contrastive_jax.config_tree import merge_onto
from contrastive_jax.models import config as model_config_lib


class Distill(nn.Module):
    """``student`` trained against a frozen ``teacher``; see the module docstring."""

    student: nn.Module
    teacher: nn.Module

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.student.modalities)

    def __call__(self, *inputs, train: bool = False) -> dict:
        """The student's outputs plus ``teacher_image`` / ``teacher_text`` (no gradient)."""
        out = dict(self.student(*inputs, train=train))
        # The teacher runs in inference mode (no dropout) and nothing flows back into it.
        teacher = self.teacher(*inputs, train=False)
        out["teacher_image"] = jax.lax.stop_gradient(teacher["image"])
        out["teacher_text"] = jax.lax.stop_gradient(teacher["text"])
        return out

    def encode(self, name: str, x, train: bool = False):
        return self.student.encode(name, x, train=train)

    def encode_image(self, images, train: bool = False):
        return self.student.encode_image(images, train=train)

    def encode_text(self, texts, train: bool = False):
        return self.student.encode_text(texts, train=train)


# Groups of config.model whose keys are free-form (merged as given, never rejected).
_FREE_FORM = ("extra", "towers", "teacher")


def _is_free_form(path: str) -> bool:
    # Below the teacher's root ('model.teacher', itself checked), a group named like a free-form
    # group and everything inside it.
    return any(part in _FREE_FORM for part in path.split(".")[2:])


def _unknown(path: str, group) -> ValueError:
    return ValueError(f"{path}: unknown field; known: {', '.join(sorted(group.keys()))}")


def teacher_config(model_config) -> ml_collections.ConfigDict:
    """``config.model.teacher`` merged onto the model defaults (the teacher's full model config).

    Raises:
      ValueError: no teacher, or a teacher key that is not a ``config.model`` field (named as
        ``model.teacher.<key>``).
    """
    if "teacher" not in model_config or not model_config.teacher:
        raise ValueError("model.name='distill' needs model.teacher: the teacher's model config")
    return merge_onto(model_config_lib.defaults(), model_config.teacher, path="model.teacher",
                      is_free_form=_is_free_form, unknown=_unknown)
