"""Caption files and the conversion cache (issue 17, defects 3 and 4).

Caption files: encoding detected (UTF-8, BOM, cp1252 / latin-1 fallback, reported) or given,
fields of any length, errors naming FILE:LINE, every dropped row counted by reason, empty class
folders not classes. Cache: keyed by content, so an edited caption or a fixed image is never
mixed with stale staged records; ``overwrite`` clears it; a killed TFDS write is cleaned up.
``data convert`` prints only JSON on stdout.
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from contrastive_jax import cli, data
from contrastive_jax.data import convert as convert_lib
from data_test_helpers import png, user_config


def _images(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    blobs = {f"img{i:03d}.png": png(rng, 12, 12) for i in range(n)}
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    return blobs


def _records(data_dir, name):
    """{key: [captions]} over every split of a converted dataset."""
    out = {}
    for src in data.build_dataset(user_config(data_dir, name)).values():
        for i in range(len(src)):
            r = src[i]
            out[r["key"].decode()] = [c.decode() for c in r["captions"]]
    return out


def _convert(tmp_path, captions, name, **kw):
    kw = dict(dict(name=name, data_dir=str(tmp_path / "d"), captions=str(captions), test_fraction=0.0,
                   max_bad_fraction=0.5, progress=False), **kw)
    return convert_lib.convert(str(tmp_path / "imgs"), **kw)


# ---------------------------------------------------------------------------------------------
# Caption files
# ---------------------------------------------------------------------------------------------


def test_cp1252_file_is_detected_and_reported(tmp_path):
    _images(tmp_path / "imgs", 3)
    (tmp_path / "c.csv").write_bytes(b"image,caption\nimg000.png,caf\xe9 cr\xe8me\nimg001.png,plain\n"
                                     b"img002.png,\x93quoted\x94\n")
    report = _convert(tmp_path, tmp_path / "c.csv", "cp")
    assert report["captions_encoding"].startswith("cp1252 (detected: line 2 is not valid UTF-8")
    assert _records(tmp_path / "d", "cp") == {"img000.png": ["café crème"], "img001.png": ["plain"],
                                              "img002.png": ["\u201cquoted\u201d"]}


def test_byte_undefined_in_cp1252_falls_back_to_latin1(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"image,caption\na.png,x\x81y\n")
    codec, described = convert_lib.detect_encoding(str(path))
    assert codec == "latin-1" and "line 2" in described
    assert convert_lib.read_captions(str(path)).by_image == {"a.png": ["x\x81y"]}


def test_given_encoding_that_does_not_fit_names_file_and_line(tmp_path, capsys):
    _images(tmp_path / "imgs", 2)
    path = tmp_path / "c.csv"
    path.write_bytes(b"image,caption\nimg000.png,fine\nimg001.png,caf\xe9\n")
    with pytest.raises(convert_lib.ConversionError, match=rf"{path}:3: cannot decode as utf-8.*--encoding"):
        _convert(tmp_path, path, "enc", encoding="utf-8")
    # The CLI: one line, exit 2, nothing on stdout.
    rc = cli.main(["data", "convert", str(tmp_path / "imgs"), "--captions", str(path), "--name", "enc",
                   "--data-dir", str(tmp_path / "d"), "--encoding", "utf-8", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and f"{path}:3" in err
    with pytest.raises(convert_lib.ConversionError, match="not a known text encoding"):
        convert_lib.read_captions(str(path), "no-such-codec")
    assert convert_lib.read_captions(str(path), "cp1252").by_image["img001.png"] == ["café"]


def test_utf8_bom_header_is_accepted(tmp_path):
    _images(tmp_path / "imgs", 2)
    path = tmp_path / "excel.csv"
    path.write_bytes("image,caption\r\nimg000.png,ünïcode\r\nimg001.png,b\r\n".encode("utf-8-sig"))
    report = _convert(tmp_path, path, "bom")
    assert report["captions_encoding"] == "utf-8-sig (byte-order mark)"
    assert _records(tmp_path / "d", "bom") == {"img000.png": ["ünïcode"], "img001.png": ["b"]}


def test_long_fields_tsv_and_dropped_rows_counted_with_lines(tmp_path):
    _images(tmp_path / "imgs", 4)
    long_caption = "word " * 60_000  # 300,000 characters: over csv's default 131,072 limit
    limit_before = csv.field_size_limit()
    path = tmp_path / "c.tsv"
    path.write_text("image\tcaption\n"
                    f"img000.png\t{long_caption}\n"
                    "img001.png\t   \n"              # whitespace only: dropped, and img001 has no other
                    "img002.png\t5\" screen\n"       # TSV: no quoting
                    "img002.png\t\t\n"               # empty caption
                    "\tno image\n"                  # no image name
                    "img003.png\n"                  # short row
                    "img003.png\tok\n", encoding="utf-8")
    rows = convert_lib.read_captions(str(path))
    assert csv.field_size_limit() == limit_before  # the raised limit is not left behind
    assert rows.dropped == {"empty_caption": 2, "no_image": 1, "missing_field": 1}
    assert rows.first_dropped == [{"line": "c.tsv:3", "reason": "empty_caption"},
                                  {"line": "c.tsv:5", "reason": "empty_caption"},
                                  {"line": "c.tsv:6", "reason": "no_image"},
                                  {"line": "c.tsv:7", "reason": "missing_field"}]
    report = _convert(tmp_path, path, "long")
    assert report["caption_rows_dropped"] == 4
    assert report["caption_rows_dropped_by_reason"] == {"empty_caption": 2, "no_image": 1, "missing_field": 1}
    assert report["skipped_by_reason"] == {"empty_caption": 1}  # img001: no caption left
    recs = _records(tmp_path / "d", "long")
    assert recs["img000.png"] == [long_caption.strip()] and recs["img002.png"] == ['5" screen']
    assert set(recs) == {"img000.png", "img002.png", "img003.png"}


def test_malformed_csv_and_jsonl_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('image,caption\na.png,fine\nb.png,"never closed\nc.png,x\n', encoding="utf-8")
    with pytest.raises(convert_lib.ConversionError, match=rf"{bad}:3: malformed CSV: a quoted field opened"):
        convert_lib.read_captions(str(bad))
    header = tmp_path / "header.csv"
    header.write_text("file_name,text\na.png,x\n", encoding="utf-8")
    with pytest.raises(convert_lib.ConversionError, match=rf"{header}:1: the header must name"):
        convert_lib.read_captions(str(header))
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png", "caption": "  "}\n{"image": \n',
                  encoding="utf-8")
    with pytest.raises(convert_lib.ConversionError, match=rf"{jl}:4: need an object"):
        convert_lib.read_captions(str(jl))
    jl.write_text('{"image": "a.png", "captions": ["x", " ", null]}\n', encoding="utf-8")
    rows = convert_lib.read_captions(str(jl))
    assert rows.by_image == {"a.png": ["x"]} and rows.dropped == {"empty_caption": 1, "missing_field": 1}


def test_empty_class_folder_is_not_a_class(tmp_path):
    rng = np.random.default_rng(3)
    for cls, n in (("cat", 2), ("dog", 2), ("empty", 0), (".ipynb_checkpoints", 0)):
        os.makedirs(tmp_path / "tree" / cls)
        for i in range(n):
            (tmp_path / "tree" / cls / f"{i}.png").write_bytes(png(rng, 12, 12))
    (tmp_path / "tree" / "empty" / "notes.txt").write_text("not an image")
    report = convert_lib.convert(str(tmp_path / "tree"), name="pets2", data_dir=str(tmp_path / "d"),
                                 format="classes", test_fraction=0.0, progress=False)
    assert report["ignored_folders"] == [".ipynb_checkpoints", "empty"]
    assert data.dataset_info(user_config(tmp_path / "d", "pets2"))["class_names"] == {"label": ["cat", "dog"]}


# ---------------------------------------------------------------------------------------------
# The conversion cache
# ---------------------------------------------------------------------------------------------


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])


def test_edited_captions_after_an_interrupted_run_never_mix(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_lib, "_CHUNK", 4)
    _images(tmp_path / "imgs", 12)
    path = tmp_path / "c.csv"
    _write_csv(path, [(f"img{i:03d}.png", f"old caption {i}") for i in range(12)])
    calls, real = [], convert_lib._validate

    def killed(item):  # the run dies in the third chunk (as under SIGKILL: two chunks staged)
        calls.append(item.key)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(item)

    monkeypatch.setattr(convert_lib, "_validate", killed)
    with pytest.raises(KeyboardInterrupt):
        _convert(tmp_path, path, "mixed")
    staging = tmp_path / "d" / ".staging" / "mixed"
    assert len([f for f in os.listdir(staging) if f.endswith(".pkl")]) == 2
    # A killed TFDS write of an earlier attempt left its folder behind.
    os.makedirs(tmp_path / "d" / "mixed" / "incomplete.ABC123_1.0.0")
    (tmp_path / "d" / "mixed" / "incomplete.ABC123_1.0.0" / "part").write_bytes(b"x" * 100)

    # The user edits the captions of the first chunk's images only, then runs again.
    _write_csv(path, [(f"img{i:03d}.png", f"{'new' if i < 4 else 'old'} caption {i}") for i in range(12)])
    calls.clear()
    monkeypatch.setattr(convert_lib, "_validate", lambda item: calls.append(item.key) or real(item))
    report = _convert(tmp_path, path, "mixed")
    # Chunk 0 changed -> validated again; chunk 1 unchanged -> reused; chunk 2 never finished.
    assert sorted(calls) == [f"img{i:03d}.png" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert _records(tmp_path / "d", "mixed") == {
        f"img{i:03d}.png": [f"{'new' if i < 4 else 'old'} caption {i}"] for i in range(12)}
    assert report["removed_incomplete_writes"] == ["incomplete.ABC123_1.0.0"]
    assert not os.path.exists(tmp_path / "d" / "mixed" / "incomplete.ABC123_1.0.0")
    assert not staging.exists()  # the staging is removed once the dataset is written


def test_added_missing_files_and_replaced_images_are_seen(tmp_path):
    blobs = _images(tmp_path / "imgs", 6)
    for name in ("img004.png", "img005.png"):
        os.remove(tmp_path / "imgs" / name)
    path = tmp_path / "c.csv"
    _write_csv(path, [(name, f"caption {name}") for name in blobs])
    kw = dict(max_bad_fraction=0.1)
    with pytest.raises(convert_lib.ConversionError, match="2 of 6 records"):  # staged, nothing written
        _convert(tmp_path, path, "fixme", **kw)
    for name in ("img004.png", "img005.png"):
        (tmp_path / "imgs" / name).write_bytes(blobs[name])
    report = _convert(tmp_path, path, "fixme", **kw)
    assert report["num_skipped"] == 0 and report["skipped_by_reason"] == {}
    assert set(_records(tmp_path / "d", "fixme")) == set(blobs)

    # A replaced image (same name, new content) with --overwrite: the dataset holds the new bytes.
    new = png(np.random.default_rng(99), 16, 16)
    (tmp_path / "imgs" / "img000.png").write_bytes(new)
    _convert(tmp_path, path, "fixme", overwrite=True, **kw)
    src = data.build_dataset(user_config(tmp_path / "d", "fixme"))["train"]
    images = {src[i]["key"].decode(): src[i]["image"] for i in range(len(src))}
    assert images["img000.png"] == new and images["img001.png"] == blobs["img001.png"]


def test_overwrite_clears_the_staging_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_lib, "_CHUNK", 2)
    _images(tmp_path / "imgs", 4)
    path = tmp_path / "c.csv"
    _write_csv(path, [(f"img{i:03d}.png", f"c {i}") for i in range(4)])
    staging = tmp_path / "d" / ".staging" / "ow"
    os.makedirs(staging)
    # A chunk with a name the cache would look for, holding records the source does not have.
    items = sorted(convert_lib._folder_items(str(tmp_path / "imgs"), convert_lib.read_captions(str(path))),
                   key=lambda it: it.key)
    name = convert_lib._chunk_name(0, items[:2], json.dumps(["folder", "a photo of a {}."]))
    import pickle

    with open(staging / name, "wb") as f:
        pickle.dump(([{"key": "img000.png", "image": png(np.random.default_rng(5)), "captions": ["planted"],
                       "label": -1}], []), f)
    _convert(tmp_path, path, "ow", overwrite=True)
    assert _records(tmp_path / "d", "ow")["img000.png"] == ["c 0"]


def test_a_second_conversion_of_the_same_name_is_refused(tmp_path):
    staging = tmp_path / "d" / ".staging" / "busy"
    with convert_lib._conversion_lock(str(staging) + ".lock", "busy"):
        _images(tmp_path / "imgs", 1)
        (tmp_path / "c.csv").write_text("image,caption\nimg000.png,x\n", encoding="utf-8")
        with pytest.raises(convert_lib.ConversionError, match=rf"another conversion of dataset 'busy'.*pid {os.getpid()}"):
            _convert(tmp_path, tmp_path / "c.csv", "busy")


def test_cli_stdout_is_json_only(tmp_path):
    _images(tmp_path / "imgs", 3)
    (tmp_path / "c.csv").write_text("image,caption\nimg000.png,a\nimg001.png,b\nimg002.png,c\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "contrastive_jax.cli", "data", "convert", str(tmp_path / "imgs"),
                           "--captions", str(tmp_path / "c.csv"), "--name", "js", "--data-dir", str(tmp_path / "d"),
                           "--test-fraction", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # nothing but the JSON report
    assert report["num_records"] == {"train": 3} and report["captions_encoding"] == "utf-8"
    assert "Dataset js downloaded and prepared" in proc.stderr  # TFDS's own lines went to stderr
