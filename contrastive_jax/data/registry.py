"""Datasets by name: ``config.data.name`` -> how to prepare it and which words its text uses.

A dict registry (no string sniffing, no import side effects beyond this module): user datasets are
added with :func:`register_dataset`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from contrastive_jax.data import shapes


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """How to get one named dataset.

    Attributes:
      prepare: ``data_config -> {split: random-access source}``; generates / converts the data on
        first use. A source supports ``len()`` and ``source[i] -> dict`` with at least ``image``
        uint8 [H, W, 3] and ``caption`` (bytes or str).
      vocabulary_texts: ``data_config -> list[str]`` from which a word vocabulary is built, or None
        for datasets that need a subword tokenizer.
      label_keys: int label fields of each example, carried into batches.
      class_names: label key -> class names (index = label value), for zero-shot evaluation.
      zero_shot_templates: label key -> prompt templates with one ``{}`` for the class name.
      zero_shot_prompts: optional ``label key -> [C][T] prompts``; where given, evaluation uses
        these ready-made prompts instead of ``zero_shot_templates``.
    """

    prepare: Callable[[Any], Mapping[str, Any]]
    vocabulary_texts: Callable[[Any], list[str]] | None = None
    label_keys: tuple[str, ...] = ()
    class_names: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    zero_shot_templates: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    zero_shot_prompts: Callable[[str], list[list[str]]] | None = None


_DATASETS: dict[str, DatasetEntry] = {
    "shapes": DatasetEntry(
        prepare=shapes.prepare,
        vocabulary_texts=lambda data_config: shapes.vocabulary_texts(),
        label_keys=("kind", "color", "size", "position"),
        class_names=shapes.ATTRIBUTES,
        zero_shot_templates=shapes.ZERO_SHOT_TEMPLATES,
        zero_shot_prompts=shapes.ensemble_prompts,
    ),
}


def register_dataset(name: str, entry: DatasetEntry, *, overwrite: bool = False) -> None:
    """Makes ``config.data.name = name`` resolve to ``entry``."""
    if name in _DATASETS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True to replace)")
    _DATASETS[name] = entry


def get_dataset(name: str) -> DatasetEntry:
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset config.data.name={name!r}; registered: {', '.join(sorted(_DATASETS))}"
        ) from None


def available_datasets() -> list[str]:
    return sorted(_DATASETS)


def build_dataset(data_config) -> dict[str, Any]:
    """Prepares ``config.data.name`` if needed; returns ``{split: random-access source}``."""
    return dict(get_dataset(data_config.name).prepare(data_config))


def dataset_info(data_config) -> dict[str, Any]:
    """What evaluation needs to know about ``config.data.name``: ``class_names``,
    ``templates`` (label key -> list), ``prompts`` (label key -> [C][T], possibly empty) and
    ``label_keys``."""
    entry = get_dataset(data_config.name)
    prompts = {}
    if entry.zero_shot_prompts is not None:
        prompts = {k: entry.zero_shot_prompts(k) for k in entry.class_names}
    return {
        "class_names": {k: list(v) for k, v in entry.class_names.items()},
        "templates": {k: list(v) for k, v in entry.zero_shot_templates.items()},
        "prompts": prompts,
        "label_keys": tuple(entry.label_keys),
    }
