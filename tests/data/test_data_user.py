"""User data: conversion to TFDS (three layouts), loading by name, augmentation, views, extra
features, bad-record counting, and the README path (convert -> train -> evaluate) end to end."""
import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from contrastive_jax import data
from contrastive_jax.data import convert as convert_lib
from contrastive_jax.data.pipeline import SKIP_REASONS, DataQualityError
from contrastive_jax.train.config import default_config

N_GOOD = 36


def _png(rng, h=28, w=36):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rng, h=30, w=30):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_folder(root):
    """36 good images (PNG/JPEG, 1-2 captions each) + 5 bad records; returns expected dicts."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "imgs")
    files, captions, rows = {}, {}, []
    for i in range(N_GOOD):
        name = f"im{i:02d}.{'png' if i % 2 else 'jpg'}"
        blob = _png(rng, 24 + i % 9) if i % 2 else _jpeg(rng, 30, 24 + i % 7)
        (root / "imgs" / name).write_bytes(blob)
        files[name] = blob
        caps = [f"a photo number {i}"] + ([f"  Second   caption {i} "] if i % 3 == 0 else [])
        captions[name] = [c.strip() for c in caps]
        rows += [(name, c) for c in caps]
    good_jpeg = files["im00.jpg"]
    (root / "imgs" / "zero.jpg").write_bytes(b"")
    (root / "imgs" / "text.jpg").write_bytes(b"this is not an image")
    (root / "imgs" / "trunc.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "imgs" / "blank.png").write_bytes(_png(rng))
    rows += [("zero.jpg", "zero"), ("text.jpg", "text"), ("trunc.jpg", "trunc"),
             ("blank.png", " \t "), ("missing.jpg", "gone")]
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return files, captions


def _cfg(data_dir, name, **overrides):
    c = default_config().data
    c.name, c.data_dir, c.image_size = name, str(data_dir), 24
    for k, v in overrides.items():
        if isinstance(v, dict):
            c[k].update(v)
        else:
            c[k] = v
    return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    files, captions = _write_folder(root)
    report = convert_lib.convert(str(root / "imgs"), name="my_pics", data_dir=str(root / "tfds"),
                                 captions=str(root / "captions.csv"), test_fraction=0.25,
                                 max_bad_fraction=0.2, progress=False)
    return root, files, captions, report


def test_folder_conversion_round_trip_and_skip_report(folder):
    root, files, captions, report = folder
    assert report["num_skipped"] == 5
    assert report["skipped_by_reason"] == {"empty_image": 1, "undecodable": 2, "empty_caption": 1,
                                           "missing_file": 1}
    assert {s["key"] for s in report["skipped"]} == {"zero.jpg", "text.jpg", "trunc.jpg",
                                                     "blank.png", "missing.jpg"}
    sources = data.build_dataset(_cfg(root / "tfds", "my_pics"))
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


def test_too_many_bad_records_stop_conversion(folder, tmp_path):
    root = folder[0]
    with pytest.raises(convert_lib.ConversionError, match="5 of 41 records.*max_bad_fraction=0.05"):
        convert_lib.convert(str(root / "imgs"), name="strict", data_dir=str(tmp_path),
                            captions=str(root / "captions.csv"), progress=False)


def test_conversion_resumes_after_the_last_finished_chunk(folder, tmp_path, monkeypatch):
    root = folder[0]
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
    assert report["num_records"] == folder[3]["num_records"]


def test_jsonl_and_webdataset_conversion(tmp_path):
    rng = np.random.default_rng(1)
    os.makedirs(tmp_path / "j")
    blobs = {f"a{i}.png": _png(rng) for i in range(6)}
    for name, blob in blobs.items():
        (tmp_path / "j" / name).write_bytes(blob)
    with open(tmp_path / "c.jsonl", "w") as f:
        for i, name in enumerate(blobs):
            f.write(json.dumps({"image": name, "captions": [f"cap {i}", f"other {i}"]}) + "\n")
    rep = convert_lib.convert(str(tmp_path / "j"), name="jl", data_dir=str(tmp_path / "d"),
                              captions=str(tmp_path / "c.jsonl"), test_fraction=0.0, progress=False)
    src = data.build_dataset(_cfg(tmp_path / "d", "jl"))["train"]
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
            img = _jpeg(rng)
            add(f"s/{i:04d}.jpg", img)
            if i % 2:
                add(f"s/{i:04d}.json", json.dumps({"caption": f"json {i}"}).encode())
                want[f"shard-000.tar/s/{i:04d}"] = (img, [b"json %d" % i])
            else:
                add(f"s/{i:04d}.txt", b"text %d" % i)
                want[f"shard-000.tar/s/{i:04d}"] = (img, [b"text %d" % i])
        add("s/bad.jpg", b"\xff\xd8garbage")
        add("s/bad.txt", b"x")
        add("s/nocap.jpg", _jpeg(rng))
    rep = convert_lib.convert(str(shard), name="wds", data_dir=str(tmp_path / "d"), format="webdataset",
                              test_fraction=0.0, max_bad_fraction=0.5, progress=False)
    assert rep["skipped_by_reason"] == {"undecodable": 1, "empty_caption": 1}
    src = data.build_dataset(_cfg(tmp_path / "d", "wds"))["train"]
    got = {src[i]["key"].decode(): (src[i]["image"], src[i]["captions"]) for i in range(len(src))}
    assert got == want


def test_class_folders_give_labels_and_zero_shot_info(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("golden_retriever", "cat"):
        os.makedirs(tmp_path / "tree" / cls)
        for i in range(3):
            (tmp_path / "tree" / cls / f"{i}.png").write_bytes(_png(rng))
    convert_lib.convert(str(tmp_path / "tree"), name="pets", data_dir=str(tmp_path / "d"),
                        format="classes", test_fraction=0.0, progress=False)
    cfg = _cfg(tmp_path / "d", "pets")
    info = data.dataset_info(cfg)
    assert info["class_names"] == {"label": ["cat", "golden retriever"]}  # sorted folder names
    assert info["label_keys"] == ("label",) and info["templates"]["label"] == ["a photo of a {}."]
    tok = data.build_tokenizer(cfg)
    ev = data.load_eval_arrays(cfg, "train", tokenizer=tok)
    keys = [r["key"].decode() for r in (data.build_dataset(cfg)["train"][i] for i in range(6))]
    np.testing.assert_array_equal(ev["label"], [0 if k.startswith("cat/") else 1 for k in keys])
    assert ev["caption"] == ["a photo of a " + ("cat." if k.startswith("cat/") else "golden retriever.")
                             for k in keys]


def _reference_image(blob, size):
    """Independent eval transform: shorter side -> size (bicubic), centre crop."""
    img = Image.open(io.BytesIO(blob)).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    l, t = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((l, t, l + size, t + size)))


def test_user_pipeline_eval_arrays_match_reference(folder):
    root, files, captions, _ = folder
    cfg = _cfg(root / "tfds", "my_pics", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    tok = data.build_tokenizer(cfg)
    ev = data.load_eval_arrays(cfg, "test", tokenizer=tok)
    src = data.build_dataset(cfg)["test"]
    keys = [src[i]["key"].decode() for i in range(len(src))]
    want = np.stack([_reference_image(files[k], 24) for k in keys]) / 255.0
    np.testing.assert_allclose(ev["image"], (want - np.array(cfg.mean)) / np.array(cfg.std), atol=1e-5)
    assert ev["caption"] == [captions[k][0] for k in keys]
    # The vocabulary holds the TRAIN captions' words; test-only words are unknown.
    assert tok.decode(ev["text"]) == [" ".join(w if w in tok else "<unk>" for w in
                                               data.split_words(captions[k][0])) for k in keys]


SIMCLR = dict(crop="random_resized_crop", flip_prob=0.5, jitter_prob=0.8, grayscale_prob=0.2,
              blur_prob=0.5, solarize_prob=0.2)


def test_views_are_augmented_deterministically_and_resume_exactly(folder):
    root = folder[0]
    cfg = _cfg(root / "tfds", "my_pics", num_views=3, augment=SIMCLR, text_mask_prob=0.3)
    tok = data.build_tokenizer(cfg)

    def it(seed=0):
        return data.make_train_iterator(cfg, tokenizer=tok, global_batch_size=8, seed=seed,
                                        process_index=0, process_count=1)

    a = [next(x) for x in [it()] for _ in range(3)]
    b0 = a[0]
    assert set(b0) == {"image", "text", "image_views"}
    assert b0["image_views"].shape == (8, 3, 24, 24, 3) and b0["image_views"].dtype == np.float32
    assert b0["image"].shape == (8, 24, 24, 3) and b0["image"].dtype == np.float32
    np.testing.assert_array_equal(b0["image"], b0["image_views"][:, 0])
    assert not np.allclose(b0["image_views"][:, 0], b0["image_views"][:, 1])  # views differ
    for x, y in zip(a, [next(i) for i in [it()] for _ in range(3)]):  # same seed: same stream
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = next(it(seed=1))
    assert not np.allclose(other["image_views"], b0["image_views"])
    # Exact continuation mid-epoch (27 train records, batch 8), counters included.
    first = it()
    [next(first) for _ in range(2)]
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(3)]
    resumed = it()
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(3)]):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert resumed.stats() == first.stats()
    # Token masking: only content positions change, and only into the mask id.
    unmasked = next(data.make_train_iterator(
        _cfg(root / "tfds", "my_pics", num_views=3, augment=SIMCLR), tokenizer=tok,
        global_batch_size=8, process_index=0, process_count=1))
    changed = unmasked["text"] != b0["text"]
    assert changed.any()
    assert (b0["text"][changed] == tok.mask_id).all()
    assert not np.isin(unmasked["text"][changed], [tok.eos_id, tok.pad_id]).any()
    np.testing.assert_array_equal(unmasked["image_views"], b0["image_views"])


def _memory_entry(records, **kw):
    return data.DatasetEntry(prepare=lambda c: {"train": records, "test": records[:4]},
                             vocabulary_texts=lambda c: ["a", "b", "c"], key_field="key", **kw)


def _records(n, bad=()):
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        blob = _png(rng, 20, 20)
        if i in bad:
            blob = b"" if i % 2 else b"garbage"
        out.append({"image": blob, "caption": "a b c"[: 1 + 2 * (i % 3)], "key": f"r{i}",
                    "signal": np.arange(5, dtype=np.float32) + i, "group": np.int64(i // 4)})
    return out


def test_extra_features_pass_through_stacked(tmp_path):
    recs = _records(16)
    data.register_dataset("_extras", _memory_entry(recs, extra_features=("signal", "group")))
    try:
        cfg = _cfg(tmp_path, "_extras", image_size=20)
        tok = data.build_tokenizer(cfg)
        b = next(data.make_train_iterator(cfg, tokenizer=tok, global_batch_size=8, process_index=0,
                                          process_count=1))
        assert b["signal"].shape == (8, 5) and b["signal"].dtype == np.float32
        assert b["group"].shape == (8,) and b["group"].dtype == np.int64
        for row in range(8):  # each row's extras belong to the row's record (signal[0] = index)
            i = int(b["signal"][row, 0])
            np.testing.assert_array_equal(b["signal"][row], recs[i]["signal"])
            assert b["group"][row] == i // 4
        ev = data.load_eval_arrays(cfg, "test", tokenizer=tok)
        np.testing.assert_array_equal(ev["signal"], np.stack([r["signal"] for r in recs[:4]]))
    finally:
        data.registry._DATASETS.pop("_extras")


def test_bad_records_at_load_time_are_replaced_and_counted(tmp_path):
    bad = {1, 4, 9}  # zero-byte (odd) and non-image bytes (even)
    recs = _records(40, bad)
    data.register_dataset("_bad", _memory_entry(recs, extra_features=("signal",)))
    try:
        cfg = _cfg(tmp_path, "_bad", image_size=20, max_bad_fraction=0.1)
        tok = data.build_tokenizer(cfg)
        it = data.make_train_iterator(cfg, tokenizer=tok, global_batch_size=8, process_index=0,
                                      process_count=1)
        rows = [int(r) for _ in range(5) for r in next(it)["signal"][:, 0]]  # one epoch
        assert not set(rows) & bad  # bad records never reach a batch
        s = it.stats()
        assert s["data/records_read"] == 40 and s["data/skipped"] == 3
        assert s["data/skipped/empty_image"] == 2 and s["data/skipped/undecodable"] == 1
        assert set(SKIP_REASONS) >= {k.split("/")[-1] for k in s if k.startswith("data/skipped/")}
        strict = _cfg(tmp_path, "_bad", image_size=20, max_bad_fraction=0.01)
        it = data.make_train_iterator(strict, tokenizer=tok, global_batch_size=8, process_index=0,
                                      process_count=1)
        with pytest.raises(DataQualityError, match="max_bad_fraction=0.01"):
            for _ in range(20):
                next(it)
    finally:
        data.registry._DATASETS.pop("_bad")


def test_whitespace_caption_is_skipped(tmp_path):
    recs = _records(12)
    recs[3]["caption"] = "  \n "
    data.register_dataset("_ws", _memory_entry(recs, extra_features=("signal",)))
    try:
        cfg = _cfg(tmp_path, "_ws", image_size=20, max_bad_fraction=0.2)
        it = data.make_train_iterator(cfg, tokenizer=data.build_tokenizer(cfg), global_batch_size=4,
                                      process_index=0, process_count=1)
        rows = [int(r) for _ in range(3) for r in next(it)["signal"][:, 0]]
        assert 3 not in rows and it.stats()["data/skipped/empty_caption"] == 1
    finally:
        data.registry._DATASETS.pop("_ws")


def test_user_hosts_are_disjoint_and_cover(folder):
    root = folder[0]
    cfg = _cfg(root / "tfds", "my_pics")
    tok = data.build_tokenizer(cfg)
    n_train = len(data.build_dataset(cfg)["train"])
    g = 4
    steps = n_train // g
    single = [next(it) for it in [data.make_train_iterator(cfg, tokenizer=tok, global_batch_size=g,
                                                           process_index=0, process_count=1)]
              for _ in range(steps)]
    hosts = []
    for p in range(2):
        it = data.make_train_iterator(cfg, tokenizer=tok, global_batch_size=g, process_index=p,
                                      process_count=2)
        hosts.append([next(it) for _ in range(steps)])
    for s in range(steps):
        np.testing.assert_array_equal(np.concatenate([h[s]["image"] for h in hosts]), single[s]["image"])
    rows = {r.tobytes() for b in single for r in b["image"]}
    assert len(rows) == steps * g  # no record twice within the epoch's batches


def test_tfrecord_dataset_needs_the_tf_extra(folder, tmp_path):
    import shutil
    import sys

    if "tensorflow" in sys.modules or __import__("importlib").util.find_spec("tensorflow"):
        pytest.skip("TensorFlow is installed here, so the missing-extra message cannot be shown")
    root = folder[0]
    shutil.copytree(root / "tfds" / "my_pics", tmp_path / "tfr_pics")
    info_path = tmp_path / "tfr_pics" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info["name"] = "tfr_pics"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ImportError, match=r"contrastive_jax\[tf\]"):
        data.build_dataset(_cfg(tmp_path, "tfr_pics"))


def test_unknown_name_names_the_field_and_data_dir(tmp_path):
    with pytest.raises(ValueError, match=r"config.data.name='nope'.*data convert"):
        data.build_dataset(_cfg(tmp_path, "nope"))
