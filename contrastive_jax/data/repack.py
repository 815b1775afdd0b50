"""Shard repacking: streamed shards in, filtered / deduplicated / resized shards out.

``contrastive-jax data repack --sources SPEC... --output DIR --format array_record|webdataset``
reads WebDataset, Parquet or ArrayRecord shards (local, ``s3://``, ``gs://``; through the readers
of :mod:`contrastive_jax.data.streaming`) and writes new shards:

1. **filter** (``--filter 'json.similarity >= 0.28'``, the grammar of ``config.data.sources``
   filters, :func:`streaming.parse_filters`), checked before the image is decoded;
2. **validate**: records without an image or a non-empty caption, or whose image PIL cannot
   fully decode, are dropped and counted by reason (``no_image``, ``empty_caption``,
   ``empty_image``, ``undecodable``; ``filtered``; ``unreadable_shard`` counts whole shards);
3. **resize / re-encode** (``--resize N``: shorter side to N px, aspect kept, bicubic, only
   images larger than that; ``--reencode jpeg:Q`` or ``png``);
4. **dedup** (``--dedup``): records whose SOURCE image bytes have the same SHA-256 are one image;
   the one with the smallest key is kept, the others counted as ``duplicate``;
5. **shard**: record ``key`` goes to shard ``sha256(key) mod S`` with ``S = ceil(N / shard_size)``
   and ``N`` the records kept; within a shard records are sorted by key. Shards left empty by the
   hash are not written and the rest are numbered consecutively.

Every step is a pure function of the record (or of the group of records sharing an image hash /
a shard), so the output -- which records, their bytes, their shard and order -- is the same for
any number of workers, on Beam (:func:`repack` with ``runner='beam'``: DirectRunner with local
worker processes by default, Dataflow / Flink / Spark through pipeline options) or in this process
(``runner='single_process'``, the same functions without Beam).

Output: WebDataset tars ``shard-00000.tar`` (``KEY.jpg|png`` + ``KEY.txt`` + ``KEY.json``; dots and
slashes in keys become ``_``, the original key is in the json as ``key``) or a TFDS array_record
dataset (``NAME-train.array_record-00000-of-0000S`` with ``features.json`` and
``dataset_info.json``: features ``image`` (encoded bytes), ``captions``, ``key``, as ``data
convert`` writes; readable by ``tfds.builder_from_directory`` and as an ``array_record`` source).
``repack_report.json`` holds the counts by reason and the shard sizes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import tarfile
import tempfile
from collections import Counter
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from contrastive_jax import storage
from contrastive_jax.data import streaming
from contrastive_jax.data.convert import ConversionError
from contrastive_jax.data.transforms import BadImageError, decode_image

OUTPUT_FORMATS = ("array_record", "webdataset")
REPORT_FILE = "repack_report.json"
_TMP = "_repack_tmp"


@dataclasses.dataclass(frozen=True)
class RepackOptions:
    """What :func:`process_record` does to each record (see the module docstring)."""

    filters: tuple[tuple[str, str, float], ...] = ()
    resize: int | None = None  # shorter side in px
    reencode: tuple[str, int] | None = None  # ('jpeg', quality) or ('png', 0)
    dedup: bool = False


def parse_reencode(text: str | None) -> tuple[str, int] | None:
    """``'jpeg:90'`` -> ``('jpeg', 90)``; ``'png'`` -> ``('png', 0)``; None -> None."""
    if not text:
        return None
    fmt, _, quality = str(text).lower().partition(":")
    if fmt in ("jpeg", "jpg"):
        try:
            q = int(quality or 95)
        except ValueError:
            q = -1
        if not 1 <= q <= 100:
            raise ConversionError(f"--reencode {text!r}: the JPEG quality must be an integer in 1..100 (jpeg:90)")
        return ("jpeg", q)
    if fmt == "png" and not quality:
        return ("png", 0)
    raise ConversionError(f"--reencode {text!r}: give jpeg:QUALITY (e.g. jpeg:90) or png")


def _captions(record: dict) -> list[str]:
    """All of a streamed record's captions as stripped, non-empty text."""
    value = record.get("caption", "")
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.ndim else value.item()
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        text = v.decode("utf-8", "replace") if isinstance(v, (bytes, np.bytes_)) else str(v or "")
        if text.strip():
            out.append(text.strip())
    return out


def _image_bytes(record: dict) -> bytes:
    image = record.get("image")
    if isinstance(image, np.ndarray):
        image = image.item() if image.dtype == object else image.tobytes()
    return bytes(image or b"")


def _encode(image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``shorter`` px, the other rounded; unchanged when
    the image is not larger than that."""
    if min(width, height) <= shorter:
        return width, height
    if width <= height:
        return shorter, max(1, round(height * shorter / width))
    return max(1, round(width * shorter / height)), shorter


def process_record(record: dict, options: RepackOptions) -> tuple[str, dict | str]:
    """One streamed record -> ``(key, output record)`` or ``(key, reason it is dropped)``.

    Output record: ``key`` (str), ``image`` (encoded bytes), ``ext`` (``jpg`` / ``png`` / the source
    format's), ``captions`` (list of str), ``json`` (the source metadata dict), ``sha256`` (hex digest
    of the SOURCE image bytes, what dedup compares).
    """
    key = str(record.get("key", ""))
    if options.filters and not streaming.passes_filters(record, options.filters):
        return key, "filtered"
    data = _image_bytes(record)
    if record.get("image") is None:
        return key, "no_image"
    captions = _captions(record)
    if not captions:
        return key, "empty_caption"
    try:
        image = decode_image(data)
    except BadImageError as e:
        return key, e.reason
    source_format = (_sniff_format(data) or "jpg")
    out_bytes, ext = data, source_format
    size = resized_size(image.width, image.height, options.resize) if options.resize else image.size
    if size != image.size or options.reencode:
        from PIL import Image

        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        fmt, quality = options.reencode or (("png", 0) if source_format == "png" else ("jpeg", 95))
        out_bytes, ext = _encode(image, fmt, quality), ("jpg" if fmt == "jpeg" else "png")
    meta = record.get("json") or {}
    return key, {"key": key, "image": out_bytes, "ext": ext, "captions": captions,
                 "json": meta if isinstance(meta, dict) else {}, "sha256": hashlib.sha256(data).hexdigest()}


def _sniff_format(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def order_key(record: dict) -> tuple[str, str, str]:
    """The total order of output records: by key (ties, e.g. one key in two sources, by image hash
    and captions), independent of the order records arrive in."""
    return record["key"], record["sha256"], json.dumps(record["captions"])


def keep_first(records: Iterable[dict]) -> tuple[dict, int]:
    """Of records sharing one image hash: (the first in :func:`order_key` order, number dropped)."""
    records = sorted(records, key=order_key)
    return records[0], len(records) - 1


def num_shards(count: int, shard_size: int) -> int:
    return max(1, math.ceil(count / shard_size))


def shard_of(key: str, shards: int) -> int:
    """The output shard of record ``key`` among ``shards``: a hash of the key alone."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % shards


# ----------------------------------------------------------------------------------------------
# Reading and writing shards
# ----------------------------------------------------------------------------------------------


def read_source_shard(path: str, spec: streaming.SourceSpec, options: RepackOptions) -> Iterator[tuple]:
    """Processed records of one input shard: ``('ok', record)`` / ``('drop', reason)``; a shard that
    cannot be read (after the reader's retries) gives one ``('drop', 'unreadable_shard')``."""
    try:
        for record in streaming._READERS[spec.format](path, spec, 0):  # noqa: SLF001 - the public readers' table
            _, out = process_record(record, options)
            yield ("drop", out) if isinstance(out, str) else ("ok", out)
    except Exception:  # noqa: BLE001 - any failure of one shard (tarfile, pyarrow, OSError, botocore)
        yield ("drop", "unreadable_shard")


def _wds_name(key: str) -> str:
    # WebDataset readers end a key at the first dot of the basename: keep it dot- and slash-free.
    return key.replace("/", "_").replace(".", "_") or "_"


def _features():
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "key": tfds.features.Text(),
    })


def write_shard(shard: int, records: Iterable[dict], output: str, fmt: str) -> dict:
    """Writes one shard's records (sorted by :func:`order_key`) to ``OUTPUT/_repack_tmp/`` -> its
    ``{shard, path, records, bytes}``; :func:`finalize` gives it its final name."""
    records = sorted(records, key=order_key)
    tmp_dir = storage.join(output, _TMP)
    storage.makedirs(tmp_dir)
    path = storage.join(tmp_dir, f"part-{shard:06d}.{'tar' if fmt == 'webdataset' else 'array_record'}")
    nbytes = 0
    with storage.writing_locally(path) as local:
        if fmt == "webdataset":
            with tarfile.open(local, "w") as tar:
                for r in records:
                    name = _wds_name(r["key"])
                    meta = dict(r["json"], key=r["key"], sha256=r["sha256"])
                    for ext, blob in ((r["ext"], r["image"]), ("txt", r["captions"][0].encode("utf-8")),
                                      ("json", json.dumps(meta, sort_keys=True).encode("utf-8"))):
                        info = tarfile.TarInfo(f"{name}.{ext}")
                        info.size, info.mtime, info.mode = len(blob), 0, 0o644  # no clock in the bytes
                        tar.addfile(info, io.BytesIO(blob))
        else:
            from array_record.python.array_record_module import ArrayRecordWriter

            features = _features()
            writer = ArrayRecordWriter(local, "group_size:1")
            for r in records:
                raw = features.serialize_example({"image": r["image"], "captions": r["captions"], "key": r["key"]})
                nbytes += len(raw)
                writer.write(raw)
            writer.close()
        if fmt == "webdataset":
            nbytes = os.path.getsize(local)
    return {"shard": shard, "path": path, "records": len(records), "bytes": nbytes}


def _move(src: str, dst: str) -> None:
    if storage.is_remote(src):
        fs, p = storage.filesystem(src)
        fs.mv(p, storage.filesystem(dst)[1])
    else:
        os.replace(src, dst)


def finalize(shards: Sequence[dict], dropped: dict[str, int], output: str, fmt: str, name: str,
             extra: dict | None = None) -> dict:
    """Names the written shards in shard order, writes the TFDS metadata (array_record) and
    ``repack_report.json`` -> the report."""
    shards = sorted(shards, key=lambda s: s["shard"])
    total = len(shards)
    files = []
    for i, s in enumerate(shards):
        final = (f"shard-{i:05d}.tar" if fmt == "webdataset"
                 else f"{name}-train.array_record-{i:05d}-of-{total:05d}")
        _move(s["path"], storage.join(output, final))
        files.append(final)
    if storage.exists(storage.join(output, _TMP)):
        storage.rmtree(storage.join(output, _TMP))
    if fmt == "array_record":
        _write_tfds_metadata(output, name, [s["records"] for s in shards], sum(s["bytes"] for s in shards))
    report = {"output": output, "format": fmt, "num_records": sum(s["records"] for s in shards),
              "num_dropped": sum(dropped.values()), "dropped_by_reason": dict(sorted(dropped.items())),
              "shards": files, "shard_lengths": [s["records"] for s in shards], **(extra or {})}
    storage.write_json(storage.join(output, REPORT_FILE), report)
    return report


def _write_tfds_metadata(output: str, name: str, lengths: list[int], nbytes: int) -> None:
    import tensorflow_datasets as tfds

    local = output if not storage.is_remote(output) else tempfile.mkdtemp(prefix="contrastive_jax_repack_")
    template = tfds.core.ShardedFileTemplate(data_dir=local, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                             dataset_name=name, filetype_suffix="array_record")
    split = tfds.core.SplitInfo(name="train", shard_lengths=lengths, num_bytes=nbytes, filename_template=template)
    tfds.folder_dataset.write_metadata(data_dir=local, features=_features(), split_infos=[split],
                                       filename_template=template, check_data=False,
                                       description="Repacked by contrastive-jax data repack.")
    if local != output:
        storage.copy_dir_to(local, output)


# ----------------------------------------------------------------------------------------------
# The two drivers: Beam pipeline and this process
# ----------------------------------------------------------------------------------------------


def _check_output(output: str, fmt: str, overwrite: bool) -> str:
    if fmt not in OUTPUT_FORMATS:
        raise ConversionError(f"--format {fmt!r}; valid: {', '.join(OUTPUT_FORMATS)}")
    output = output if storage.is_remote(output) else os.path.abspath(os.path.expanduser(output))
    if storage.isdir(output) and storage.listdir(output):
        if not overwrite:
            raise ConversionError(f"output {output} exists and is not empty; choose a new folder "
                                  "(or pass --overwrite to replace what it holds)")
        storage.rmtree(output)
    storage.makedirs(output)
    return output


def _sources(sources: Sequence[str], input_format: str | None) -> list[streaming.SourceSpec]:
    entries = [{"path": s, **({"format": input_format} if input_format else {})} for s in sources]
    if not entries:
        raise ConversionError("--sources: give at least one shard path, glob or brace range")
    try:
        return streaming.parse_sources(entries, field="--sources")
    except ValueError as e:
        raise ConversionError(str(e)) from None


def repack(sources: Sequence[str], output: str, *, format: str = "array_record", input_format: str | None = None,
           filters: Sequence[str] = (), resize: int | None = None, reencode: str | None = None,
           dedup: bool = False, shard_size: int = 10_000, name: str = "repacked", runner: str = "beam",
           num_workers: int = 2, beam_options: Sequence[str] = (), overwrite: bool = False) -> dict:
    """Repacks the shards of ``sources`` into ``output`` (see the module docstring).

    Args:
      sources: shard paths, globs or brace ranges (``s3://b/shard-{00000..00099}.tar``).
      format: output ``array_record`` or ``webdataset``.
      input_format: ``webdataset`` | ``parquet`` | ``array_record``; None: from the file names.
      filters: ``'<field> <op> <number>'`` strings (``json.similarity >= 0.28``).
      resize: shorter side in px (larger images only); None keeps the size.
      reencode: ``'jpeg:Q'`` or ``'png'``; None keeps the source bytes of images not resized.
      dedup: drop all but the first (by key) of records with byte-identical source images.
      shard_size: records per output shard on average (hash partitioning: not exactly).
      name: the TFDS dataset name of array_record output (file names).
      runner: ``'beam'`` (default DirectRunner with ``num_workers`` processes; ``beam_options``
        ``'K=V'`` strings choose another runner) or ``'single_process'`` (no Beam needed).
      overwrite: replace what a non-empty ``output`` holds (refused otherwise).

    Returns:
      The report (also ``OUTPUT/repack_report.json``): ``num_records``, ``num_dropped``,
      ``dropped_by_reason``, ``shards``, ``shard_lengths``, ``runner``.
    """
    if int(shard_size) < 1:
        raise ConversionError(f"--shard-size={shard_size} must be >= 1")
    if resize is not None and int(resize) < 1:
        raise ConversionError(f"--resize={resize} must be >= 1")
    if runner not in ("beam", "single_process"):
        raise ConversionError(f"runner={runner!r}; valid: beam, single_process")
    try:
        parsed_filters = streaming.parse_filters(list(filters), "--filter")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    options = RepackOptions(filters=parsed_filters, resize=int(resize) if resize else None,
                            reencode=parse_reencode(reencode), dedup=bool(dedup))
    specs = _sources(sources, input_format)
    if runner == "beam":
        from contrastive_jax.data.beam import pipeline_options, runner_name

        opts = pipeline_options(num_workers, beam_options)
        output = _check_output(output, format, overwrite)
        _run_beam(specs, options, output, format, name, int(shard_size), opts)
        return storage.read_json(storage.join(output, REPORT_FILE))
    output = _check_output(output, format, overwrite)
    return _run_local(specs, options, output, format, name, int(shard_size))


def _run_local(specs, options: RepackOptions, output: str, fmt: str, name: str, shard_size: int) -> dict:
    """The pipeline's steps in this process, in the same order (everything in memory)."""
    dropped: Counter = Counter()
    kept: list[dict] = []
    for spec in specs:
        for path in spec.shards:
            for kind, value in read_source_shard(path, spec, options):
                if kind == "ok":
                    kept.append(value)
                else:
                    dropped[value] += 1
    if options.dedup:
        groups: dict[str, list[dict]] = {}
        for r in kept:
            groups.setdefault(r["sha256"], []).append(r)
        kept = []
        for group in groups.values():
            first, n = keep_first(group)
            kept.append(first)
            dropped["duplicate"] += n
    shards = num_shards(len(kept), shard_size)
    by_shard: dict[int, list[dict]] = {}
    for r in kept:
        by_shard.setdefault(shard_of(r["key"], shards), []).append(r)
    written = [write_shard(s, rs, output, fmt) for s, rs in sorted(by_shard.items())]
    return finalize(written, dict(dropped), output, fmt, name, {"runner": "single_process"})


def _dedup_group(element) -> Iterator[tuple]:
    _, records = element
    first, n = keep_first(records)
    yield ("ok", first)
    for _ in range(n):
        yield ("drop", "duplicate")


def _run_beam(specs, options: RepackOptions, output: str, fmt: str, name: str, shard_size: int,
              beam_options) -> None:
    """The Beam pipeline: read + process per input shard -> (dedup by image hash) -> count ->
    partition by key hash -> write one output shard per group -> finalize on one worker."""
    import apache_beam as beam
    from contrastive_jax.data.beam import runner_name

    runner = runner_name(beam_options)
    inputs = [(spec, path) for spec in specs for path in spec.shards]
    with beam.Pipeline(options=beam_options) as p:
        results = (p
                   | "Shards" >> beam.Create(inputs, reshuffle=False)
                   | "Spread" >> beam.Reshuffle()
                   | "Read" >> beam.FlatMap(lambda sp: read_source_shard(sp[1], sp[0], options)))
        if options.dedup:
            ok = results | "Kept" >> beam.Filter(lambda kv: kv[0] == "ok")
            deduped = (ok
                       | "ByHash" >> beam.Map(lambda kv: (kv[1]["sha256"], kv[1]))
                       | "GroupByHash" >> beam.GroupByKey()
                       | "KeepFirst" >> beam.FlatMap(_dedup_group))
            first_drops = results | "Dropped" >> beam.Filter(lambda kv: kv[0] == "drop")
            results = (first_drops, deduped) | "Merge" >> beam.Flatten()
        kept = (results | "OnlyKept" >> beam.Filter(lambda kv: kv[0] == "ok")
                | "Record" >> beam.Map(lambda kv: kv[1]))
        dropped = (results
                   | "OnlyDropped" >> beam.Filter(lambda kv: kv[0] == "drop")
                   | "Reason" >> beam.Map(lambda kv: kv[1])
                   | "CountReasons" >> beam.combiners.Count.PerElement()
                   | "ReasonList" >> beam.combiners.ToList())
        total = kept | "CountKept" >> beam.combiners.Count.Globally()
        written = (kept
                   | "ToShard" >> beam.Map(lambda r, n: (shard_of(r["key"], num_shards(n, shard_size)), r),
                                           beam.pvalue.AsSingleton(total))
                   | "GroupByShard" >> beam.GroupByKey()
                   | "Write" >> beam.Map(lambda kv: write_shard(kv[0], kv[1], output, fmt))
                   | "ShardList" >> beam.combiners.ToList())
        _ = (p
             | "Once" >> beam.Create([None])
             | "Finalize" >> beam.Map(
                 lambda _, shards, reasons: finalize(shards, dict(reasons), output, fmt, name, {"runner": runner}),
                 beam.pvalue.AsSingleton(written), beam.pvalue.AsSingleton(dropped)))
