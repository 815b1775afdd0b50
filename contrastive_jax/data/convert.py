"""User data -> a TFDS dataset (array_record) that ``config.data.name`` loads by name.

Three source layouts (:func:`convert`, ``contrastive-jax data convert``):

* ``folder``: a folder of images plus a CSV, TSV or JSONL file of captions. CSV/TSV: a header with
  an image column (``image``, ``file``, ``filename`` or ``path``; relative to the folder) and a
  ``caption`` column; several rows for one image give it several captions. JSONL: one object per
  line with ``image`` and ``caption`` (a string) or ``captions`` (a list). The file's encoding is
  detected (UTF-8, a byte-order mark, else cp1252 / latin-1, reported) or given (``encoding``);
  fields have no length limit; a malformed line is an error naming ``FILE:LINE``; rows without a
  non-empty caption are dropped and counted by reason in the report.
* ``webdataset``: ``.tar`` shards of ``KEY.jpg|jpeg|png|webp`` with ``KEY.txt`` (the caption) or
  ``KEY.json`` (``caption``/``captions``/``text``).
* ``classes``: an image-classification tree ``CLASS_NAME/*.jpg``; labels are the sorted class
  folder names, and each image gets the caption ``class_template.format(class name)``. A folder
  without images is not a class (listed in the report as ignored).

Records store the ENCODED image bytes (decoded later, in grain workers, with PIL), the captions,
a ``key`` naming the source file and, for ``classes``, a ``label`` ClassLabel. Splits are
deterministic: a record's split is chosen by a hash of (seed, key), independent of file order and
of the other records. Every image is fully decoded once during conversion; unreadable, empty or
truncated images, missing files and records without a non-empty caption are skipped and listed in
the report. Conversion is resumable: validated records are staged in chunks under
``DATA_DIR/.staging/NAME``; an interrupted run picks up after the last finished chunk. The chunks
are keyed by content (each image's size and mtime, its captions, the options), so a fixed image or
an edited caption is validated again and never mixed with stale records; ``overwrite`` clears the
staging, and the ``incomplete.*`` folders of a killed TFDS write are removed before writing.

Next to the TFDS files, ``contrastive_jax.json`` holds the word vocabulary of the train captions
(for the default word tokenizer), the class names and the conversion report.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import socket
import sys
import tarfile
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from contrastive_jax.data.registry import METADATA_FILE
from contrastive_jax.data.tokenizer import split_words
from contrastive_jax.data.transforms import BadImageError, decode_image

FORMATS = ("folder", "webdataset", "classes")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_CHUNK = 256
_STAGING_VERSION = 2  # 2: chunks keyed by content (file stamps, captions), not by file names


class ConversionError(ValueError):
    """Bad conversion input; the message names the file (and line) at fault."""


@dataclasses.dataclass
class _Item:
    key: str
    read: Callable[[], bytes]  # raises FileNotFoundError when the file is missing
    captions: list[str]
    label: int = -1
    # What identifies the source's content for the staging cache (e.g. [size, mtime_ns] of the
    # image file, a digest of in-memory bytes; None: missing).
    stamp: Any = None


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FileReader:
    """Reads one image file (a picklable callable: Beam workers receive items as data)."""

    path: str

    def __call__(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


@dataclasses.dataclass(frozen=True)
class _BytesReader:
    """An image already in memory (a tar member); None: the sample had no image file."""

    data: bytes | None
    key: str

    def __call__(self) -> bytes:
        if self.data is None:
            raise FileNotFoundError(f"no image file for key {self.key}")
        return self.data


def _read_file(path: str) -> Callable[[], bytes]:
    return _FileReader(path)


# Byte-order marks of the encodings a caption file may start with (Excel's "CSV UTF-8" writes the
# UTF-8 one); the BOM decides the encoding and is not part of the first column's name.
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Shown with the line of each dropped caption row (the report keeps the first ones).
_MAX_LISTED_ROWS = 20


@dataclasses.dataclass
class CaptionRows:
    """What a captions file held: images with their kept captions, and every dropped row.

    Attributes:
      by_image: image path (relative to the folder) -> its non-empty captions, in file order. An
        image whose every caption row was dropped is present with ``[]`` (then skipped as
        ``empty_caption`` by the validation, like an unreadable image).
      encoding: the encoding the file was read with, and how it was chosen.
      dropped: reason -> number of rows dropped for it (``empty_caption``: empty or whitespace
        only; ``no_image``: empty image field; ``missing_field``: a short row).
      first_dropped: ``{'line': 'FILE:LINE', 'reason': ...}`` of the first dropped rows.
    """

    by_image: dict[str, list[str]]
    encoding: str
    dropped: Counter
    first_dropped: list[dict]

    def drop(self, where: str, reason: str) -> None:
        self.dropped[reason] += 1
        if len(self.first_dropped) < _MAX_LISTED_ROWS:
            self.first_dropped.append({"line": where, "reason": reason})

    def add(self, where: str, image: Any, captions: list) -> None:
        image = "" if image is None else str(image).strip()
        if not image:
            self.drop(where, "no_image")
            return
        kept = self.by_image.setdefault(image, [])
        for caption in captions:
            if caption is None or isinstance(caption, (dict, list)):
                self.drop(where, "missing_field" if caption is None else "not_a_string")
            elif not str(caption).strip():
                self.drop(where, "empty_caption")
            else:
                kept.append(str(caption))


def _first_bad_line(path: str, encoding: str) -> tuple[int, str]:
    """(1-based line, that line's start as text with escapes) of the first line of ``path`` that
    ``encoding`` cannot decode; (0, '') if none (a line-based check: not for UTF-16)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError:
                return lineno, line[:60].decode("ascii", "backslashreplace").rstrip()
    return 0, ""


def detect_encoding(path: str, encoding: str | None = None) -> tuple[str, str]:
    """The encoding to read caption file ``path`` with -> ``(codec, description for the report)``.

    ``encoding`` given: used as is (a BOM of that family is still skipped). Otherwise: a BOM decides
    (UTF-8 or UTF-16); else UTF-8 when every line is valid UTF-8; else Windows-1252 when it decodes
    every line (the usual legacy Excel export), else Latin-1 (decodes any byte), with the first
    non-UTF-8 line named in the description.

    Raises:
      ConversionError: ``encoding`` is not a codec Python knows.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    bom = next((codec for mark, codec in _BOMS if head.startswith(mark)), None)
    if encoding:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise ConversionError(f"--encoding {encoding!r} is not a known text encoding (e.g. utf-8, cp1252, "
                                  "latin-1)") from None
        if name == "utf-8" and bom == "utf-8-sig":
            return "utf-8-sig", "utf-8 (given; byte-order mark skipped)"
        return encoding, f"{encoding} (given)"
    if bom:
        return bom, f"{bom} (byte-order mark)"
    lineno, text = _first_bad_line(path, "utf-8")
    if not lineno:
        return "utf-8", "utf-8"
    fallback = "latin-1" if _first_bad_line(path, "cp1252")[0] else "cp1252"
    return fallback, (f"{fallback} (detected: line {lineno} is not valid UTF-8: '{text}'; pass --encoding "
                      "to choose another)")


@contextlib.contextmanager
def _long_csv_fields():
    """Lifts the csv module's 131,072-character field limit (a long caption is not an error)."""
    old = csv.field_size_limit()
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:  # platforms whose C long is 32 bits
            limit //= 2
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_jsonl(f, path: str, rows: CaptionRows) -> None:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            image = obj["image"]
            caps = obj["captions"] if "captions" in obj else [obj["caption"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{path}:{lineno}: need an object with 'image' and "
                                  f"'caption' or 'captions' ({type(e).__name__}: {e})") from None
        rows.add(f"{os.path.basename(path)}:{lineno}", image, [caps] if isinstance(caps, str) else
                 list(caps) if isinstance(caps, list) else [caps])


def _read_csv(f, path: str, rows: CaptionRows) -> None:
    first = f.readline()
    f.seek(0)
    # TSV by extension, or a header with tabs and no commas.
    tab = path.lower().endswith((".tsv", ".tab")) or ("\t" in first and "," not in first)
    # CSV strict: an unclosed quote is an error at its line, not the rest of the file read as one
    # caption. TSV (CC3M-style) has no quoting: a caption may hold any quote ('5" screen').
    reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tab
              else csv.reader(f, delimiter=",", strict=True))
    row_start = 1
    try:
        header = next(reader, None) or []
        names = [h.strip().lower() for h in header]
        image_col = next((names.index(c) for c in ("image", "file", "filename", "path") if c in names), None)
        if image_col is None or "caption" not in names:
            raise ConversionError(f"{path}:1: the header must name an image column (image, file, filename or "
                                  f"path) and a 'caption' column; got {header}")
        caption_col = names.index("caption")
        while True:
            row_start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            where = f"{os.path.basename(path)}:{row_start}"
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            if len(row) <= max(image_col, caption_col):
                rows.drop(where, "missing_field")
                continue
            rows.add(where, row[image_col], [row[caption_col]])
    except csv.Error as e:
        what = ("a quoted field opened on this line is never closed" if "end of data" in str(e) else str(e))
        raise ConversionError(f"{path}:{row_start}: malformed {'TSV' if tab else 'CSV'}: {what} (quote a field "
                              'that contains the separator, a quote or a line break: "a ""quoted"" word")') from None


def read_captions(path: str, encoding: str | None = None) -> CaptionRows:
    """Reads a captions file: CSV / TSV (a header with an image column and ``caption``) or JSONL
    (``.jsonl`` / ``.json``: ``image`` and ``caption`` or ``captions`` per line).

    Args:
      encoding: the file's text encoding; None detects it (:func:`detect_encoding`).

    Raises:
      ConversionError: missing file, bad header or malformed line, naming ``FILE:LINE``.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"captions file not found: {path}")
    codec, described = detect_encoding(path, encoding)
    rows = CaptionRows(by_image={}, encoding=described, dropped=Counter(), first_dropped=[])
    try:
        with open(path, encoding=codec, newline="") as f, _long_csv_fields():
            if path.lower().endswith((".jsonl", ".json")):
                _read_jsonl(f, path, rows)
            else:
                _read_csv(f, path, rows)
    except UnicodeDecodeError as e:
        lineno, text = _first_bad_line(path, codec)
        where = f"{path}:{lineno}" if lineno else path
        raise ConversionError(f"{where}: cannot decode as {codec} ({e.reason} in '{text}'); pass --encoding "
                              "with the file's encoding (e.g. cp1252, latin-1)") from None
    return rows


def _file_stamp(path: str) -> list | None:
    """(size, mtime in ns) of an image file, None when missing: what the staging cache is keyed on."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _folder_items(folder: str, rows: CaptionRows) -> list[_Item]:
    items = []
    for image, caps in rows.by_image.items():
        path = os.path.join(folder, image)
        items.append(_Item(key=image, read=_read_file(path), captions=caps, stamp=_file_stamp(path)))
    return items


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

            read = _BytesReader(image, key)
            stamp = hashlib.sha256(image).hexdigest() if image is not None else None
            items.append(_Item(key=f"{os.path.basename(shard)}/{key}", read=read, captions=caps, stamp=stamp))
    return items


def _class_items(root: str, template: str) -> tuple[list[_Item], list[str], list[str]]:
    """-> (items, class names, ignored folders). A folder without images is not a class (its
    label would never be seen, yet zero-shot evaluation would score it); hidden folders
    (``.ipynb_checkpoints``) neither."""
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    images = {d: sorted(f for f in os.listdir(os.path.join(root, d)) if f.lower().endswith(IMAGE_EXTS))
              for d in folders if not d.startswith(".")}
    classes = [d for d in folders if images.get(d)]
    ignored = [d for d in folders if not images.get(d)]
    if not classes:
        raise ConversionError(f"{root}: no class folder with images (expected CLASS_NAME/*.jpg; image "
                              f"extensions: {', '.join(IMAGE_EXTS)})")
    items = []
    for label, name in enumerate(classes):
        for f in images[name]:
            path = os.path.join(root, name, f)
            items.append(_Item(key=f"{name}/{f}", read=_read_file(path), stamp=_file_stamp(path),
                               captions=[template.format(name.replace("_", " "))], label=label))
    return items, classes, ignored


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


def _chunk_name(index: int, items: list[_Item], options: str) -> str:
    """A chunk's file name: its position and a digest of everything its records are made of (key,
    image stamp, captions, label) and of the conversion options, so an edited caption, a fixed
    or replaced image or another option never reuses a stale chunk."""
    content = json.dumps([_STAGING_VERSION, options, [[it.key, it.stamp, it.captions, it.label] for it in items]])
    return f"chunk_{index:06d}_{hashlib.sha256(content.encode('utf-8')).hexdigest()[:24]}.pkl"


def _stage(items: list[_Item], staging: str, options: str, progress: bool) -> tuple[list, list, list]:
    """Validates every item; finished chunks are kept on disk so a re-run resumes after them.

    The staging folder is a cache keyed by content (:func:`_chunk_name`): a chunk whose records
    changed is validated again, chunk files no longer wanted (stale, or half-written ``.tmp``)
    are removed first.

    Returns (chunk paths, skipped [{key, reason}], [(key, captions)] of the good records); the
    image bytes stay on disk until the TFDS writer streams them.
    """
    os.makedirs(staging, exist_ok=True)
    chunks = [items[c:c + _CHUNK] for c in range(0, len(items), _CHUNK)]
    names = [_chunk_name(c, chunk, options) for c, chunk in enumerate(chunks)]
    for f in set(os.listdir(staging)) - set(names):
        path = os.path.join(staging, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    done = [n for n in names if os.path.isfile(os.path.join(staging, n))]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), initial=sum(len(chunks[names.index(n)]) for n in done), desc="convert",
                   unit="img", dynamic_ncols=True, file=sys.stderr)
    paths, good, skipped = [], [], []
    for chunk, name in zip(chunks, names):
        path = os.path.join(staging, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                chunk_records, chunk_skipped = pickle.load(f)
        else:
            chunk_records, chunk_skipped = _stage_chunk(path, chunk, bar)
        paths.append(path)
        good.extend((r["key"], r["captions"]) for r in chunk_records)
        skipped.extend(chunk_skipped)
    if bar is not None:
        bar.close()
    return paths, skipped, good


def _stage_chunk(path: str, chunk: list[_Item], bar=None) -> tuple[list[dict], list[dict]]:
    """Validates one chunk of items and writes it to ``path`` (atomically: a chunk file exists
    only once complete) -> (records, skipped). Runs in this process or in a Beam worker."""
    chunk_records, chunk_skipped = [], []
    for item in chunk:
        record, reason = _validate(item)
        if record is None:
            chunk_skipped.append({"key": item.key, "reason": reason})
        else:
            chunk_records.append(record)
        if bar is not None:
            bar.update(1)
    tmp = f"{path}.tmp.{os.getpid()}"  # a retried Beam bundle may run beside the first try
    with open(tmp, "wb") as f:
        pickle.dump((chunk_records, chunk_skipped), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return chunk_records, chunk_skipped


def _stage_chunk_element(element: tuple[str, list[_Item]]) -> int:
    path, chunk = element
    _stage_chunk(path, chunk)
    return len(chunk)


def _stage_with_beam(items: list[_Item], staging: str, options: str, beam_options) -> int:
    """Validates (decodes) the chunks not yet staged as a Beam pipeline, one element per chunk;
    :func:`_stage` then finds them all done. The staging folder must be visible to every worker
    (local workers, or a cluster sharing the file system). Returns the number of items validated."""
    import apache_beam as beam

    os.makedirs(staging, exist_ok=True)
    chunks = [items[c:c + _CHUNK] for c in range(0, len(items), _CHUNK)]
    todo = []
    for c, chunk in enumerate(chunks):
        path = os.path.join(staging, _chunk_name(c, chunk, options))
        if not os.path.isfile(path):
            todo.append((path, chunk))
    if todo:
        with beam.Pipeline(options=beam_options) as pipeline:
            _ = (pipeline
                 | "Chunks" >> beam.Create(todo, reshuffle=False)
                 | "Spread" >> beam.Reshuffle()  # one chunk per worker at a time, not all in one bundle
                 | "Validate" >> beam.Map(_stage_chunk_element))
    return sum(len(chunk) for _, chunk in todo)


def _beam_options(runner: str, num_workers: int, options: Sequence[str]):
    """:func:`convert`'s runner -> Beam ``PipelineOptions``, or None for this process."""
    if runner not in ("single_process", "beam"):
        raise ConversionError(f"runner={runner!r}; valid: single_process, beam")
    if runner == "single_process":
        return None
    from contrastive_jax.data.beam import pipeline_options

    return pipeline_options(num_workers, options)


def _stage_on(beam_options, items: list[_Item], staging: str, options: str, progress: bool):
    """:func:`_stage`, its validation done by Beam first when ``beam_options`` is set -> (chunk
    paths, skipped, good records, the report's runner fields)."""
    if beam_options is None:
        return (*_stage(items, staging, options, progress), {"runner": "single_process"})
    from contrastive_jax.data.beam import runner_name

    validated = _stage_with_beam(items, staging, options, beam_options)
    return (*_stage(items, staging, options, False), {"runner": runner_name(beam_options),
                                                      "validated_by_beam": validated})


@contextlib.contextmanager
def _conversion_lock(path: str, name: str):
    """Holds an exclusive lock (file ``path``, next to the staging folder) on dataset ``name``:
    two conversions of one name would otherwise share chunks and remove each other's TFDS writes."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise ConversionError(f"another conversion of dataset {name!r} is running ({f.read().strip() or 'pid ?'}, "
                                  f"lock {path}); wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_incomplete_writes(data_dir: str, name: str) -> list[str]:
    """Removes the ``incomplete.*`` folders a killed TFDS write of ``name`` left (TFDS writes into
    one and renames it when done); called under the conversion lock, so none is in use."""
    parent = os.path.join(data_dir, name)
    removed = []
    if os.path.isdir(parent):
        for f in sorted(os.listdir(parent)):
            if f.startswith("incomplete.") and os.path.isdir(os.path.join(parent, f)):
                shutil.rmtree(os.path.join(parent, f))
                removed.append(f)
    return removed


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
                yield from _chunk_examples(path, split, self._splits["split_args"], self._class_names is not None)

    return UserImageText


def _beam_builder_class():
    """The same dataset written by TFDS's Beam mechanism: ``_split_generators`` gets the pipeline
    and returns one PCollection of (key, example) per split, read from the staged chunks; TFDS's
    Beam writer shuffles by key hash like its single-process writer."""
    import apache_beam as beam

    class UserImageTextBeam(_builder_class(), skip_registration=True):
        def _split_generators(self, dl_manager, pipeline):
            del dl_manager
            args, with_label = self._splits["split_args"], self._class_names is not None
            return {split: (pipeline
                            | f"{split}_chunks" >> beam.Create(self._splits["chunks"])
                            | f"{split}_examples" >> beam.FlatMap(
                                lambda path, split=split: _chunk_examples(path, split, args, with_label)))
                    for split in self._splits["names"]}

    return UserImageTextBeam


def _chunk_examples(path: str, split: str, split_args: tuple, with_label: bool) -> Iterator[tuple[str, dict]]:
    """(key, TFDS example) of the staged chunk ``path``'s records that belong to ``split``
    (``split_args``: the seed and fractions of :func:`split_of`)."""
    with open(path, "rb") as f:
        chunk_records, _ = pickle.load(f)
    for r in chunk_records:
        if split_of(r["key"], *split_args) != split:
            continue
        ex = {"image": r["image"], "captions": r["captions"], "key": r["key"]}
        if with_label:
            ex["label"] = r["label"]
        yield r["key"], ex


def _vocabulary(captions: list[str], min_count: int, max_size: int) -> list[str]:
    counts = Counter(w for c in captions for w in split_words(c))
    ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return sorted(ranked[:max_size])


def _collect_items(source: str, *, name: str, format: str, captions: str | None, class_template: str,
                   test_fraction: float, validation_fraction: float,
                   encoding: str | None) -> tuple[list, list[str] | None, dict]:
    """Checks :func:`convert`'s arguments and lists the source's records, sorted by key.

    Returns ``(items, class_names, notes)``: ``class_names`` None unless ``format='classes'``;
    ``notes`` what the report says about reading the source (caption file encoding, dropped
    caption rows by reason, class folders that are not classes).
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
    class_names, notes = None, {}
    if format == "folder":
        if not captions:
            raise ConversionError("format 'folder' needs a captions file (--captions FILE.csv|.tsv|.jsonl)")
        rows = read_captions(captions, encoding)
        items = _folder_items(source, rows)
        notes = {"captions_encoding": rows.encoding, "caption_rows_dropped": sum(rows.dropped.values()),
                 "caption_rows_dropped_by_reason": dict(rows.dropped),
                 "first_dropped_caption_rows": rows.first_dropped}
    elif format == "webdataset":
        items = _webdataset_items(source)
    else:
        items, class_names, ignored = _class_items(source, class_template)
        notes = {"ignored_folders": ignored}  # empty or hidden: not classes
    if not items:
        raise ConversionError(f"no records found in {source}")
    items.sort(key=lambda it: it.key)
    return items, class_names, notes


def _write_dataset(data_dir: str, name: str, version: str, *, split_spec: dict, class_names, description: str,
                   overwrite: bool, beam_options=None) -> str:
    """Writes the staged records as TFDS array_record files; returns the dataset folder.

    An existing dataset (``overwrite`` only) is removed now, once its replacement is ready to be
    written, never before the records were validated. ``beam_options``: write through TFDS's Beam
    writer with these ``PipelineOptions`` (None: TFDS's single-process writer)."""
    import tensorflow_datasets as tfds

    dataset_dir = os.path.join(data_dir, name, version)
    if os.path.isdir(dataset_dir) and overwrite:
        shutil.rmtree(dataset_dir)
    cls = _builder_class() if beam_options is None else _beam_builder_class()
    builder = cls(name=name, version=version, splits=split_spec, class_names=class_names,
                  description=description, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP, beam_options=beam_options),
    )
    return os.fspath(builder.data_dir)


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
    encoding: str | None = None,
    runner: str = "single_process",
    num_workers: int = 2,
    beam_options: Sequence[str] = (),
) -> dict:
    """Converts user data in ``source`` into the TFDS dataset ``name`` under ``data_dir``.

    Args:
      source: the image folder (``folder``), a ``.tar`` shard or folder of shards
        (``webdataset``), or the root of the class folders (``classes``).
      format: one of :data:`FORMATS`.
      captions: ``folder`` only: the CSV, TSV or JSONL captions file.
      class_template: ``classes`` only: caption of each image, ``{}`` = class name.
      test_fraction, validation_fraction: expected fractions of records in those splits.
      seed: split assignment seed.
      max_bad_fraction: more skipped records than this fraction is an error (nothing written).
      vocab_min_count, vocab_max_size: the stored word vocabulary of the train captions.
      overwrite: replace an existing dataset of the same name and version, and validate every
        record again (the staging cache of an earlier, interrupted run is cleared).
      encoding: the captions file's text encoding; None: detected (UTF-8, a BOM, else cp1252 /
        latin-1, reported as ``captions_encoding``).
      runner: ``'single_process'`` (this process) or ``'beam'``: images are validated and the
        dataset written by Apache Beam pipelines (TFDS's Beam mechanism for large datasets), by
        default on ``num_workers`` local DirectRunner processes; ``beam_options`` (``'K=V'``
        strings, e.g. ``'runner=FlinkRunner'``) pick another runner. The records written are the
        same as the single-process conversion's. Other runners' workers must see ``source`` and
        ``data_dir`` (a shared file system). Needs the ``[beam]`` extra.

    Returns:
      The report (also in ``contrastive_jax.json``): ``num_records`` per split, ``num_skipped``,
      ``skipped`` (key and reason of each), ``skipped_by_reason``, ``dataset_dir``; for folders
      ``captions_encoding`` and the dropped caption rows by reason; for class folders the
      ``ignored_folders``; ``removed_incomplete_writes`` (TFDS folders a killed run left).
    """
    beam_options = _beam_options(runner, num_workers, beam_options)
    items, class_names, notes = _collect_items(
        source, name=name, format=format, captions=captions, class_template=class_template,
        test_fraction=test_fraction, validation_fraction=validation_fraction, encoding=encoding)
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    dataset_dir = os.path.join(data_dir, name, version)
    if os.path.isdir(dataset_dir) and not overwrite:
        raise ConversionError(f"dataset {name!r} version {version} already exists in {dataset_dir} "
                              "(pass --overwrite to replace it)")
    staging = os.path.join(data_dir, ".staging", name)
    with _conversion_lock(staging + ".lock", name):
        if overwrite:
            shutil.rmtree(staging, ignore_errors=True)
        options = json.dumps([format, class_template])
        chunks, skipped, good, report_runner = _stage_on(beam_options, items, staging, options, progress)
        by_reason = dict(Counter(s["reason"].split(":")[0] for s in skipped))
        report: dict[str, Any] = {"source": os.path.abspath(source), "format": format, **report_runner, **notes,
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
        split_spec = {"chunks": chunks, "split_args": (seed, test_fraction, validation_fraction),
                      "names": [s for s in ("train", "validation", "test") if counts[s]]}
        report["removed_incomplete_writes"] = _remove_incomplete_writes(data_dir, name)
        report["num_records"] = {k: counts[k] for k in split_spec["names"]}
        report["dataset_dir"] = _write_dataset(
            data_dir, name, version, split_spec=split_spec, class_names=class_names, overwrite=overwrite,
            description=f"Converted by contrastive-jax from {os.path.abspath(source)} ({format}).",
            beam_options=beam_options)
        meta = {
            "vocabulary": _vocabulary([c for key, caps in good if assignment[key] == "train" for c in caps],
                                      vocab_min_count, vocab_max_size),
            "class_names": class_names,
            "templates": [class_template] if class_names is not None else None,
            "report": report,
        }
        _write_json_atomic(os.path.join(report["dataset_dir"], METADATA_FILE), meta)
        shutil.rmtree(staging, ignore_errors=True)
    from contrastive_jax.data import registry
    registry._tfds_entry.cache_clear()  # a dataset of this name may have been opened before
    return report


def _write_json_atomic(path: str, payload: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


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
