"""User data: contrastive_jax.data.convert (folder + CSV/JSONL captions, WebDataset shards, class
folders; skip report, bad-record limit, resume) loaded back by name, and the README's "Your own
data" path (folder + captions.csv -> `contrastive-jax data convert` -> `contrastive-jax train` ->
evaluation) end to end through the CLI.

The pipelines over converted data are tested in tests/data/test_pipeline.py, name resolution in
tests/data/test_registry.py."""
import csv
import io
import json
import os
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from contrastive_jax import cli, data
from contrastive_jax.data import convert as convert_lib
from data_test_helpers import jpeg, png, user_config

REPO = pathlib.Path(__file__).resolve().parents[2]
README_COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def test_folder_conversion_round_trip_and_skip_report(user_folder):
    root, files, captions, report = user_folder
    assert report["num_skipped"] == 5
    assert report["skipped_by_reason"] == {"empty_image": 1, "undecodable": 2, "empty_caption": 1,
                                           "missing_file": 1}
    assert {s["key"] for s in report["skipped"]} == {"zero.jpg", "text.jpg", "trunc.jpg",
                                                     "blank.png", "missing.jpg"}
    sources = data.build_dataset(user_config(root / "tfds", "my_pics"))
    seen = {}
    for split, src in sources.items():
        for i in range(len(src)):
            r = src[i]
            key = r["key"].decode()
            assert key not in seen
            seen[key] = split
            assert r["image"] == files[key]  # encoded bytes, byte-identical
            assert [c.decode() for c in r["captions"]] == captions[key]
    assert set(seen) == set(files)
    # Deterministic, hash-based split assignment.
    for key, split in seen.items():
        assert split == convert_lib.split_of(key, 0, 0.25, 0.0)
    assert report["num_records"] == {s: sum(v == s for v in seen.values()) for s in ("train", "test")}
    with pytest.raises(convert_lib.ConversionError, match="already exists"):
        convert_lib.convert(str(root / "imgs"), name="my_pics", data_dir=str(root / "tfds"),
                            captions=str(root / "captions.csv"), progress=False)


def test_too_many_bad_records_stop_conversion(user_folder, tmp_path):
    root = user_folder[0]
    with pytest.raises(convert_lib.ConversionError, match="5 of 41 records.*max_bad_fraction=0.05"):
        convert_lib.convert(str(root / "imgs"), name="strict", data_dir=str(tmp_path),
                            captions=str(root / "captions.csv"), progress=False)


def test_conversion_resumes_after_the_last_finished_chunk(user_folder, tmp_path, monkeypatch):
    root = user_folder[0]
    monkeypatch.setattr(convert_lib, "_CHUNK", 8)
    calls = []
    real = convert_lib._validate

    def failing(item):
        calls.append(item.key)
        if len(calls) == 20:
            raise KeyboardInterrupt  # the user stops the conversion in the third chunk
        return real(item)

    monkeypatch.setattr(convert_lib, "_validate", failing)
    kw = dict(name="resumed", data_dir=str(tmp_path), captions=str(root / "captions.csv"),
              test_fraction=0.25, max_bad_fraction=0.2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        convert_lib.convert(str(root / "imgs"), **kw)
    calls.clear()
    monkeypatch.setattr(convert_lib, "_validate", lambda item: calls.append(item.key) or real(item))
    report = convert_lib.convert(str(root / "imgs"), **kw)
    assert len(calls) == 41 - 16  # the two finished chunks were not validated again
    assert report["num_records"] == user_folder[3]["num_records"]


def test_jsonl_and_webdataset_conversion(tmp_path):
    rng = np.random.default_rng(1)
    os.makedirs(tmp_path / "j")
    blobs = {f"a{i}.png": png(rng) for i in range(6)}
    for name, blob in blobs.items():
        (tmp_path / "j" / name).write_bytes(blob)
    with open(tmp_path / "c.jsonl", "w") as f:
        for i, name in enumerate(blobs):
            f.write(json.dumps({"image": name, "captions": [f"cap {i}", f"other {i}"]}) + "\n")
    rep = convert_lib.convert(str(tmp_path / "j"), name="jl", data_dir=str(tmp_path / "d"),
                              captions=str(tmp_path / "c.jsonl"), test_fraction=0.0, progress=False)
    src = data.build_dataset(user_config(tmp_path / "d", "jl"))["train"]
    got = {src[i]["key"].decode(): (src[i]["image"], src[i]["captions"]) for i in range(len(src))}
    assert rep["num_skipped"] == 0 and set(got) == set(blobs)
    for i, name in enumerate(blobs):
        assert got[name] == (blobs[name], [f"cap {i}".encode(), f"other {i}".encode()])

    # WebDataset shard: KEY.jpg + KEY.txt / KEY.json; one corrupt image, one without caption.
    shard = tmp_path / "shard-000.tar"
    want = {}
    with tarfile.open(shard, "w") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for i in range(5):
            img = jpeg(rng)
            add(f"s/{i:04d}.jpg", img)
            if i % 2:
                add(f"s/{i:04d}.json", json.dumps({"caption": f"json {i}"}).encode())
                want[f"shard-000.tar/s/{i:04d}"] = (img, [b"json %d" % i])
            else:
                add(f"s/{i:04d}.txt", b"text %d" % i)
                want[f"shard-000.tar/s/{i:04d}"] = (img, [b"text %d" % i])
        add("s/bad.jpg", b"\xff\xd8garbage")
        add("s/bad.txt", b"x")
        add("s/nocap.jpg", jpeg(rng))
    rep = convert_lib.convert(str(shard), name="wds", data_dir=str(tmp_path / "d"), format="webdataset",
                              test_fraction=0.0, max_bad_fraction=0.5, progress=False)
    assert rep["skipped_by_reason"] == {"undecodable": 1, "empty_caption": 1}
    src = data.build_dataset(user_config(tmp_path / "d", "wds"))["train"]
    got = {src[i]["key"].decode(): (src[i]["image"], src[i]["captions"]) for i in range(len(src))}
    assert got == want


def test_class_folders_give_labels_and_zero_shot_info(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("golden_retriever", "cat"):
        os.makedirs(tmp_path / "tree" / cls)
        for i in range(3):
            (tmp_path / "tree" / cls / f"{i}.png").write_bytes(png(rng))
    convert_lib.convert(str(tmp_path / "tree"), name="pets", data_dir=str(tmp_path / "d"),
                        format="classes", test_fraction=0.0, progress=False)
    cfg = user_config(tmp_path / "d", "pets")
    info = data.dataset_info(cfg)
    assert info["class_names"] == {"label": ["cat", "golden retriever"]}  # sorted folder names
    assert info["label_keys"] == ("label",) and info["templates"]["label"] == ["a photo of a {}."]
    tok = data.build_tokenizer(cfg)
    ev = data.load_eval_arrays(cfg, "train", tokenizer=tok)
    keys = [r["key"].decode() for r in (data.build_dataset(cfg)["train"][i] for i in range(6))]
    np.testing.assert_array_equal(ev["label"], [0 if k.startswith("cat/") else 1 for k in keys])
    assert ev["caption"] == ["a photo of a " + ("cat." if k.startswith("cat/") else "golden retriever.")
                             for k in keys]


# ---------------------------------------------------------------------------------------------
# The README path, end to end through the CLI
# ---------------------------------------------------------------------------------------------


def test_readme_path_folder_to_trained_and_evaluated_model(tmp_path):
    """Folder of images + captions.csv -> `data convert` -> `train` (quickstart tiny, one override
    for the dataset) -> evaluation (retrieval only: the dataset has no class labels)."""
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "photos")
    rows = []
    for i in range(60):
        name = list(README_COLORS)[i % 3]
        img = np.clip(np.array(README_COLORS[name]) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
        fname = f"p{i:03d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(img).save(tmp_path / "photos" / fname)
        rows.append((fname, f"a {name} photo"))
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    rows.append(("broken.jpg", "a broken photo"))
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])

    tfds_dir = str(tmp_path / "tfds")
    rc = cli.main(["data", "convert", str(tmp_path / "photos"), "--captions", str(tmp_path / "captions.csv"),
                   "--name", "my_photos", "--data-dir", tfds_dir, "--test-fraction", "0.2",
                   "--no-progress"])
    assert rc == 0
    workdir = tmp_path / "run"
    rc = cli.main(["train", "--config", f"{REPO / 'configs' / 'quickstart.py'}:tiny", "--workdir", str(workdir),
                   "--config.data.name=my_photos", f"--config.data.data_dir={tfds_dir}",
                   # Speed only: 2 small steps.
                   "--config.train.total_steps=2", "--config.eval.every_steps=0",
                   "--config.train.batch_size=16", "--config.loss.impl=dense",
                   "--config.log.progress=False", "--config.log.tensorboard=False"])
    assert rc == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 2
    ev = summary["eval"]
    n_test = ev["num_examples"]
    assert n_test > 0 and not any(k.startswith("zeroshot/") for k in ev)
    for k in ("retrieval/image_to_text/R@1", "retrieval/text_to_image/R@1"):
        assert 0.0 <= ev[k] <= 1.0
    # The saved tokenizer tokenizes exactly like the one the run built from the config.
    saved = data.load_tokenizer(workdir / "tokenizer.json")
    cfg = json.loads((workdir / "config.json").read_text())["data"]
    assert cfg["name"] == "my_photos"
    built = data.WordTokenizer.from_texts(["a red photo", "a green photo", "a blue photo"], saved.max_len)
    np.testing.assert_array_equal(saved.encode(["a blue photo", "a broken photo"]),
                                  built.encode(["a blue photo", "a broken photo"]))
