"""User data -> a TFDS dataset (array_record) that ``config.data.name`` loads by name.

Three source layouts (:func:`convert`, ``contrastive-jax data convert``):

* ``folder``: a folder of images plus a CSV or JSONL file of captions. CSV: a header with an image
  column (``image``, ``file``, ``filename`` or ``path``; relative to the folder) and a ``caption``
  column; several rows for one image give it several captions. JSONL: one object per line with
  ``image`` and ``caption`` (a string) or ``captions`` (a list).
* ``webdataset``: ``.tar`` shards of ``KEY.jpg|jpeg|png|webp`` with ``KEY.txt`` (the caption) or
  ``KEY.json`` (``caption``/``captions``/``text``).
* ``classes``: an image-classification tree ``CLASS_NAME/*.jpg``; labels are the sorted class
  folder names, and each image gets the caption ``class_template.format(class name)``.

Records store the ENCODED image bytes (decoded later, in grain workers, with PIL), the captions,
a ``key`` naming the source file and, for ``classes``, a ``label`` ClassLabel. Splits are
deterministic: a record's split is chosen by a hash of (seed, key), independent of file order and
of the other records. Every image is fully decoded once during conversion; unreadable, empty or
truncated images, missing files and records without a non-empty caption are skipped and listed in
the report. Conversion is resumable: validated records are staged in chunks under
``DATA_DIR/.staging/NAME``; an interrupted run picks up after the last finished chunk.

Next to the TFDS files, ``contrastive_jax.json`` holds the word vocabulary of the train captions
(for the default word tokenizer), the class names and the conversion report.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import tarfile
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np

from contrastive_jax.data.registry import METADATA_FILE
from contrastive_jax.data.tokenizer import split_words
from contrastive_jax.data.transforms import BadImageError, decode_image

FORMATS = ("folder", "webdataset", "classes")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_CHUNK = 256
_STAGING_VERSION = 1


class ConversionError(ValueError):
    """Bad conversion input; the message names the file (and line) at fault."""


@dataclasses.dataclass
class _Item:
    key: str
    read: Callable[[], bytes]  # raises FileNotFoundError when the file is missing
    captions: list[str]
    label: int = -1


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def _read_file(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()
    return read


def _folder_items(folder: str, captions_path: str) -> list[_Item]:
    if not os.path.isfile(captions_path):
        raise ConversionError(f"captions file not found: {captions_path}")
    by_image: dict[str, list[str]] = {}
    if captions_path.endswith((".jsonl", ".json")):
        with open(captions_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    image = obj["image"]
                    caps = obj["captions"] if "captions" in obj else [obj["caption"]]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConversionError(f"{captions_path}:{lineno}: need an object with 'image' and "
                                          f"'caption' or 'captions' ({type(e).__name__}: {e})") from None
                if isinstance(caps, str):
                    caps = [caps]
                by_image.setdefault(str(image), []).extend(str(c) for c in caps)
    else:
        with open(captions_path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            image_col = next((c for c in ("image", "file", "filename", "path") if c in fields), None)
            if image_col is None or "caption" not in fields:
                raise ConversionError(f"{captions_path}: the header must name an image column (image, "
                                      f"file, filename or path) and a 'caption' column; got {fields}")
            for row in reader:
                by_image.setdefault(row[image_col], []).append(row["caption"] or "")
    return [_Item(key=image, read=_read_file(os.path.join(folder, image)), captions=caps)
            for image, caps in by_image.items()]


def _caption_from_json(data: bytes) -> list[str]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    for field in ("captions", "caption", "text"):
        if field in obj:
            value = obj[field]
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return []


def _webdataset_items(source: str) -> list[_Item]:
    if os.path.isdir(source):
        shards = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".tar"))
    else:
        shards = [source]
    if not shards:
        raise ConversionError(f"no .tar shards in {source}")
    items = []
    for shard in shards:
        try:
            tar = tarfile.open(shard)
        except (tarfile.TarError, OSError) as e:
            raise ConversionError(f"cannot open tar shard {shard}: {e}") from None
        groups: dict[str, dict[str, Any]] = {}
        with tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                stem, _, ext = base.partition(".")  # WebDataset: the key ends at the first dot
                key = os.path.join(os.path.dirname(member.name), stem)
                data = tar.extractfile(member).read()
                groups.setdefault(key, {})["." + ext.lower()] = data
        for key, files in groups.items():
            image_ext = next((e for e in IMAGE_EXTS if e in files), None)
            image = files.get(image_ext, None) if image_ext else None
            if ".txt" in files:
                caps = [files[".txt"].decode("utf-8", "replace")]
            elif ".json" in files:
                caps = _caption_from_json(files[".json"])
            else:
                caps = []

            def read(image=image, key=key):
                if image is None:
                    raise FileNotFoundError(f"no image file for key {key}")
                return image
            items.append(_Item(key=f"{os.path.basename(shard)}/{key}", read=read, captions=caps))
    return items


def _class_items(root: str, template: str) -> tuple[list[_Item], list[str]]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ConversionError(f"{root}: no class folders (expected CLASS_NAME/*.jpg)")
    items = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for f in sorted(os.listdir(folder)):
            if f.lower().endswith(IMAGE_EXTS):
                items.append(_Item(key=f"{name}/{f}", read=_read_file(os.path.join(folder, f)),
                                   captions=[template.format(name.replace("_", " "))], label=label))
    return items, classes


def split_of(key: str, seed: int, test_fraction: float, validation_fraction: float) -> str:
    """The split of record ``key``: a pure function of (seed, key) and the fractions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


# ----------------------------------------------------------------------------------------------
# Validation and staging
# ----------------------------------------------------------------------------------------------


def _validate(item: _Item) -> tuple[dict | None, str | None]:
    """-> (record, None) or (None, reason)."""
    try:
        data = item.read()
    except (FileNotFoundError, IsADirectoryError):
        return None, "missing_file"
    except OSError as e:
        return None, f"unreadable_file: {e}"
    try:
        decode_image(data)
    except BadImageError as e:
        return None, e.reason
    captions = [c.strip() for c in item.captions if c and c.strip()]
    if not captions:
        return None, "empty_caption"
    return {"key": item.key, "image": data, "captions": captions, "label": item.label}, None


def _stage(items: list[_Item], staging: str, fingerprint: str, progress: bool) -> tuple[list, list, list]:
    """Validates every item; finished chunks are kept on disk so a re-run resumes after them.

    Returns (chunk paths, skipped [{key, reason}], [(key, captions)] of the good records); the
    image bytes stay on disk until the TFDS writer streams them.
    """
    os.makedirs(staging, exist_ok=True)
    manifest = os.path.join(staging, "manifest.json")
    want = {"version": _STAGING_VERSION, "fingerprint": fingerprint, "num_items": len(items)}
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            if json.load(f) != want:  # a different source or options: start over
                shutil.rmtree(staging)
                os.makedirs(staging)
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump(want, f)
    num_chunks = (len(items) + _CHUNK - 1) // _CHUNK
    done = [c for c in range(num_chunks) if os.path.isfile(os.path.join(staging, f"chunk_{c:06d}.pkl"))]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), initial=min(len(done) * _CHUNK, len(items)), desc="convert",
                   unit="img", dynamic_ncols=True)
    paths, good, skipped = [], [], []
    for c in range(num_chunks):
        path = os.path.join(staging, f"chunk_{c:06d}.pkl")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                chunk_records, chunk_skipped = pickle.load(f)
        else:
            chunk_records, chunk_skipped = [], []
            for item in items[c * _CHUNK:(c + 1) * _CHUNK]:
                record, reason = _validate(item)
                if record is None:
                    chunk_skipped.append({"key": item.key, "reason": reason})
                else:
                    chunk_records.append(record)
                if bar is not None:
                    bar.update(1)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                pickle.dump((chunk_records, chunk_skipped), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)  # a chunk exists only once complete
        paths.append(path)
        good.extend((r["key"], r["captions"]) for r in chunk_records)
        skipped.extend(chunk_skipped)
    if bar is not None:
        bar.close()
    return paths, skipped, good


# ----------------------------------------------------------------------------------------------
# The TFDS builder
# ----------------------------------------------------------------------------------------------


def _builder_class():
    import tensorflow_datasets as tfds

    class UserImageText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A converted user dataset; its name is given per instance."""

        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            # tfds finds the defining file through the optional `importlib_resources` package
            # (not a dependency of ours); it is simply this one.
            from etils import epath
            return epath.Path(__file__)

        def __init__(self, *, name: str, version: str, splits: dict, class_names: list | None,
                     description: str, **kwargs):
            self.name = name
            self.VERSION = tfds.core.Version(version)
            self._splits = splits
            self._class_names = class_names
            self._description = description
            super().__init__(**kwargs)

        def _info(self):
            features = {
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "key": tfds.features.Text(),
            }
            if self._class_names is not None:
                features["label"] = tfds.features.ClassLabel(names=self._class_names)
            return tfds.core.DatasetInfo(builder=self, description=self._description,
                                         features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing is downloaded
            return {split: self._examples(split) for split in self._splits["names"]}

        def _generate_examples(self, **kwargs):
            raise NotImplementedError  # splits come from _split_generators

        def _examples(self, split):
            for path in self._splits["chunks"]:
                with open(path, "rb") as f:
                    chunk_records, _ = pickle.load(f)
                for r in chunk_records:
                    if self._splits["split_of"][r["key"]] != split:
                        continue
                    ex = {"image": r["image"], "captions": r["captions"], "key": r["key"]}
                    if self._class_names is not None:
                        ex["label"] = r["label"]
                    yield r["key"], ex

    return UserImageText


def _vocabulary(captions: list[str], min_count: int, max_size: int) -> list[str]:
    counts = Counter(w for c in captions for w in split_words(c))
    ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return sorted(ranked[:max_size])


def _collect_items(source: str, *, name: str, format: str, captions: str | None, class_template: str,
                   test_fraction: float, validation_fraction: float) -> tuple[list, list[str] | None]:
    """Checks :func:`convert`'s arguments and lists the source's records, sorted by key.

    Returns ``(items, class_names)`` (``class_names`` None unless ``format='classes'``).
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    if not name or not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ConversionError(f"dataset name {name!r} must be lower-case letters, digits and '_', "
                              "starting with a letter (a TFDS name)")
    if not (0 <= test_fraction and 0 <= validation_fraction and test_fraction + validation_fraction < 1):
        raise ConversionError(f"test_fraction={test_fraction} and validation_fraction="
                              f"{validation_fraction} must be >= 0 and sum to < 1")
    if not os.path.exists(source):
        raise ConversionError(f"source not found: {source}")
    class_names = None
    if format == "folder":
        if not captions:
            raise ConversionError("format 'folder' needs a captions file (--captions FILE.csv|.jsonl)")
        items = _folder_items(source, captions)
    elif format == "webdataset":
        items = _webdataset_items(source)
    else:
        items, class_names = _class_items(source, class_template)
    if not items:
        raise ConversionError(f"no records found in {source}")
    items.sort(key=lambda it: it.key)
    return items, class_names


def convert(
    source: str,
    *,
    name: str,
    data_dir: str,
    format: str = "folder",
    captions: str | None = None,
    class_template: str = "a photo of a {}.",
    test_fraction: float = 0.05,
    validation_fraction: float = 0.0,
    seed: int = 0,
    version: str = "1.0.0",
    max_bad_fraction: float = 0.05,
    vocab_min_count: int = 1,
    vocab_max_size: int = 50_000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Converts user data in ``source`` into the TFDS dataset ``name`` under ``data_dir``.

    Args:
      source: the image folder (``folder``), a ``.tar`` shard or folder of shards
        (``webdataset``), or the root of the class folders (``classes``).
      format: one of :data:`FORMATS`.
      captions: ``folder`` only: the CSV or JSONL captions file.
      class_template: ``classes`` only: caption of each image, ``{}`` = class name.
      test_fraction, validation_fraction: expected fractions of records in those splits.
      seed: split assignment seed.
      max_bad_fraction: more skipped records than this fraction is an error (nothing written).
      vocab_min_count, vocab_max_size: the stored word vocabulary of the train captions.
      overwrite: replace an existing dataset of the same name and version.

    Returns:
      The report (also in ``contrastive_jax.json``): ``num_records`` per split, ``num_skipped``,
      ``skipped`` (key and reason of each), ``skipped_by_reason``, ``dataset_dir``.
    """
    import tensorflow_datasets as tfds

    items, class_names = _collect_items(source, name=name, format=format, captions=captions,
                                        class_template=class_template, test_fraction=test_fraction,
                                        validation_fraction=validation_fraction)
    data_dir = os.path.abspath(os.path.expanduser(data_dir))

    Builder = _builder_class()
    dataset_dir = os.path.join(data_dir, name, version)
    if os.path.isdir(dataset_dir):
        if not overwrite:
            raise ConversionError(f"dataset {name!r} version {version} already exists in {dataset_dir} "
                                  "(pass --overwrite to replace it)")
        shutil.rmtree(dataset_dir)

    fingerprint = hashlib.sha256(json.dumps(
        [os.path.abspath(source), captions and os.path.abspath(captions), format, class_template,
         [it.key for it in items]]).encode()).hexdigest()
    staging = os.path.join(data_dir, ".staging", name)
    chunks, skipped, good = _stage(items, staging, fingerprint, progress)
    by_reason = dict(Counter(s["reason"].split(":")[0] for s in skipped))
    report: dict[str, Any] = {"source": os.path.abspath(source), "format": format,
                              "num_items": len(items), "num_skipped": len(skipped),
                              "skipped_by_reason": by_reason, "skipped": skipped}
    if len(skipped) > max_bad_fraction * len(items):
        raise ConversionError(
            f"{len(skipped)} of {len(items)} records of {source} are bad ({by_reason}; first: "
            f"{skipped[:5]}), more than max_bad_fraction={max_bad_fraction}; nothing was written "
            f"(validated records are kept in {staging} for a re-run)")

    assignment = {key: split_of(key, seed, test_fraction, validation_fraction) for key, _ in good}
    counts = Counter(assignment.values())
    if not counts["train"]:
        raise ConversionError(f"no record of {source} landed in the train split")
    split_spec = {"chunks": chunks, "split_of": assignment,
                  "names": [s for s in ("train", "validation", "test") if counts[s]]}

    builder = Builder(name=name, version=version, splits=split_spec, class_names=class_names,
                      description=f"Converted by contrastive-jax from {os.path.abspath(source)} ({format}).",
                      data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP),
    )
    report["num_records"] = {k: counts[k] for k in split_spec["names"]}
    report["dataset_dir"] = os.fspath(builder.data_dir)
    meta = {
        "vocabulary": _vocabulary([c for key, caps in good if assignment[key] == "train" for c in caps],
                                  vocab_min_count, vocab_max_size),
        "class_names": class_names,
        "templates": [class_template] if class_names is not None else None,
        "report": report,
    }
    with open(os.path.join(os.fspath(builder.data_dir), METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(staging, ignore_errors=True)
    from contrastive_jax.data import registry
    registry._tfds_entry.cache_clear()  # a dataset of this name may have been opened before
    return report


def iter_captions(data_config, split: str = "train") -> Iterator[str]:
    """Every caption of ``split`` of ``config.data.name`` (for tokenizer training)."""
    from contrastive_jax.data.pipeline import record_captions
    from contrastive_jax.data.registry import build_dataset, resolve_dataset

    entry = resolve_dataset(data_config)
    if entry.text_key is None:
        raise ValueError(f"dataset {data_config.name!r} has no captions")
    source = build_dataset(data_config)[split]
    for i in range(len(source)):
        yield from record_captions(source[i], entry.text_key)
