"""Merging a config (or a part of one) onto its schema: the one recursive merge of the package.

The run schema (:func:`contrastive_jax.train.config.merge`) and a distillation teacher's model
config (:func:`contrastive_jax.models.distill.teacher_config`) both copy a user's nested dict onto
a ConfigDict of defaults, rejecting keys the schema does not have except inside free-form groups.
Only the error each raises differs, so the walk is written once here, below every package.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import ml_collections


def merge_onto(base: ml_collections.ConfigDict, update: Mapping[str, Any] | ml_collections.ConfigDict, *,
               path: str, is_free_form: Callable[[str], bool],
               unknown: Callable[[str, ml_collections.ConfigDict], Exception]) -> ml_collections.ConfigDict:
    """Recursively copies ``update`` onto ``base`` (in place) and returns ``base``.

    Args:
      path: ``base``'s dotted path ('' at the root), the start of every key's path.
      is_free_form: ``is_free_form(group_path)``: whether the group at that path takes keys the
        schema does not list (they are copied as given).
      unknown: ``unknown(key_path, group)`` -> the exception to raise for a key that is neither in
        the schema nor in a free-form group (``group``: the schema's group, for listing its keys).
    """
    if not hasattr(update, "items"):
        return base
    for key, value in update.items():
        where = f"{path}.{key}" if path else key
        if key not in base and not is_free_form(path):
            raise unknown(where, base)
        if key in base and isinstance(base[key], ml_collections.ConfigDict) and hasattr(value, "items"):
            merge_onto(base[key], value, path=where, is_free_form=is_free_form, unknown=unknown)
        else:
            with base.unlocked():
                base[key] = value
    return base
