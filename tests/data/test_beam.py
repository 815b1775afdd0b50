"""Preprocessing on Apache Beam (issue 18 point 5): ``data convert --runner beam`` and ``data repack``.

Each Beam pipeline runs once per module (DirectRunner, 2 worker processes, multi_processing) and
is compared with the single-process result and with the expected records computed here from the
test's own files with hashlib / PIL.
"""
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("apache_beam", reason="Apache Beam is the optional [beam] extra (pip install -e '.[beam]')")

from contrastive_jax import data  # noqa: E402
from contrastive_jax.data import convert as convert_lib  # noqa: E402
from contrastive_jax.data import repack as repack_lib  # noqa: E402
from contrastive_jax.data import streaming  # noqa: E402
from data_test_helpers import jpeg, png, user_config, write_user_folder  # noqa: E402

WORKERS = 2


# ---------------------------------------------------------------------------------------------
# data convert --runner beam
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The user folder (36 good images, 5 bad) converted in this process and on Beam."""
    root = tmp_path_factory.mktemp("beam_convert")
    files, captions = write_user_folder(root)
    kw = dict(captions=str(root / "captions.csv"), test_fraction=0.25, max_bad_fraction=0.2, progress=False)
    single = convert_lib.convert(str(root / "imgs"), name="pics", data_dir=str(root / "single"), **kw)
    beam = convert_lib.convert(str(root / "imgs"), name="pics", data_dir=str(root / "beam"), runner="beam",
                               num_workers=WORKERS, **kw)
    return root, files, captions, single, beam


def _split_records(data_dir):
    """{split: [(key, image bytes, captions)] in file order} through the library's reader."""
    out = {}
    for split, src in data.build_dataset(user_config(data_dir, "pics")).items():
        out[split] = [(src[i]["key"].decode(), src[i]["image"], [c.decode() for c in src[i]["captions"]])
                      for i in range(len(src))]
    return out


def test_beam_conversion_writes_the_single_process_records(converted):
    root, files, captions, single, beam = converted
    assert beam["runner"] == "DirectRunner" and beam["validated_by_beam"] == 41  # every item, on the workers
    assert single["runner"] == "single_process"
    same = {k: v for k, v in single.items() if k not in ("runner", "dataset_dir")}
    assert {k: v for k, v in beam.items() if k not in ("runner", "dataset_dir", "validated_by_beam")} == same
    got_single, got_beam = _split_records(root / "single"), _split_records(root / "beam")
    assert got_beam == got_single  # same records, same order, per split
    # ... and they are the source files: bytes as written, stripped captions, split by key hash.
    flat = {key: (image, caps, split) for split, rows in got_beam.items() for key, image, caps in rows}
    assert set(flat) == set(files)
    for key, (image, caps, split) in flat.items():
        assert image == files[key] and caps == captions[key]
        assert split == convert_lib.split_of(key, 0, 0.25, 0.0)
    # The vocabulary / report file and the TFDS metadata agree too (tfds.data_source reads both).
    import tensorflow_datasets as tfds

    for split in got_beam:
        a = tfds.data_source("pics", data_dir=str(root / "single"), split=split)
        b = tfds.data_source("pics", data_dir=str(root / "beam"), split=split)
        assert len(a) == len(b) == len(got_beam[split])
        assert [b[i]["key"] for i in range(len(b))] == [a[i]["key"] for i in range(len(a))]
    meta = [json.load(open(os.path.join(r["dataset_dir"], "contrastive_jax.json"))) for r in (single, beam)]
    assert meta[0]["vocabulary"] == meta[1]["vocabulary"] and len(meta[0]["vocabulary"]) > 10


def test_missing_beam_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from contrastive_jax import cli

    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam -> ImportError
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(np.random.default_rng(0)))
    (tmp_path / "c.csv").write_text("image,caption\na.png,x\n", encoding="utf-8")
    code = cli.main(["data", "convert", str(tmp_path / "imgs"), "--captions", str(tmp_path / "c.csv"), "--name", "nb",
                     "--data-dir", str(tmp_path / "d"), "--runner", "beam"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and '.[beam]' in err[0]
    assert not (tmp_path / "d" / "nb").exists()


def test_bad_beam_option_and_worker_count_are_refused():
    from contrastive_jax.data.beam import pipeline_options, runner_name

    with pytest.raises(convert_lib.ConversionError, match="is not K=V"):
        pipeline_options(2, ["=DataflowRunner"])
    with pytest.raises(convert_lib.ConversionError, match="must be >= 1"):
        pipeline_options(0)
    opts = pipeline_options(3, ["runner=FlinkRunner", "flink_master=localhost:8081"]).get_all_options()
    assert (opts["runner"], opts["flink_master"], opts["direct_num_workers"]) == ("FlinkRunner", "localhost:8081", 3)
    assert runner_name(pipeline_options(4)) == "DirectRunner"


# ---------------------------------------------------------------------------------------------
# data repack
# ---------------------------------------------------------------------------------------------

RESIZE, QUALITY, MIN_SIMILARITY, SHARD_SIZE = 16, 85, 0.3, 6


def _write_corpus(folder):
    """Two img2dataset-style tars -> {key: (image bytes, caption, similarity)} of every sample
    (image None: no image member)."""
    rng = np.random.default_rng(7)
    os.makedirs(folder)
    samples, first_images = {}, []
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for j in range(14):
                key = f"{shard:03d}{j:04d}"
                if j in (3, 9) and first_images:  # a copy of an earlier image under another key
                    image = first_images[j % len(first_images)]
                elif j == 5:
                    image = b"\xff\xd8 not a jpeg"
                elif j == 6:
                    image = b""
                else:
                    h, w = 12 + (j * 5) % 17, 10 + (j * 7) % 23
                    image = png(rng, h, w) if j % 2 else jpeg(rng, h, w)
                    first_images.append(image)
                caption = "" if j == 8 else f"sample {key} caption"
                similarity = 0.1 if j in (2, 11) else 0.35 + j / 100
                samples[key] = (image, caption, similarity)
                members = [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()),
                           (f"{key}.json", json.dumps({"similarity": similarity}).encode())]
                for name, blob in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return samples


def _expected(samples):
    """The repacked records computed here with PIL and hashlib: (dropped by reason, {key: (image
    bytes, caption)}) for filter similarity >= MIN_SIMILARITY, dedup, resize RESIZE, jpeg:QUALITY."""
    dropped, kept, seen = {}, {}, {}
    for key in sorted(samples):
        image, caption, similarity = samples[key]
        reason = None
        if similarity < MIN_SIMILARITY:
            reason = "filtered"
        elif not caption.strip():
            reason = "empty_caption"
        elif not image:
            reason = "empty_image"
        else:
            try:
                img = Image.open(io.BytesIO(image))
                img.load()
                img = img.convert("RGB")
            except Exception:  # noqa: BLE001 - any decoding failure
                reason = "undecodable"
            else:
                digest = hashlib.sha256(image).hexdigest()
                if digest in seen:
                    reason = "duplicate"
                seen.setdefault(digest, key)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        w, h = img.size
        if min(w, h) > RESIZE:
            s = RESIZE / min(w, h)
            img = img.resize((RESIZE if w <= h else round(w * s), RESIZE if h < w else round(h * s)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=QUALITY)
        kept[key] = (buf.getvalue(), caption)
    return dropped, kept


@pytest.fixture(scope="module")
def repacked(tmp_path_factory):
    """The corpus repacked by Beam (2 workers) and in this process, to array_record and webdataset."""
    root = tmp_path_factory.mktemp("beam_repack")
    samples = _write_corpus(root / "in")
    kw = dict(filters=[f"json.similarity >= {MIN_SIMILARITY}"], resize=RESIZE, reencode=f"jpeg:{QUALITY}",
              dedup=True, shard_size=SHARD_SIZE)
    sources = [str(root / "in" / "{00000..00001}.tar")]
    out = {}
    for fmt in ("array_record", "webdataset"):
        out[fmt, "beam"] = repack_lib.repack(sources, str(root / f"{fmt}_beam"), format=fmt, runner="beam",
                                             num_workers=WORKERS, **kw)
        out[fmt, "single"] = repack_lib.repack(sources, str(root / f"{fmt}_single"), format=fmt,
                                               runner="single_process", **kw)
    return root, samples, out


def _array_record_rows(folder):
    import tensorflow_datasets as tfds

    src = tfds.builder_from_directory(str(folder)).as_data_source()["train"]
    return [(src[i]["key"].decode(), src[i]["image"], [c.decode() for c in src[i]["captions"]])
            for i in range(len(src))]


def _webdataset_rows(folder, shards):
    spec = streaming.parse_sources([{"path": [str(folder / s) for s in shards]}])[0]
    rows = []
    for path in spec.shards:
        for r in streaming.read_webdataset(path, spec):
            rows.append((r["json"]["key"], r["image"], [r["caption"]]))
    return rows


def test_repack_on_beam_equals_single_process_and_the_expected_records(repacked):
    root, samples, out = repacked
    dropped, kept = _expected(samples)
    assert dropped == {"filtered": 4, "empty_caption": 2, "undecodable": 2, "empty_image": 2, "duplicate": 4}
    num_shards = math.ceil(len(kept) / SHARD_SIZE)
    want_shards = {}
    for key in sorted(kept):  # shard = sha256(key) mod S; empty shards are not written
        want_shards.setdefault(repack_lib.shard_of(key, num_shards), []).append(key)
    want_lengths = [len(want_shards[s]) for s in sorted(want_shards)]
    want_order = [key for s in sorted(want_shards) for key in want_shards[s]]
    for fmt in ("array_record", "webdataset"):
        beam, single = out[fmt, "beam"], out[fmt, "single"]
        assert beam["runner"] == "DirectRunner" and single["runner"] == "single_process"
        for report in (beam, single):
            assert report["dropped_by_reason"] == dropped
            assert report["num_records"] == len(kept) and report["shard_lengths"] == want_lengths
        if fmt == "array_record":
            rows_beam, rows_single = _array_record_rows(root / f"{fmt}_beam"), _array_record_rows(root / f"{fmt}_single")
        else:
            rows_beam = _webdataset_rows(root / f"{fmt}_beam", beam["shards"])
            rows_single = _webdataset_rows(root / f"{fmt}_single", single["shards"])
        assert rows_beam == rows_single  # same records, bytes, shards and order for 2 workers and 1
        assert [key for key, _, _ in rows_beam] == want_order
        for key, image, caps in rows_beam:
            assert (image, caps) == (kept[key][0], [kept[key][1]]), key
        assert beam["shards"] == single["shards"]
        if fmt == "webdataset":  # tars are byte-identical (array_record files carry writer details)
            for name in beam["shards"]:
                assert (root / f"{fmt}_beam" / name).read_bytes() == (root / f"{fmt}_single" / name).read_bytes()


def test_repacked_array_record_is_a_streaming_source(repacked):
    root, samples, out = repacked
    spec = streaming.parse_sources([{"path": str(root / "array_record_beam" / "*.array_record-*"),
                                     "format": "array_record"}])[0]
    # (keys are not compared: streaming.read_array_record gives str(bytes) keys, "b'...'", reported)
    got = [(bytes(r["image"]), [c.decode() for c in r["caption"]])
           for path in spec.shards for r in streaming.read_array_record(path, spec)]
    assert got == [(image, caps) for _, image, caps in _array_record_rows(root / "array_record_single")]


def test_repack_refuses_a_non_empty_output_and_bad_options(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("user data")
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "a.tar", "w"):
        pass
    src = [str(tmp_path / "in" / "a.tar")]
    with pytest.raises(convert_lib.ConversionError, match="not empty"):
        repack_lib.repack(src, str(tmp_path / "out"), runner="single_process")
    assert (tmp_path / "out" / "mine.txt").read_text() == "user data"
    for kw, msg in ((dict(reencode="jpeg:0"), "quality"), (dict(reencode="gif"), "jpeg:QUALITY"),
                    (dict(filters=["similarity > 1"]), "is not '<field> <op> <number>'"),
                    (dict(shard_size=0), "shard-size")):
        with pytest.raises(convert_lib.ConversionError, match=msg):
            repack_lib.repack(src, str(tmp_path / "new"), runner="single_process", **kw)
    with pytest.raises(convert_lib.ConversionError, match="matches no files"):
        repack_lib.repack([str(tmp_path / "none" / "*.tar")], str(tmp_path / "new"), runner="single_process")


def test_repack_cli_prints_the_report_as_json(tmp_path):
    rng = np.random.default_rng(3)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i in range(3):
            for name, blob in ((f"k{i}.png", png(rng, 20, 30)), (f"k{i}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    proc = subprocess.run([sys.executable, "-m", "contrastive_jax.cli", "data", "repack", "--sources",
                           str(tmp_path / "a.tar"), "--output", str(tmp_path / "o"), "--format", "webdataset",
                           "--runner", "single_process", "--resize", "10", "--reencode", "png"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["num_records"] == 3 and report["shards"] == ["shard-00000.tar"]
    with tarfile.open(tmp_path / "o" / "shard-00000.tar") as tar:
        sizes = sorted(Image.open(tar.extractfile(m)).size for m in tar.getmembers() if m.name.endswith(".png"))
    assert sizes == [(15, 10)] * 3  # 30x20 -> shorter side 10, aspect kept


def test_beam_validation_resumes_after_the_staged_chunks(converted, tmp_path, monkeypatch):
    """An interrupted Beam conversion keeps its finished chunks: only the missing one is validated
    again, and it is staged exactly as the single-process run stages it."""
    import pickle

    from contrastive_jax.data.beam import pipeline_options

    root = converted[0]
    monkeypatch.setattr(convert_lib, "_CHUNK", 8)  # 41 items -> 6 chunks
    items, _, _ = convert_lib._collect_items(
        str(root / "imgs"), name="pics", format="folder", captions=str(root / "captions.csv"),
        class_template="{}", test_fraction=0.25, validation_fraction=0.0, encoding=None)
    staging = str(tmp_path / "staging")
    chunks, _, _ = convert_lib._stage(items, staging, "opts", progress=False)
    assert len(chunks) == 6
    with open(chunks[2], "rb") as f:
        want = pickle.load(f)
    os.remove(chunks[2])
    assert convert_lib._stage_with_beam(items, staging, "opts", pipeline_options(WORKERS)) == 8
    with open(chunks[2], "rb") as f:
        assert pickle.load(f) == want
    assert sorted(os.listdir(staging)) == sorted(os.path.basename(c) for c in chunks)  # no temp files left


def test_repack_reads_and_writes_object_storage(repacked, moto_s3, tmp_path):
    """s3:// in and out (moto's server on 127.0.0.1): the same shards as the local single-process run."""
    from contrastive_jax import storage

    root = repacked[0]
    fs, _ = storage.filesystem("s3://cj-repack")
    fs.mkdir("cj-repack")
    for name in ("00000.tar", "00001.tar"):
        fs.put_file(str(root / "in" / name), f"cj-repack/in/{name}")
    report = repack_lib.repack(["s3://cj-repack/in/*.tar"], "s3://cj-repack/out", format="webdataset",
                               runner="single_process", filters=[f"json.similarity >= {MIN_SIMILARITY}"],
                               resize=RESIZE, reencode=f"jpeg:{QUALITY}", dedup=True, shard_size=SHARD_SIZE)
    local = repacked[2]["webdataset", "single"]
    assert report["shards"] == local["shards"] and report["dropped_by_reason"] == local["dropped_by_reason"]
    for name in report["shards"]:
        assert fs.cat_file(f"cj-repack/out/{name}") == (root / "webdataset_single" / name).read_bytes()
    assert json.loads(fs.cat_file("cj-repack/out/repack_report.json"))["num_records"] == local["num_records"]
    assert not fs.exists("cj-repack/out/_repack_tmp")
