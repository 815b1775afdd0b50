"""Readers of the benchmark's on-disk formats; nothing is downloaded.

Every reader yields examples as dicts: ``image`` (encoded bytes, or a uint8 ``[H, W, 3|1]``
array) plus ``label`` (int, classification) or ``captions`` (``list[str]``, retrieval).

- TFDS datasets prepared under a data dir (``<data_dir>/<name>[/<config>]/<version>/``): an
  ``array_record`` dataset is read through ``builder.as_data_source`` (no TensorFlow; images stay
  encoded until the benchmark decodes them); a ``tfrecord`` one (TFDS's default format) is read
  frame by frame and parsed by its own features, also without TensorFlow
  (:func:`_tfrecord_examples`).
- CLIP_benchmark's WebDataset export: ``<root>/<folder>/test/*.tar`` with ``KEY.webp|png|jpg|jpeg``
  and ``KEY.cls`` (classification, the label as decimal text) or ``KEY.txt`` (retrieval, one
  caption per line); ``classnames.txt`` and ``zeroshot_classification_templates.txt`` at the
  folder's root override the shipped ones when present.
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
from typing import Iterator

from contrastive_jax.evaluate.benchmark.datasets import BenchmarkDataset, TfdsSource

_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


class SourceUnavailable(Exception):
    """The dataset is on disk but cannot be read here; the message says what to do."""


# -- TFDS ----------------------------------------------------------------------------------------


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in v.split("."))


def find_tfds(source: TfdsSource, data_dir: str | None) -> str | None:
    """The newest prepared version folder of ``source.name`` under ``data_dir`` (the folder
    holding ``dataset_info.json``), or None."""
    if not data_dir:
        return None
    base = os.path.join(os.path.expanduser(data_dir), *source.name.split("/"))
    if not os.path.isdir(base):
        return None
    versions = [v for v in os.listdir(base) if re.fullmatch(r"\d+\.\d+\.\d+", v)
                and os.path.isfile(os.path.join(base, v, "dataset_info.json"))]
    if not versions:
        return None
    return os.path.join(base, max(versions, key=_version_key))


def _builder(path: str):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(path)


def tfds_class_names(path: str, label_key: str) -> list[str] | None:
    """The ``ClassLabel`` names of ``label_key`` in a prepared TFDS dataset (None: not a ClassLabel)."""
    import tensorflow_datasets as tfds

    feature = _builder(path).info.features
    feature = feature[label_key] if label_key in feature else None
    return list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None


def tfds_task(path: str) -> tuple[str, str] | None:
    """What an arbitrary prepared TFDS dataset can be benchmarked on, from its features:
    ``('label', 'label')`` (a ClassLabel ``label``: classification), ``('captions', KEY)`` (a
    ``captions`` sequence of texts, or of dicts with a ``text``, or a single Text ``caption``:
    retrieval), else None."""
    import tensorflow_datasets as tfds

    features = _builder(path).info.features
    if "label" in features and isinstance(features["label"], tfds.features.ClassLabel):
        return "label", "label"
    if "captions" in features:
        inner = getattr(features["captions"], "feature", None)
        if isinstance(inner, tfds.features.FeaturesDict) and "text" in inner:
            return "captions", "captions/text"
        return "captions", "captions"
    if "caption" in features and isinstance(features["caption"], tfds.features.Text):
        return "captions", "caption"  # one caption per image (e.g. the built-in `shapes`)
    return None


def tfds_size(path: str, split: str) -> int | None:
    info = _builder(path).info
    return int(info.splits[split].num_examples) if split in info.splits else None


def _nested(example: dict, key: str):
    for part in key.split("/"):
        example = example[part]
    return example


def _as_example(ex: dict, source: TfdsSource) -> dict:
    out = {"image": ex[source.image_key]}
    if source.captions_key:
        caps = _nested(ex, source.captions_key)
        caps = [caps] if isinstance(caps, (bytes, str)) else list(caps)
        out["captions"] = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in caps]
    elif source.label_fn == "clevr_count":
        # VTAB's CLEVR count task: classes are 3..10 objects.
        out["label"] = len(ex["objects"]["size"]) - 3
    else:
        out["label"] = int(ex[source.label_key])
    return out


def tfds_examples(path: str, source: TfdsSource) -> Iterator[dict]:
    """The examples of ``source.split`` of the prepared TFDS dataset at ``path``.

    Raises:
      SourceUnavailable: the split is missing, or the files are TFRecord and ``crc32c`` is absent.
    """
    import tensorflow_datasets as tfds

    builder = _builder(path)
    if source.split not in builder.info.splits:
        raise SourceUnavailable(f"{path} has no split {source.split!r} (it has {sorted(builder.info.splits)})")
    fmt = getattr(builder.info.file_format, "value", str(builder.info.file_format))
    decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
                if isinstance(f, tfds.features.Image)}
    if fmt == "array_record":
        data = builder.as_data_source(source.split, decoders=decoders)
        for i in range(len(data)):
            yield _as_example(data[i], source)
        return
    yield from (_as_example(ex, source) for ex in _tfrecord_examples(builder, source.split, decoders, path))


def _tfrecord_examples(builder, split: str, decoders: dict, path: str) -> Iterator[dict]:
    """A TFRecord-format TFDS split (``tfds build``'s default) without TensorFlow: each shard's
    frames read with their CRC-32C checked (:func:`contrastive_jax.data.streaming.tfrecord_payloads`)
    and each record parsed by the dataset's own features (``deserialize_example_np``), shards in
    TFDS's order, so the examples are those ``builder.as_dataset`` would give, unshuffled."""
    from contrastive_jax.data import streaming

    try:
        streaming.crc32c_module()
    except ImportError as e:
        raise SourceUnavailable(f"present but TFRecord ({path}): {e}") from None
    features = builder.info.features
    for shard in builder.info.splits[split].filepaths:
        shard = os.fspath(shard)
        with open(shard, "rb") as fh:
            for raw in streaming.tfrecord_payloads(fh, shard):
                yield features.deserialize_example_np(raw, decoders=decoders)


# -- CLIP_benchmark's WebDataset export -------------------------------------------------------


def find_wds(dataset: BenchmarkDataset, root: str | None) -> str | None:
    """The export folder of ``dataset`` under ``root`` (one with ``test/*.tar``), or None."""
    if not root:
        return None
    root = os.path.expanduser(root)
    for folder in dataset.wds_folders:
        path = os.path.join(root, folder)
        if glob.glob(os.path.join(path, "test", "*.tar")):
            return path
    return None


def _shards(path: str) -> list[str]:
    """``test/*.tar`` in numeric order (``0.tar, 1.tar, ..., 10.tar``)."""
    def key(p):
        stem = os.path.basename(p)[:-4]
        return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)

    return sorted(glob.glob(os.path.join(path, "test", "*.tar")), key=key)


def _wds_example(key: str, parts: dict, where: str) -> dict:
    image = next((parts[e] for e in _IMAGE_EXTS if e in parts), None)
    if image is None:
        raise ValueError(f"{where}: sample {key!r} has no image (.webp/.png/.jpg/.jpeg)")
    if "txt" in parts and "cls" not in parts:
        lines = parts["txt"].decode("utf-8").splitlines()
        return {"image": image, "captions": [ln for ln in lines if ln.strip()]}
    if "cls" not in parts:
        raise ValueError(f"{where}: sample {key!r} has neither .cls (label) nor .txt (captions)")
    return {"image": image, "label": int(parts["cls"].decode("ascii").strip())}


def wds_examples(path: str) -> Iterator[dict]:
    """The samples of an export folder's ``test`` shards in order (members sharing the name before
    the first dot of their basename form one sample)."""
    for shard in _shards(path):
        with tarfile.open(shard, "r|*") as tar:
            key, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                stem, _, ext = base.partition(".")
                this = os.path.join(folder, stem)
                if this != key and parts:
                    yield _wds_example(key, parts, shard)
                    parts = {}
                key = this
                parts[ext.lower()] = tar.extractfile(member).read()
            if parts:
                yield _wds_example(key, parts, shard)


def wds_text_file(path: str, name: str) -> list[str] | None:
    """Non-empty lines of ``path/name`` (the export's ``classnames.txt`` or templates), or None."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh]
    return [ln for ln in lines if ln] or None
