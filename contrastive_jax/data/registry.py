"""Datasets by name: ``config.data.name`` -> how to prepare it and which words its text uses.

A dict registry (no string sniffing, no import side effects beyond this module): user datasets are
added with :func:`register_dataset`. A name that is not registered is looked up as a TFDS dataset
already prepared under ``config.data.data_dir`` (what ``contrastive-jax data convert`` writes, or
any ``tfds build`` output): array_record datasets are read with ``tfds.data_source`` (no
TensorFlow); TFRecord datasets need the optional ``[tf]`` extra.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Sequence

from contrastive_jax.data import shapes

# Written by `contrastive-jax data convert` next to the TFDS files: vocabulary, class names,
# the conversion report.
METADATA_FILE = "contrastive_jax.json"
DEFAULT_CLASS_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.")


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """How to get one named dataset.

    Attributes:
      prepare: ``data_config -> {split: random-access source}``; generates / converts the data on
        first use. A source supports ``len()`` and ``source[i] -> dict`` with at least the image
        field (uint8 [H, W, 3] array, or encoded image bytes decoded with PIL in the pipeline).
      vocabulary_texts: ``data_config -> list[str]`` from which a word vocabulary is built, or None
        for datasets that need a subword tokenizer.
      label_keys: int label fields of each example, carried into batches.
      class_names: label key -> class names (index = label value), for zero-shot evaluation.
      zero_shot_templates: label key -> prompt templates with one ``{}`` for the class name.
      zero_shot_prompts: optional ``label key -> [C][T] prompts``; where given, evaluation uses
        these ready-made prompts instead of ``zero_shot_templates``.
      extra_features: further per-example fields passed into batches unchanged as numpy arrays,
        stacked per batch (``[B, ...]``, the record's dtype) -- e.g. a third modality or a group id.
      image_key: the record field holding the image.
      text_key: the record field holding the caption (str/bytes) or captions (a list), or None
        for image-only datasets (batches then have no ``text``).
      key_field: a record field naming the example (logged when a record is skipped), or None.
    """

    prepare: Callable[[Any], Mapping[str, Any]]
    vocabulary_texts: Callable[[Any], list[str]] | None = None
    label_keys: tuple[str, ...] = ()
    class_names: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    zero_shot_templates: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    zero_shot_prompts: Callable[[str], list[list[str]]] | None = None
    extra_features: tuple[str, ...] = ()
    image_key: str = "image"
    text_key: str | None = "caption"
    key_field: str | None = None


_DATASETS: dict[str, DatasetEntry] = {
    "shapes": DatasetEntry(
        prepare=shapes.prepare,
        vocabulary_texts=lambda data_config: shapes.vocabulary_texts(),
        label_keys=("kind", "color", "size", "position"),
        class_names=shapes.ATTRIBUTES,
        zero_shot_templates=shapes.ZERO_SHOT_TEMPLATES,
        zero_shot_prompts=shapes.ensemble_prompts,
        extra_features=("attributes",),  # float32 [18], Symile's third modality
    ),
}


def register_dataset(name: str, entry: DatasetEntry, *, overwrite: bool = False) -> None:
    """Makes ``config.data.name = name`` resolve to ``entry``."""
    if name in _DATASETS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True to replace)")
    _DATASETS[name] = entry


def get_dataset(name: str) -> DatasetEntry:
    """The registered entry ``name`` (see :func:`resolve_dataset` for TFDS datasets on disk)."""
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset config.data.name={name!r}; registered: {', '.join(sorted(_DATASETS))}"
        ) from None


def available_datasets() -> list[str]:
    return sorted(_DATASETS)


# ----------------------------------------------------------------------------------------------
# TFDS datasets prepared on disk
# ----------------------------------------------------------------------------------------------


def _open_builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for "not found"
        raise ValueError(
            f"unknown dataset config.data.name={name!r}: it is not registered "
            f"({', '.join(sorted(_DATASETS))}) and no prepared TFDS dataset of that name was found "
            f"in config.data.data_dir={data_dir} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Convert your data with `contrastive-jax data convert`."
        ) from None
    if not builder.is_prepared():
        raise ValueError(f"TFDS dataset {name!r} is known but not prepared in config.data.data_dir="
                         f"{data_dir}; nothing is downloaded at run time: prepare it first")
    return builder


def _tf_sources(builder, name: str) -> dict[str, Any]:
    """TFRecord datasets: whole splits read into memory through TensorFlow (the ``[tf]`` extra)."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise ImportError(
            f"TFDS dataset {name!r} is stored as {builder.info.file_format.value}, which only "
            "TensorFlow can read: pip install 'contrastive_jax[tf]', or re-prepare it as "
            "array_record (e.g. `tfds build --file_format=array_record`)") from None
    import tensorflow_datasets as tfds

    decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
                if isinstance(f, tfds.features.Image)}
    return {split: list(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders)))
            for split in builder.info.splits}


@functools.lru_cache(maxsize=16)
def _tfds_entry(name: str, data_dir: str, image_key: str, text_key: str,
                label_keys: tuple[str, ...]) -> DatasetEntry:
    import tensorflow_datasets as tfds

    builder = _open_builder(name, data_dir)
    features = builder.info.features
    names = list(features.keys())
    image_key = image_key or ("image" if "image" in names else "")
    if image_key not in names:
        raise ValueError(f"dataset {name!r} has no image feature {image_key or 'image'!r} "
                         f"(features: {', '.join(names)}); set config.data.image_key")
    if text_key:
        if text_key not in names:
            raise ValueError(f"config.data.text_key={text_key!r} is not a feature of dataset "
                             f"{name!r} (features: {', '.join(names)})")
    else:
        text_key = next((k for k in ("captions", "caption") if k in names), None)
    class_labels = [k for k in names if isinstance(features[k], tfds.features.ClassLabel)]
    if label_keys:
        missing = [k for k in label_keys if k not in names]
        if missing:
            raise ValueError(f"config.data.label_keys: {missing} not features of {name!r} "
                             f"(features: {', '.join(names)})")
    else:
        label_keys = tuple(class_labels)
    class_names = {k: [n.replace("_", " ") for n in features[k].names]
                   for k in label_keys if k in class_labels}

    meta = {}
    meta_path = os.path.join(os.fspath(builder.data_dir), METADATA_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    vocab = meta.get("vocabulary")
    templates = meta.get("templates") or list(DEFAULT_CLASS_TEMPLATES)

    image_decoders = {k: tfds.decode.SkipDecoding() for k in names
                      if isinstance(features[k], tfds.features.Image)}

    def prepare(data_config):
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            return _tf_sources(builder, name)
        return {split: builder.as_data_source(split, decoders=image_decoders or None)
                for split in builder.info.splits}

    return DatasetEntry(
        prepare=prepare,
        vocabulary_texts=(lambda data_config: list(vocab)) if vocab else None,
        label_keys=tuple(label_keys),
        class_names=class_names,
        zero_shot_templates={k: list(templates) for k in class_names},
        image_key=image_key,
        text_key=text_key,
        key_field="key" if "key" in names else None,
    )


def resolve_dataset(data_config) -> DatasetEntry:
    """The entry for ``config.data``: a registered name, else a TFDS dataset under ``data_dir``.

    Raises:
      ValueError naming ``config.data.name`` when it is neither.
    """
    name = str(data_config.name)
    if name == "sources":  # helper F (issue 18): config.data.sources, streamed shards
        from contrastive_jax.data.streaming import stream_entry

        return stream_entry(data_config)
    if name in _DATASETS:
        return _DATASETS[name]
    from contrastive_jax.data.config import complete

    data_config = complete(data_config)
    data_dir = os.path.expanduser(os.fspath(data_config.data_dir))
    return _tfds_entry(name, data_dir, str(data_config.image_key), str(data_config.text_key),
                       tuple(data_config.label_keys))


def build_dataset(data_config) -> dict[str, Any]:
    """Prepares ``config.data.name`` if needed; returns ``{split: random-access source}``."""
    return dict(resolve_dataset(data_config).prepare(data_config))


def dataset_info(data_config) -> dict[str, Any]:
    """What evaluation needs to know about ``config.data.name``: ``class_names``,
    ``templates`` (label key -> list), ``prompts`` (label key -> [C][T], possibly empty) and
    ``label_keys``. Image-text datasets without class labels have empty ``class_names``
    (evaluation is then retrieval only)."""
    entry = resolve_dataset(data_config)
    prompts = {}
    if entry.zero_shot_prompts is not None:
        prompts = {k: entry.zero_shot_prompts(k) for k in entry.class_names}
    return {
        "class_names": {k: list(v) for k, v in entry.class_names.items()},
        "templates": {k: list(v) for k, v in entry.zero_shot_templates.items()},
        "prompts": prompts,
        "label_keys": tuple(entry.label_keys),
    }
