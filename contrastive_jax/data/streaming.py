"""Streaming sources: WebDataset, Parquet, TFRecord and ArrayRecord shards read in place, local or remote.

``config.data.name = 'sources'`` with ``config.data.sources = [{path, format, weight}, ...]``
trains on img2dataset-style shards with no conversion step. Shards are opened through
:mod:`contrastive_jax.storage` (local files through :mod:`os`, ``s3://`` / ``gs://`` through fsspec)
and read sequentially, one record at a time, so a shard is never held in memory whole.

The stream (see docs/data.md)::

    source s, lane l: shards of s in epoch e = permutation(seed, s, e)[l::L]   (or drawn with
                      replacement per slot when config.data.resample), records in file order
                  --> windows of config.data.shuffle_buffer records, each shuffled from
                      (seed, s, l, window index)
    lane l:       position k takes its record from the source whose deficit (k+1)*w_s - n_s is
                  largest (deterministic weighted round robin: ratios exact to one record)
    step:         each of the L lanes gives G / L consecutive rows of the global batch; host p
                  reads only lanes [p*L/P, (p+1)*L/P) -- its rows of the global batch.

Everything is a pure function of the seed and of L (``config.data.stream_lanes``), not of the
number of hosts P (any P dividing L gives the same global batches). The iterator state -- per lane
the mixture counters and per source the window's start (epoch, shard slot, record offset), the
window index and the records taken from it -- is a small JSON dict saved in every checkpoint;
restoring re-reads at most one window per (lane, source) and continues exactly.
:func:`stream_dataset` offers the same batches as a ``grain.IterDataset`` (grain transforms and
checkpointing on top).
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import glob as globlib
import hashlib
import json
import logging
import math
import posixpath
import re
import queue
import tarfile
import threading
import time
import weakref
from typing import Any, Iterator, Sequence

import numpy as np

from contrastive_jax import storage

log = logging.getLogger("contrastive_jax.data")

STREAM_NAME = "sources"  # config.data.name that selects config.data.sources
FORMATS = ("webdataset", "parquet", "tfrecord", "array_record")
_SOURCE_KEYS = ("path", "format", "weight", "name", "image_key", "text_key", "filters")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Defaults of each format's fields: webdataset = file extensions inside a sample, parquet =
# columns (img2dataset's parquet output stores the image bytes as 'jpg' next to 'caption').
_FIELD_DEFAULTS = {"webdataset": ("", "txt"), "parquet": ("jpg", "caption"), "tfrecord": ("", ""),
                   "array_record": ("", "")}
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
# Waits before the 2nd, 3rd, ... try of a shard that failed to open or read; tests shorten them.
RETRY_DELAYS_S = (0.5, 2.0)
# Records read to build a word vocabulary (tokenizer kind 'auto'); real corpora use a subword one.
_VOCAB_RECORDS = 20000


# ----------------------------------------------------------------------------------------------
# Source specs: paths, formats, weights
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of ``config.data.sources``, resolved: its shards (sorted), format and weight."""

    name: str
    format: str
    weight: float
    shards: tuple[str, ...]
    image_key: str
    text_key: str
    filters: tuple[tuple[str, str, float], ...] = ()


# ----------------------------------------------------------------------------------------------
# Metadata filters: '<field> <op> <number>', checked before an image is decoded
# ----------------------------------------------------------------------------------------------

_FILTER = re.compile(r"^\s*(caption_chars|caption_words|image_bytes|aspect|json\.[A-Za-z0-9_.]+)\s*"
                     r"(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__, "==": float.__eq__,
        "!=": float.__ne__}


def parse_filters(filters: Any, where: str) -> tuple[tuple[str, str, float], ...]:
    """``['json.similarity >= 0.28', 'caption_chars >= 5']`` -> ``(field, op, value)`` tuples.
    Fields: ``json.<key>`` (a number in the sample's metadata, img2dataset's ``.json`` -- parquet
    sources have none), ``caption_chars``, ``caption_words``, ``image_bytes``, ``aspect``
    (``json.width / json.height``). Raises ValueError naming ``where``."""
    if isinstance(filters, str):
        filters = [filters]
    out = []
    for f in filters or ():
        m = _FILTER.match(str(f))
        if m is None:
            raise ValueError(f"{where}.filters: {f!r} is not '<field> <op> <number>' with field one of json.<key>, "
                             "caption_chars, caption_words, image_bytes, aspect and op one of >=, <=, >, <, ==, !=")
        out.append((m.group(1), m.group(2), float(m.group(3))))
    return tuple(out)


def caption_text(record: dict) -> str:
    """The record's (first) caption as text: str, bytes, or a list / array of those."""
    value = record.get("caption", "")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, (str, bytes, np.bytes_)):
        value = next(iter(value), "")
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _filter_value(record: dict, field: str) -> float | None:
    meta = record.get("json") or {}
    try:
        if field == "caption_chars":
            return float(len(caption_text(record).strip()))
        if field == "caption_words":
            return float(len(caption_text(record).split()))
        if field == "image_bytes":
            return float(len(record.get("image") or b""))
        if field == "aspect":
            return float(meta["width"]) / float(meta["height"])
        value = meta
        for part in field.split(".")[1:]:
            value = value[part]
        return float(value)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def passes_filters(record: dict, filters: Sequence[tuple[str, str, float]]) -> bool:
    """Whether ``record`` meets every filter; a record without the field does not."""
    for field, op, value in filters:
        got = _filter_value(record, field)
        if got is None or not _OPS[op](got, value):
            return False
    return True


def expand_braces(pattern: str) -> list[str]:
    """``'a-{000..002}.tar'`` -> ``['a-000.tar', 'a-001.tar', 'a-002.tar']`` (zero-padded to the
    first number's width; several ranges expand as a product, left to right)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = int(m.group(1)), int(m.group(2))
    if hi < lo:
        raise ValueError(f"brace range {m.group(0)!r} in {pattern!r} is empty (end < start)")
    width = len(m.group(1))
    out = []
    for i in range(lo, hi + 1):
        out.extend(expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


def _glob(pattern: str) -> list[str]:
    if not storage.is_remote(pattern):
        return sorted(globlib.glob(storage.abspath(pattern)))
    fs, p = storage.filesystem(pattern)
    scheme = pattern.split("://", 1)[0]
    return sorted(f"{scheme}://{q}" for q in fs.glob(p))


def list_shards(path: Any, where: str) -> list[str]:
    """The shard paths of ``path``: a glob, a brace range, a single path or a list of those.

    Local paths named without a wildcard must exist; remote ones are checked when read (a brace
    range over 41k objects is not listed up front). Raises ValueError naming ``where``.
    """
    patterns = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    shards: list[str] = []
    for pattern in patterns:
        for one in expand_braces(pattern):
            if any(c in one for c in "*?["):
                found = _glob(one)
                if not found:
                    raise ValueError(f"{where}.path: {one!r} matches no files")
                shards.extend(found)
            elif storage.is_remote(one):
                shards.append(one)
            else:
                local = storage.abspath(one)
                if not storage.isfile(local):
                    raise ValueError(f"{where}.path: no such file {one!r}")
                shards.append(local)
    if not shards:
        raise ValueError(f"{where}.path is empty; give a glob, a brace range or a list of shard paths")
    return sorted(dict.fromkeys(shards))


def _infer_format(shards: Sequence[str], where: str) -> str:
    exts = {posixpath.splitext(s)[1].lower() for s in shards}
    if exts <= {".tar"}:
        return "webdataset"
    if exts <= {".parquet"}:
        return "parquet"
    if all(".array_record" in posixpath.basename(s) for s in shards):
        return "array_record"
    if all(".tfrecord" in posixpath.basename(s) for s in shards):  # NAME-train.tfrecord-00000-of-00004, 00000.tfrecord
        return "tfrecord"
    raise ValueError(f"{where}.format is not set and the shards' extensions {sorted(exts)} do not tell it; "
                     f"set it to one of {', '.join(FORMATS)}")


def parse_sources(sources: Any, field: str = "config.data.sources") -> list[SourceSpec]:
    """Validates ``config.data.sources`` (or ``eval_sources``) and lists every source's shards.

    Each entry: ``path`` (required), ``format`` (``webdataset`` | ``parquet`` | ``tfrecord`` |
    ``array_record``; default from the file names), ``weight`` (> 0, default 1), ``name`` (default
    ``source<i>``; metrics use it), ``image_key`` / ``text_key`` (webdataset: extensions, default any
    of jpg/jpeg/png/webp and ``txt`` falling back to the ``caption`` of ``.json``; parquet: columns,
    default ``jpg`` and ``caption``; array_record and TFDS-written tfrecord: TFDS features, default
    ``image`` and ``caption`` / ``captions``; other tfrecord (img2dataset's): ``tf.train.Example``
    features, default the first of jpg/jpeg/png/webp/image and ``txt`` / ``caption``),
    ``filters`` (see :func:`parse_filters`). Raises ValueError naming
    the entry and field.
    """
    specs: list[SourceSpec] = []
    for i, entry in enumerate(sources or ()):
        where = f"{field}[{i}]"
        if not hasattr(entry, "keys"):
            raise ValueError(f"{where} must be a dict with keys {', '.join(_SOURCE_KEYS)}, got {entry!r}")
        unknown = sorted(set(entry.keys()) - set(_SOURCE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(_SOURCE_KEYS)}")
        if not entry.get("path"):
            raise ValueError(f"{where}.path is required (a glob, a brace range or a list of shard paths)")
        shards = list_shards(entry["path"], where)
        fmt = str(entry.get("format") or _infer_format(shards, where))
        if fmt not in FORMATS:
            raise ValueError(f"{where}.format={fmt!r}; valid: {', '.join(FORMATS)}")
        if fmt == "tfrecord":
            try:
                crc32c_module()
            except ImportError as e:
                raise ValueError(f"{where}.format='tfrecord': {e}") from None
        weight = float(entry.get("weight", 1.0))
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"{where}.weight={entry.get('weight')!r} must be a positive number")
        name = str(entry.get("name") or f"source{i}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in {s.name for s in specs}:
            raise ValueError(f"{where}.name={name!r} must be unique and use only letters, digits, '_', '.', '-'")
        image_default, text_default = _FIELD_DEFAULTS[fmt]
        specs.append(SourceSpec(name, fmt, weight, tuple(shards), str(entry.get("image_key") or image_default),
                                str(entry.get("text_key") or text_default),
                                parse_filters(entry.get("filters"), where)))
    return specs


# ----------------------------------------------------------------------------------------------
# Shard readers: path -> records {image: bytes, caption: str, key: str, json: dict, _bytes: int}
# ----------------------------------------------------------------------------------------------


def _wds_record(key: str, parts: dict[str, bytes], spec: SourceSpec) -> dict:
    record: dict[str, Any] = {"key": key, "_bytes": sum(len(v) for v in parts.values())}
    exts = (spec.image_key,) if spec.image_key else _IMAGE_EXTS
    image = next((parts[e] for e in exts if e in parts), None)
    if image is not None:
        record["image"] = image  # absent: the pipeline counts the record as 'bad_record'
    meta = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta = {}
    record["json"] = meta if isinstance(meta, dict) else {}
    if spec.text_key in parts:
        record["caption"] = parts[spec.text_key].decode("utf-8", "replace")
    else:
        record["caption"] = str(record["json"].get("caption") or "")
    return record


def read_webdataset(path: str, spec: SourceSpec, start: int = 0) -> Iterator[dict]:
    """The samples of one WebDataset tar in file order, from sample ``start`` on: consecutive
    members sharing a key (``dir/KEY.ext``: the name up to the first dot of the basename) form
    one sample. A tar is a stream: the samples before ``start`` are read, not built."""
    with storage.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        key, parts, n = None, {}, 0
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            this = posixpath.join(folder, stem)
            data = tar.extractfile(member).read()
            if len(data) != member.size:  # stream mode returns a cut member short instead of raising
                raise tarfile.ReadError(f"{path}: member {member.name} is truncated ({len(data)} of "
                                        f"{member.size} bytes)")
            if this != key and parts:
                if n >= start:
                    yield _wds_record(key, parts, spec)
                n, parts = n + 1, {}
            key = this
            parts[ext.lower()] = data
        # tarfile ends a stream quietly at a cut header; a complete tar ends with a zero block,
        # which tarfile has then read in full past the last member.
        if tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"{path}: ends without the end-of-archive marker (truncated)")
        if parts and n >= start:
            yield _wds_record(key, parts, spec)


def read_parquet(path: str, spec: SourceSpec, start: int = 0) -> Iterator[dict]:
    """The rows of one Parquet file in order from row ``start``, read in batches (pyarrow); row
    groups wholly before ``start`` are not read."""
    import pyarrow.parquet as pq

    with storage.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        missing = [c for c in (spec.image_key, spec.text_key) if c not in names]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} (columns: {', '.join(names)}); set image_key / "
                             f"text_key of source {spec.name!r} in config.data.sources")
        columns = [spec.image_key, spec.text_key] + (["key"] if "key" in names else [])
        first, row = 0, 0  # the first row group still needed, and its first row's number
        while first < pf.metadata.num_row_groups and row + pf.metadata.row_group(first).num_rows <= start:
            row += pf.metadata.row_group(first).num_rows
            first += 1
        groups = list(range(first, pf.metadata.num_row_groups))
        for batch in pf.iter_batches(batch_size=256, columns=columns, row_groups=groups) if groups else ():
            d = batch.to_pydict()
            for j in range(batch.num_rows):
                row += 1
                if row <= start:
                    continue
                image = d[spec.image_key][j]
                record = {"key": str(d["key"][j]) if "key" in d else f"{posixpath.basename(path)}:{row - 1}",
                          "caption": d[spec.text_key][j] or "", "json": {},
                          "_bytes": len(image or b"")}
                if image:
                    record["image"] = image
                yield record


_FEATURES: dict[str, Any] = {}
_FEATURES_LOCK = threading.Lock()
# The metadata files of a TFDS dataset folder that describe its features (copied for remote folders).
_TFDS_METADATA = re.compile(r"^(features\.json|dataset_info\.json|.*\.labels\.txt)$")


def _tfds_features(folder: str):
    """The ``FeaturesDict`` of the TFDS dataset folder holding array_record shards (its
    ``features.json``), read once per folder; remote folders' metadata is copied to a temp dir."""
    with _FEATURES_LOCK:
        if folder not in _FEATURES:
            import tempfile

            import tensorflow_datasets as tfds

            if not storage.isfile(storage.join(folder, "features.json")):
                raise ValueError(f"{folder}: no features.json beside the array_record shards (format 'array_record' "
                                 "reads TFDS-written shards, e.g. from `contrastive-jax data convert`)")
            if storage.is_remote(folder):
                local = tempfile.mkdtemp(prefix="contrastive_jax_features_")
                for name in storage.listdir(folder):
                    if _TFDS_METADATA.match(name):
                        with storage.open(storage.join(folder, name), "rb") as src, \
                                open(f"{local}/{name}", "wb") as dst:
                            dst.write(src.read())
            else:
                local = folder
            _FEATURES[folder] = tfds.features.FeaturesDict.from_config(local)
        return _FEATURES[folder]


def read_array_record(path: str, spec: SourceSpec, start: int = 0) -> Iterator[dict]:
    """The records of one TFDS array_record shard from record ``start`` (random access), parsed
    with the dataset's features without TensorFlow; encoded images stay bytes. Remote shards are
    downloaded to a temporary file first (ArrayRecord reads local files)."""
    from array_record.python.array_record_module import ArrayRecordReader

    parse = _tfds_record_parser(_shard_folder(path), path, spec)
    with storage.reading_locally(path) as local:
        reader = ArrayRecordReader(local)
        try:
            total = reader.num_records()
            for lo in range(start, total, 64):
                for i, raw in enumerate(reader.read(list(range(lo, min(lo + 64, total))))):
                    yield parse(raw, lo + i)
        finally:
            reader.close()


class TFRecordError(ValueError):
    """A TFRecord shard whose framing is broken: a length or payload CRC mismatch, or a file cut
    mid-record. Like any read error, the shard is retried, then the rest of it skipped and counted."""


def crc32c_module():
    try:
        import crc32c
    except ImportError:
        raise ImportError("format 'tfrecord' checks every record's CRC-32C with the crc32c package: "
                          "pip install 'contrastive_jax[tfrecord]' (or: pip install crc32c)") from None
    return crc32c


def _masked_crc(crc32c, data) -> int:
    """TFRecord's masked CRC-32C of ``data`` (rotated right by 15 bits plus a constant, so that a
    CRC stored inside CRC'd data does not cancel out)."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_payloads(fh, path: str, start: int = 0) -> Iterator[bytes]:
    """The records of an open TFRecord file ``fh`` (binary, positioned at its start) from record
    ``start`` on, as bytes. Framing per record: ``uint64 length``, ``uint32 masked_crc(length)``,
    ``length`` bytes, ``uint32 masked_crc(payload)`` (all little-endian); both CRCs are checked
    (the records before ``start`` are seeked over: only their length CRC is checked).
    Raises :class:`TFRecordError` naming ``path`` and the record index on any framing error."""
    for _, payload in _tfrecord_frames(fh, path, start):
        yield payload


def count_tfrecord(fh, path: str) -> int:
    """Records in an open TFRecord file, seeking over the payloads (length CRCs checked)."""
    return sum(1 for _ in _tfrecord_frames(fh, path, -1))


def _tfrecord_frames(fh, path: str, start: int) -> Iterator[tuple[int, bytes | None]]:
    """``(index, payload)`` from record ``start`` on; ``start < 0``: every record seeked over,
    ``(index, None)``."""
    import struct

    crc32c = crc32c_module()
    index = 0
    while True:
        head = fh.read(12)
        if not head:
            return
        if len(head) < 12:
            raise TFRecordError(f"{path}: record {index}: file ends inside the record header (truncated)")
        length, length_crc = struct.unpack("<QI", head)
        if _masked_crc(crc32c, head[:8]) != length_crc:
            raise TFRecordError(f"{path}: record {index}: length CRC mismatch (corrupt or not a TFRecord file)")
        if start < 0 or index < start:
            here = fh.tell()
            if not _has_bytes_at(fh, here + length + 4):
                raise TFRecordError(f"{path}: record {index}: file ends inside the record (truncated)")
            if start < 0:
                yield index, None
        else:
            body = fh.read(length + 4)
            if len(body) < length + 4:
                raise TFRecordError(f"{path}: record {index}: file ends inside the record ({len(body)} of "
                                    f"{length + 4} bytes, truncated)")
            payload = body[:length]
            if _masked_crc(crc32c, payload) != struct.unpack("<I", body[length:])[0]:
                raise TFRecordError(f"{path}: record {index}: payload CRC mismatch (corrupt)")
            yield index, payload
        index += 1


def _has_bytes_at(fh, end: int) -> bool:
    """Whether the file is at least ``end`` bytes long (a seek past the end succeeds silently)."""
    fh.seek(end - 1)
    ok = len(fh.read(1)) == 1
    fh.seek(end)
    return ok


_EXAMPLE_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image")
_EXAMPLE_TEXT_KEYS = ("txt", "caption")


def _example_features(raw: bytes) -> dict[str, Any]:
    """A serialized ``tf.train.Example`` -> ``{name: bytes | int | float | list}`` (a one-element
    list becomes its element), through TFDS's copy of the proto (no TensorFlow)."""
    from tensorflow_datasets.proto import tf_example_pb2

    out = {}
    for name, feature in tf_example_pb2.Example.FromString(raw).features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        out[name] = values[0] if len(values) == 1 else values
    return out


def _example_record(raw: bytes, path: str, index: int, spec: SourceSpec) -> dict:
    """img2dataset's tfrecord layout: ``key``, the image bytes (``jpg`` ...), the caption (``txt``)
    and its metadata (``width``, ``similarity``, ``url`` ...) as features of a ``tf.train.Example``;
    the other features become the record's ``json`` (for filters)."""
    features = _example_features(raw)
    image_key = spec.image_key or next((k for k in _EXAMPLE_IMAGE_KEYS if k in features), "")
    text_key = spec.text_key or next((k for k in _EXAMPLE_TEXT_KEYS if k in features), "txt")
    caption = features.get(text_key, b"")
    key = features.get("key", f"{posixpath.basename(path)}:{index}")
    record: dict[str, Any] = {
        "key": key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key),
        "caption": caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption,
        "json": {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v for k, v in features.items()
                 if k not in (image_key, text_key, "key")},
        "_bytes": len(raw)}
    image = features.get(image_key)
    if isinstance(image, bytes) and image:
        record["image"] = image  # absent: counted as a bad record by the pipeline
    return record


def _tfds_record_parser(folder: str, path: str, spec: SourceSpec):
    """``(raw, index) -> record`` for a TFDS dataset folder's shards (its ``features.json``):
    examples parsed with the dataset's features without TensorFlow; encoded images stay bytes."""
    import tensorflow_datasets as tfds

    features = _tfds_features(folder)
    names = list(features.keys())
    image_key = spec.image_key or "image"
    text_key = spec.text_key or next((k for k in ("caption", "captions") if k in names), "")
    if image_key not in names or text_key not in names:
        raise ValueError(f"{path}: features {names} lack image_key={image_key!r} or text_key={text_key!r}; set them "
                         f"for source {spec.name!r} in config.data.sources")
    decoders = {k: tfds.decode.SkipDecoding() for k in names if isinstance(features[k], tfds.features.Image)}

    def parse(raw: bytes, index: int) -> dict:
        ex = features.deserialize_example_np(raw, decoders=decoders)
        key = ex.get("key", f"{posixpath.basename(path)}:{index}")  # a Text feature comes back as bytes
        return {"image": ex[image_key], "caption": ex[text_key], "json": {}, "_bytes": len(raw),
                "key": key.decode("utf-8", "replace") if isinstance(key, (bytes, np.bytes_)) else str(key)}

    return parse


def _shard_folder(path: str) -> str:
    return path.rsplit("/", 1)[0] if storage.is_remote(path) else posixpath.dirname(path)


def read_tfrecord(path: str, spec: SourceSpec, start: int = 0) -> Iterator[dict]:
    """The records of one TFRecord shard in file order from record ``start``, read as a stream
    (remote shards are not downloaded whole), every record's CRCs checked
    (:func:`tfrecord_payloads`). Written by TFDS (a ``features.json`` beside the shard): parsed
    with the dataset's features; otherwise ``tf.train.Example`` as img2dataset writes it
    (:func:`_example_record`). No TensorFlow either way."""
    folder = _shard_folder(path)
    tfds_written = storage.isfile(storage.join(folder, "features.json"))
    parse = _tfds_record_parser(folder, path, spec) if tfds_written else \
        (lambda raw, i: _example_record(raw, path, i, spec))
    with storage.open(path, "rb") as fh:
        for i, raw in enumerate(tfrecord_payloads(fh, path, start), start):
            yield parse(raw, i)


_READERS = {"webdataset": read_webdataset, "parquet": read_parquet, "tfrecord": read_tfrecord,
            "array_record": read_array_record}


def count_records(spec: SourceSpec) -> int:
    """Records in all of a source's shards (parquet, array_record: from their indexes; tars and
    tfrecord: reads their framing)."""
    total = 0
    for path in spec.shards:
        if spec.format == "parquet":
            import pyarrow.parquet as pq

            with storage.open(path, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        elif spec.format == "array_record":
            from array_record.python.array_record_module import ArrayRecordReader

            with storage.reading_locally(path) as local:
                reader = ArrayRecordReader(local)
                total += reader.num_records()
                reader.close()
        elif spec.format == "tfrecord":
            with storage.open(path, "rb") as fh:
                total += count_tfrecord(fh, path)
        else:
            total += sum(1 for _ in read_webdataset(path, spec))
    return total


class ShardReadStats:
    """Per-source counters shared by the readers of one host: unreadable shards by path."""

    def __init__(self):
        self.bad_shards: dict[str, int] = {}
        self.last_error = ""


def read_shard(path: str, spec: SourceSpec, skip: int, stats: ShardReadStats | None = None) -> Iterator[dict]:
    """The records of one shard after the first ``skip``; a failure to open or read is retried
    (:data:`RETRY_DELAYS_S`, resuming after the records already given), then the rest of the
    shard is skipped, logged with its path and counted in ``stats``."""
    given = skip
    for attempt in range(len(RETRY_DELAYS_S) + 1):
        try:
            for record in _READERS[spec.format](path, spec, given):
                given += 1
                yield record
            return
        except ImportError:  # a missing package is not a bad shard: every shard would fail the same way
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one shard (OSError, tarfile, pyarrow, botocore)
            # A failure that repeats (a missing column, no credentials) ends up skipped and logged
            # too; a source whose every shard fails stops the stream (LaneSource) with this error.
            error = e
            if attempt < len(RETRY_DELAYS_S):
                time.sleep(RETRY_DELAYS_S[attempt])
    log.warning("source %s: skipping the rest of shard %s after %d tries (%s: %s)", spec.name, path,
                len(RETRY_DELAYS_S) + 1, type(error).__name__, error)
    if stats is not None:
        stats.bad_shards[path] = stats.bad_shards.get(path, 0) + 1
        stats.last_error = f"{path}: {type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------
# One source within one lane: shard order, shuffle window, resumable position
# ----------------------------------------------------------------------------------------------


class LaneSource:
    """The records of source ``sid`` that lane ``lane`` of ``lanes`` reads, in a deterministic,
    shuffled, endless order. ``next()`` -> a record dict; ``get_state()`` / ``set_state()``.

    Without resampling, epoch ``e`` of the lane is shards ``permutation(seed, sid, e)[lane::lanes]``
    read in that order; with it, slot ``j`` of the lane is a shard drawn uniformly with replacement
    from ``(seed, sid, lane, j)`` (open_clip's ``--dataset-resampled``). Records are shuffled within
    consecutive windows of ``window`` records.
    """

    def __init__(self, spec: SourceSpec, sid: int, lane: int, lanes: int, *, seed: int, window: int,
                 resample: bool, stats: ShardReadStats):
        if not resample and len(spec.shards) < lanes:
            raise ValueError(f"config.data.sources: source {spec.name!r} has {len(spec.shards)} shard(s), fewer "
                             f"than the {lanes} stream lanes (config.data.stream_lanes, default: one per host); "
                             "use more shards, fewer lanes, or config.data.resample=True")
        self.spec, self.sid, self.lane, self.lanes = spec, sid, lane, lanes
        self.seed, self.window, self.resample, self.stats = int(seed), max(1, int(window)), bool(resample), stats
        # Start of the current window (epoch, shard slot, records of that shard before it), the
        # window's index, and how many of its records were handed out.
        self._state = {"epoch": 0, "slot": 0, "offset": 0, "window": 0, "taken": 0}
        self._records: list | None = None

    def _shard(self, epoch: int, slot: int) -> str | None:
        n = len(self.spec.shards)
        if self.resample:
            return self.spec.shards[int(np.random.default_rng([self.seed, self.sid, self.lane, slot, 1]).integers(n))]
        order = np.random.default_rng([self.seed, self.sid, epoch, 0]).permutation(n)[self.lane::self.lanes]
        return self.spec.shards[int(order[slot])] if slot < len(order) else None

    def _cursor(self, epoch: int, slot: int, offset: int) -> Iterator[tuple[dict, tuple[int, int, int]]]:
        empty_run, filtered = 0, 0
        while True:
            path = self._shard(epoch, slot)
            if path is None:
                epoch, slot, offset = epoch + 1, 0, 0
                continue
            got = kept = 0
            for record in read_shard(path, self.spec, offset, self.stats):
                got += 1
                if self.spec.filters and not passes_filters(record, self.spec.filters):
                    filtered += 1
                    continue
                # Counted when the record is used, so the counters follow the consumed stream.
                record["_filtered_before"], filtered = filtered, 0
                kept += 1
                yield record, (epoch, slot, offset + got)
            # A lane whose shards all give nothing would loop forever; say so instead.
            empty_run = 0 if kept else empty_run + 1
            if empty_run > 2 * max(1, len(self.spec.shards)):
                raise RuntimeError(f"config.data.sources: source {self.spec.name!r}: {empty_run} shards in a row "
                                   f"gave no records (last: {path}); are its shards empty or unreadable, or do its "
                                   f"filters drop everything? Last read error: {self.stats.last_error or 'none'}")
            epoch, slot, offset = epoch, slot + 1, 0

    def _load_window(self) -> None:
        st = self._state
        records = []
        cursor = (st["epoch"], st["slot"], st["offset"])
        for _ in range(self.window):
            record, cursor = next(self._gen)
            records.append(record)
        self._end = cursor
        order = np.random.default_rng([self.seed, self.sid, self.lane, st["window"], 2]).permutation(len(records))
        self._records = [records[i] for i in order]

    def next(self) -> dict:
        st = self._state
        if self._records is None:  # fresh, or just restored: re-read the window from its start
            self._gen = self._cursor(st["epoch"], st["slot"], st["offset"])
            self._load_window()
        if st["taken"] == len(self._records):
            st["epoch"], st["slot"], st["offset"] = self._end
            st["window"], st["taken"] = st["window"] + 1, 0
            self._load_window()
        record = self._records[st["taken"]]
        st["taken"] += 1
        return record

    def get_state(self) -> dict:
        return dict(self._state)

    def set_state(self, state: dict) -> None:
        self._state = {k: int(state[k]) for k in ("epoch", "slot", "offset", "window", "taken")}
        self._records = None


def mixture_choice(counts: Sequence[int], weights: Sequence[float]) -> int:
    """The source of the next position: the one furthest behind its share,
    ``argmax_s (k+1) * w_s - n_s`` with ``k = sum(n)`` (ties: the first). Over any prefix of
    length k, source s has ``k * w_s`` positions to within one."""
    k = sum(counts)
    deficits = [(k + 1) * w - n for w, n in zip(weights, counts)]
    return int(max(range(len(deficits)), key=lambda s: (deficits[s], -s)))


# ----------------------------------------------------------------------------------------------
# The training iterator
# ----------------------------------------------------------------------------------------------


class StreamIterator:
    """The host's training batches from ``config.data.sources``; same interface as
    :class:`contrastive_jax.data.pipeline.TrainIterator` (``next``, ``get_state``, ``set_state``,
    ``stats``), so checkpoints save and restore it unchanged.

    Each batch: ``image`` [b, S, S, 3] (float32 normalized, or uint8 with
    ``normalize_on_device``), ``image_views`` [b, V, S, S, 3] when V >= 2, ``text`` int32
    [b, max_len]. A bad record (undecodable image, empty caption, no image) is replaced by the next
    record of the same lane and source and counted; ``max_bad_fraction`` applies as in the
    TFDS pipeline. Every position and counter is kept per lane, so a state holds whole lanes and
    any host layout with the same lanes can continue from it.
    """

    def __init__(self, specs: Sequence[SourceSpec], processor, *, lanes: int, host_lanes: Sequence[int],
                 rows_per_lane: int, seed: int, window: int, resample: bool, max_bad_fraction: float,
                 normalize: tuple | None, threads: int, prefetch: int = 0, gather: bool = False):
        self._stop = threading.Event()
        total = sum(s.weight for s in specs)
        self._specs, self._weights = list(specs), [s.weight / total for s in specs]
        self._processor, self._lanes, self._host_lanes = processor, int(lanes), list(host_lanes)
        self._rows, self._max_bad, self._normalize = int(rows_per_lane), float(max_bad_fraction), normalize
        self._shard_stats = [ShardReadStats() for _ in specs]
        self._readers = {lane: [LaneSource(spec, sid, lane, lanes, seed=seed, window=window, resample=resample,
                                           stats=self._shard_stats[sid]) for sid, spec in enumerate(specs)]
                         for lane in self._host_lanes}
        self._counts = {lane: [0] * len(specs) for lane in self._host_lanes}
        self._counters = {lane: self._zero_counters() for lane in self._host_lanes}
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) if threads > 1 else None
        self._gather = bool(gather)
        # What the saved positions mean: they index these shard lists under this seed and layout.
        layout = [[s.name, s.format, list(s.shards)] for s in specs] + [int(lanes), int(window), bool(resample),
                                                                       int(seed)]
        self._layout = hashlib.sha256(json.dumps(layout).encode("utf-8")).hexdigest()[:16]
        # Prefetching: one background thread produces batches in order (so the stream is the same)
        # with a snapshot of the state and counters after each; the consumer only sees snapshots.
        self._prefetch, self._queue, self._error = int(prefetch), None, None
        self._consumed: tuple[dict, dict] | None = None

    def _zero_counters(self) -> dict:
        from contrastive_jax.data.pipeline import SKIP_REASONS

        return {"records_read": 0, "skipped": {r: 0 for r in SKIP_REASONS},
                "per_source": {s.name: {"examples": 0, "bad": 0, "bytes": 0, "filtered": 0} for s in self._specs}}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._prefetch <= 0:
            return self._produce()
        if self._queue is None:
            self._initial = (self._state_now(), self._stats_now())
            self._queue = queue.Queue(maxsize=self._prefetch)
            threading.Thread(target=_prefetch_loop, args=(weakref.ref(self), self._queue, self._stop),
                             name="contrastive_jax-stream", daemon=True).start()
        if self._error is not None:  # the producer has stopped; it failed at the batch asked for before
            raise self._error
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        batch, state, stats = item
        self._consumed = (state, stats)
        return batch

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def _process(self, record: dict, index: int):
        from contrastive_jax.data.pipeline import BadRecordError

        try:
            return self._processor(record, index)
        except BadRecordError as e:
            return e

    def _replace_bad(self, lane: int, sid: int, index: int, record: dict, result) -> dict:
        """Counts the bad ``record`` and reads the same (lane, source)'s next records until one is good."""
        from contrastive_jax.data.pipeline import _LOG_FIRST_BAD, _MAX_CONSECUTIVE_BAD, BadRecordError, DataQualityError

        counters = self._counters[lane]
        mine = counters["per_source"][self._specs[sid].name]
        for _ in range(_MAX_CONSECUTIVE_BAD):
            if not isinstance(result, BadRecordError):
                return result
            if sum(sum(c["skipped"].values()) for c in self._counters.values()) < _LOG_FIRST_BAD:
                log.warning("source %s: skipped record %s (%s)", self._specs[sid].name, record.get("key", "?"),
                            result.reason)
            counters["skipped"][result.reason] += 1
            counters["records_read"] += 1
            mine["bad"] += 1
            record = self._readers[lane][sid].next()
            mine["bytes"] += int(record.get("_bytes", 0))
            mine["filtered"] += int(record.get("_filtered_before", 0))
            result = self._process(record, index)
        raise DataQualityError(f"source {self._specs[sid].name!r}: {_MAX_CONSECUTIVE_BAD} consecutive bad records "
                               f"in lane {lane} (last: {record.get('key', '?')}: {result})")

    def _produce(self) -> dict:
        """The next host batch, read and decoded in this thread (advances the readers)."""
        from contrastive_jax.data.pipeline import DataQualityError, _MIN_RECORDS_FOR_FRACTION

        rows = []  # (lane, source, example index, record); reading is sequential per (lane, source)
        for lane in self._host_lanes:
            counts, readers = self._counts[lane], self._readers[lane]
            for _ in range(self._rows):
                k = sum(counts)
                sid = mixture_choice(counts, self._weights)
                counts[sid] += 1
                rows.append((lane, sid, k * self._lanes + lane, readers[sid].next()))
        # Decoding and augmentation are pure per row (seeded by the example index): threads only
        # change the speed, never the result.
        work = lambda row: self._process(row[3], row[2])  # noqa: E731
        results = list(self._pool.map(work, rows) if self._pool else map(work, rows))
        examples = []
        for (lane, sid, index, record), result in zip(rows, results):
            mine = self._counters[lane]["per_source"][self._specs[sid].name]
            mine["bytes"] += int(record.get("_bytes", 0))
            mine["filtered"] += int(record.get("_filtered_before", 0))
            examples.append(self._replace_bad(lane, sid, index, record, result))
            mine["examples"] += 1
            self._counters[lane]["records_read"] += 1
        stats = self._stats_now()
        seen, bad = stats["data/records_read"], stats["data/skipped"]
        if seen >= _MIN_RECORDS_FOR_FRACTION and bad > self._max_bad * seen:
            reasons = {k[len("data/skipped/"):]: int(v) for k, v in stats.items()
                       if k.startswith("data/skipped/") and v}
            raise DataQualityError(f"config.data.sources: {bad:.0f} of {seen:.0f} records read were bad "
                                   f"({bad / seen:.1%} > config.data.max_bad_fraction={self._max_bad}); by reason: "
                                   f"{reasons}")
        batch = {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}
        if self._normalize is not None:
            from contrastive_jax.data.transforms import normalize_images

            for key in ("image", "image_views"):
                if key in batch:
                    batch[key] = normalize_images(batch[key], *self._normalize)
        return batch

    def stats(self) -> dict[str, float]:
        """This host's cumulative counters (up to the last batch returned): ``data/records_read``,
        ``data/skipped``, ``data/skipped_fraction``, ``data/skipped/<reason>`` (as the TFDS
        pipeline) and per source ``data/<source>/examples``, ``/bad``, ``/bytes`` (records'
        payload bytes), ``/filtered`` (records dropped by the source's filters) and ``/bad_shards``
        (shards skipped after retries, since this process began)."""
        if self._queue is not None:
            return dict(self._consumed[1]) if self._consumed else dict(self._initial[1])
        return self._stats_now()

    def _stats_now(self) -> dict[str, float]:
        lanes = [self._counters[lane] for lane in self._host_lanes]
        seen = sum(c["records_read"] for c in lanes)
        skipped = {r: sum(c["skipped"][r] for c in lanes) for r in lanes[0]["skipped"]}
        bad = sum(skipped.values())
        out = {"data/records_read": float(seen), "data/skipped": float(bad),
               "data/skipped_fraction": bad / seen if seen else 0.0}
        out.update({f"data/skipped/{k}": float(v) for k, v in skipped.items()})
        for spec, shard_stats in zip(self._specs, self._shard_stats):
            for key in ("examples", "bad", "bytes", "filtered"):
                out[f"data/{spec.name}/{key}"] = float(sum(c["per_source"][spec.name][key] for c in lanes))
            out[f"data/{spec.name}/bad_shards"] = float(len(shard_stats.bad_shards))
        return out

    def get_state(self) -> dict:
        """JSON-serializable, after the last batch returned: per lane the mixture counters, each
        source's reader position and the counters of :meth:`stats`. With several processes this is a
        collective (every host calls it at the same step, as the loop does at checkpoints): the
        result holds every host's lanes, so the state that process 0 saves restores every host."""
        if self._queue is not None:
            state = copy.deepcopy(self._consumed[0] if self._consumed else self._initial[0])
        else:
            state = self._state_now()
        return merge_states(_allgather_json(state)) if self._gather else state

    def _state_now(self) -> dict:
        return {"kind": "streaming", "lanes": self._lanes, "sources": [s.name for s in self._specs],
                "layout": self._layout,
                "lane_states": {str(lane): {"counts": list(self._counts[lane]),
                                            "readers": [r.get_state() for r in self._readers[lane]],
                                            "counters": copy.deepcopy(self._counters[lane])}
                                for lane in self._host_lanes}}

    def set_state(self, state: dict) -> None:
        """Continues exactly where ``state`` (from :meth:`get_state`) was taken; before the first
        batch. The state may come from any host layout with the same lanes."""
        if self._queue is not None:
            raise RuntimeError("StreamIterator.set_state must be called before the first next()")
        if state.get("kind") != "streaming" or int(state["lanes"]) != self._lanes or \
                list(state["sources"]) != [s.name for s in self._specs]:
            raise ValueError("the checkpoint's data state is not this stream's (config.data.sources, or "
                             f"config.data.stream_lanes={self._lanes}, changed since it was written)")
        if state.get("layout") != self._layout:
            raise ValueError("the checkpoint's data state was written for other shards or another stream layout "
                             "(config.data.sources paths, shuffle_buffer, resample or shuffle_seed changed); resume "
                             "with the same data settings, or start a new run")
        missing = [lane for lane in self._host_lanes if str(lane) not in state["lane_states"]]
        if missing:
            raise ValueError(f"the checkpoint's data state has no position for lanes {missing}")
        for lane in self._host_lanes:
            saved = state["lane_states"][str(lane)]
            self._counts[lane] = [int(n) for n in saved["counts"]]
            for reader, reader_state in zip(self._readers[lane], saved["readers"]):
                reader.set_state(reader_state)
            fresh = self._zero_counters()
            fresh["records_read"] = int(saved["counters"]["records_read"])
            fresh["skipped"].update({k: int(v) for k, v in saved["counters"]["skipped"].items()})
            for name, values in saved["counters"]["per_source"].items():
                fresh["per_source"][name] = {k: int(v) for k, v in values.items()}
            self._counters[lane] = fresh


def merge_states(states: Sequence[dict]) -> dict:
    """One state holding the lanes of several hosts' :meth:`StreamIterator.get_state` results."""
    merged = copy.deepcopy(dict(states[0]))
    for other in states[1:]:
        merged["lane_states"].update(copy.deepcopy(other["lane_states"]))
    return merged


def _allgather_json(state: dict) -> list[dict]:
    """Every process's ``state`` (a collective over all processes), through jax's host allgather."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(gathered[i, :int(n)]).decode("utf-8")) for i, n in enumerate(sizes)]


def _prefetch_loop(ref, out: queue.Queue, stop: threading.Event) -> None:
    """Producer thread of a prefetching :class:`StreamIterator`: holds the iterator only while
    producing a batch (a weak reference otherwise), so an abandoned iterator is collected and
    its thread ends."""
    while not stop.is_set():
        it = ref()
        if it is None:
            return
        try:
            item = (it._produce(), it._state_now(), it._stats_now())
        except Exception as e:  # re-raised in the consumer, at the batch that failed
            item = e
        del it
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                break
            except queue.Full:
                if ref() is None:
                    return
        if isinstance(item, Exception):
            return


def stream_layout(data_config, global_batch_size: int, process_index: int, process_count: int):
    """``(lanes, host_lanes, rows_per_lane)`` for this host; ValueError naming the field if the
    lanes do not divide the batch or the hosts."""
    lanes = int(data_config.stream_lanes) or process_count
    if lanes < 1 or lanes % process_count:
        raise ValueError(f"config.data.stream_lanes={data_config.stream_lanes} must be a positive multiple of the "
                         f"number of hosts ({process_count}), or 0 (one lane per host)")
    if global_batch_size % lanes:
        raise ValueError(f"config.train.batch_size={global_batch_size} must be a multiple of the stream lanes "
                         f"({lanes}: config.data.stream_lanes, default one per host)")
    per_host = lanes // process_count
    return lanes, range(process_index * per_host, (process_index + 1) * per_host), global_batch_size // lanes


def make_stream_iterator(data_config, *, tokenizer, global_batch_size: int, seed: int, process_index: int,
                         process_count: int) -> StreamIterator:
    """The training iterator over ``config.data.sources`` for this host (see the module docstring).

    ``data_config`` is complete (:func:`contrastive_jax.data.config.complete`); host ``p`` of
    ``P`` gets rows ``[p*G/P, (p+1)*G/P)`` of every global batch, for the same global batches
    whatever P (given fixed ``config.data.stream_lanes``).
    """
    from contrastive_jax.data.pipeline import ExampleProcessor

    specs = parse_sources(data_config.sources)
    if not specs:
        raise ValueError("config.data.name='sources' needs config.data.sources: a list of {path, format, weight}")
    lanes, host_lanes, rows = stream_layout(data_config, global_batch_size, process_index, process_count)
    if int(data_config.worker_count) > 0:
        log.info("config.data.worker_count=%s is not used by config.data.sources: records are decoded in "
                 "config.data.read_threads threads, prefetch_batches ahead", data_config.worker_count)
    processor = ExampleProcessor(stream_entry(data_config), tokenizer, data_config, train=True, seed=int(seed))
    normalize = None if data_config.get("normalize_on_device", False) else (data_config.mean, data_config.std)
    return StreamIterator(specs, processor, lanes=lanes, host_lanes=host_lanes, rows_per_lane=rows, seed=int(seed),
                          window=int(data_config.shuffle_buffer), resample=bool(data_config.resample),
                          max_bad_fraction=float(data_config.max_bad_fraction), normalize=normalize,
                          threads=int(data_config.read_threads), prefetch=int(data_config.prefetch_batches),
                          gather=process_count > 1)


# ----------------------------------------------------------------------------------------------
# The 'sources' dataset entry: split sizes, evaluation records, vocabulary
# ----------------------------------------------------------------------------------------------


# Sources of up to this many shards are counted exactly; beyond, the size is estimated.
_COUNT_SHARDS = 16


def estimate_size(spec: SourceSpec) -> tuple[int, bool]:
    """``(records, exact)`` of one source: exact for up to :data:`_COUNT_SHARDS` shards and for
    local parquet (footers); otherwise (counting a tar reads all of it) the first shard's count
    times the number of shards."""
    local_parquet = spec.format == "parquet" and not any(storage.is_remote(p) for p in spec.shards)
    if len(spec.shards) <= _COUNT_SHARDS or local_parquet:
        return count_records(spec), True
    first = dataclasses.replace(spec, shards=spec.shards[:1])
    return count_records(first) * len(spec.shards), False


class StreamedSplit:
    """The training split of a stream: only its size (``len``), used for ``*_epochs`` durations:
    ``config.data.stream_examples`` when > 0, else :func:`estimate_size` summed over the sources
    (an estimate is logged; set stream_examples for exact epochs of large remote corpora)."""

    def __init__(self, data_config):
        self._config, self._len = data_config, None

    def __len__(self) -> int:
        if self._len is None:
            given = int(self._config.get("stream_examples", -1))
            if given > 0:
                self._len = given
            else:
                sizes = [estimate_size(s) for s in parse_sources(self._config.sources)]
                self._len = sum(n for n, _ in sizes)
                if not all(exact for _, exact in sizes):
                    log.warning("config.data.sources: about %d training examples (estimated from the first "
                                "shard of each source of more than %d shards); set config.data.stream_examples "
                                "for exact *_epochs durations", self._len, _COUNT_SHARDS)
        return self._len

    def __getitem__(self, index):
        raise TypeError("config.data.sources are streamed: no random access to the training split")


class SourceRecords:
    """Every record of ``config.data.eval_sources``, in shard order then file order, held in memory
    (encoded): the evaluation split of a stream. ``len`` and ``records[i]``."""

    def __init__(self, sources, field: str):
        self._sources, self._field, self._records = sources, field, None

    def _load(self) -> list:
        if self._records is None:
            self._records = [r for spec in parse_sources(self._sources, self._field)
                             for path in spec.shards for r in read_shard(path, spec, 0)
                             if passes_filters(r, spec.filters)]
        return self._records

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, index):
        return self._load()[index]


def _vocabulary_texts(data_config) -> list[str]:
    """Captions of the evaluation records and of the first records of each training source, in
    shard order: the word vocabulary of tokenizer kind 'auto' (small corpora and tests)."""
    texts = [caption_text(r) for r in SourceRecords(data_config.eval_sources, "config.data.eval_sources")]
    for spec in parse_sources(data_config.sources):
        n = 0
        for path in spec.shards:
            for record in read_shard(path, spec, 0):
                texts.append(caption_text(record))
                n += 1
                if n >= _VOCAB_RECORDS:
                    break
            if n >= _VOCAB_RECORDS:
                break
    return texts


def stream_entry(data_config):
    """The :class:`~contrastive_jax.data.registry.DatasetEntry` of ``config.data.name='sources'``:
    splits ``train_split`` (size only) and, with ``eval_sources``, ``eval_split`` (records)."""
    from contrastive_jax.data.registry import DatasetEntry

    def prepare(dc):
        if not dc.get("sources"):  # checked here: the loop prepares the data before anything else
            raise ValueError("config.data.name='sources' needs config.data.sources: a list of {path, format, "
                             "weight} (see docs/data.md)")
        parse_sources(dc.sources)  # every path and field checked up front, one line naming it
        splits: dict[str, Any] = {str(dc.train_split): StreamedSplit(dc)}
        if dc.get("eval_sources"):
            splits[str(dc.eval_split)] = SourceRecords(dc.eval_sources, "config.data.eval_sources")
        return splits

    return DatasetEntry(prepare=prepare, vocabulary_texts=_vocabulary_texts, image_key="image", text_key="caption",
                        key_field="key")


# ----------------------------------------------------------------------------------------------
# The stream as a grain IterDataset
# ----------------------------------------------------------------------------------------------


_GRAIN_CLASSES: tuple | None = None


def _grain_classes():
    """``(StreamDataset, StreamDatasetIterator)``, defined on first use so that importing this
    module does not import grain."""
    global _GRAIN_CLASSES
    if _GRAIN_CLASSES is None:
        import grain

        class StreamDatasetIterator(grain.DatasetIterator):
            """A grain ``DatasetIterator`` over a :class:`StreamIterator`: ``get_state`` is the
            stream's whole state (lanes, readers, mixture counters, counters); ``set_state`` works
            at any time (after batches were taken it starts a fresh stream there)."""

            def __init__(self, make):
                super().__init__()
                self._make, self._stream, self._started = make, make(), False

            def __next__(self):
                self._started = True
                return next(self._stream)

            def get_state(self) -> dict:
                return self._stream.get_state()

            def set_state(self, state: dict) -> None:
                if self._started:  # the prefetch thread is ahead: replace the stream
                    self._stream, self._started = self._make(), False
                self._stream.set_state(state)

            def stats(self) -> dict[str, float]:
                return self._stream.stats()

        class StreamDataset(grain.IterDataset):
            """This host's batches of ``config.data.sources`` as a grain ``IterDataset``: compose
            grain transforms on it (``.map``, ``.filter``, ...) and checkpoint the composed
            iterator with grain's ``get_state`` / ``set_state`` or its orbax handler; the state
            is the stream's (exact resume, see :class:`StreamIterator`)."""

            def __init__(self, make):
                super().__init__()
                self._make = make

            def __iter__(self):
                return StreamDatasetIterator(self._make)

        _GRAIN_CLASSES = (StreamDataset, StreamDatasetIterator)
    return _GRAIN_CLASSES


def stream_dataset(data_config, *, tokenizer, global_batch_size: int, seed: int | None = None,
                   process_index: int | None = None, process_count: int | None = None):
    """``grain.IterDataset`` whose elements are the host batches of
    :func:`contrastive_jax.data.pipeline.make_train_iterator` for ``config.data.name='sources'``
    (same arguments, same batches: dicts of ``image`` float32 [b, S, S, 3], ``text`` int32
    [b, max_len], ...). Each ``iter()`` starts a new stream from the beginning; its iterator's
    ``get_state()`` is the stream's JSON state, which ``set_state`` restores exactly."""
    from contrastive_jax.data.pipeline import make_train_iterator

    if str(data_config.name) != STREAM_NAME:
        raise ValueError(f"stream_dataset needs config.data.name='{STREAM_NAME}' (got {data_config.name!r})")

    def make():
        return make_train_iterator(data_config, tokenizer=tokenizer, global_batch_size=global_batch_size, seed=seed,
                                   process_index=process_index, process_count=process_count)

    make().get_state()  # checks the config now (paths, lanes), not at the first next()
    return _grain_classes()[0](make)
