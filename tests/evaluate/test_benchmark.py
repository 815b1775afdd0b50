"""``contrastive-jax benchmark`` (issue 20): datasets by name from TFDS array_record folders and
CLIP_benchmark WebDataset exports, checked against numpy computations of the metrics on the
embeddings of the unsharded notebook API; missing datasets listed; CSV columns; 8 devices = 1."""
import csv
import io
import json
import os
import sys
import tarfile

import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from contrastive_jax import data
from contrastive_jax.evaluate.benchmark import datasets as bds
from contrastive_jax.evaluate.benchmark import runner, table
from contrastive_jax.train.builder import build_model
from contrastive_jax.train.config import load_config
from contrastive_jax.train.restore import write_model_dir

RNG = np.random.default_rng(0)
# Words of the shapes vocabulary (the tiny run's tokenizer), so prompts do not collapse to <unk>.
CLASSES = ["red", "green", "blue", "yellow", "circle", "square"]
TEMPLATES = ["a {} shape", "{}"]


def _png(rng, size=(20, 24), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path, samples):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, payload in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _tfds_dataset(data_dir, name, features, examples, split="test"):
    """A TFDS array_record dataset written by TFDS's own writer (no TensorFlow)."""
    import tensorflow_datasets as tfds

    class Fixture(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            from etils import epath
            return epath.Path(__file__)

        def __init__(self, **kw):
            self.name = name
            super().__init__(**kw)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples()}

        def _generate_examples(self):
            yield from ((str(i), ex) for i, ex in enumerate(examples))

    b = Fixture(data_dir=str(data_dir), file_format="array_record")
    b.download_and_prepare(file_format="array_record", download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return os.fspath(b.data_dir)


def _as_tfrecord(folder) -> list[str]:
    """Rewrites a TFDS array_record dataset as TFRecord, the format `tfds build` writes by default:
    the same serialized examples (TFDS's), framed by the ``tfrecord`` package (an independent
    writer of the length / masked-CRC framing) under TFDS's TFRecord file names."""
    import glob
    import struct

    from array_record.python.array_record_module import ArrayRecordReader

    tfrecord = pytest.importorskip("tfrecord", reason="the tfrecord package frames the TFRecord fixtures")
    mask = tfrecord.TFRecordWriter.masked_crc
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.array_record-*"))):
        reader = ArrayRecordReader(path)
        raws = reader.read_all()
        reader.close()
        out.append(path.replace(".array_record-", ".tfrecord-"))
        with open(out[-1], "wb") as fh:
            for raw in raws:
                head = struct.pack("<Q", len(raw))
                fh.write(head + mask(head) + raw + mask(raw))
        os.remove(path)
    info_path = os.path.join(folder, "dataset_info.json")
    info = json.load(open(info_path))
    info["fileFormat"] = "tfrecord"
    json.dump(info, open(info_path, "w"))
    return out


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A tiny random model directory plus, on disk: a CLIP_benchmark classification export
    (``cifar10``, 2 shards, its own classnames/templates), a retrieval export (``mscoco_captions``,
    5 captions per image), a TFDS array_record classification set under an arbitrary name and a
    TFDS ``coco_captions`` (captions/text), the same two TFDS datasets in TFRecord format, and a
    TFRecord one with a corrupt frame."""
    import tensorflow_datasets as tfds

    root = tmp_path_factory.mktemp("bench")
    cfg = load_config("configs/quickstart.py:tiny", [f"data.data_dir={root / 'shapes'}"])
    tok = data.build_tokenizer(cfg.data)
    built = build_model(cfg, tok)
    abstract = jax.eval_shape(lambda *xs: built.model.init(jax.random.key(0), *xs), *built.inputs)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), nn.meta.unbox(abstract))
    run = write_model_dir(str(root / "run"), cfg, params, tok)

    wds = root / "wds"
    labels = rng.integers(0, len(CLASSES), 22)
    # half WebP (clip_benchmark_export_wds's default image format), half PNG
    samples = [(f"s{i:03d}", {"webp" if i % 2 else "png": _png(rng, fmt="WEBP" if i % 2 else "PNG"),
                              "cls": str(int(y)).encode()}) for i, y in enumerate(labels)]
    _tar(str(wds / "wds_vtab-cifar10" / "test" / "0.tar"), samples[:13])
    _tar(str(wds / "wds_vtab-cifar10" / "test" / "1.tar"), samples[13:])
    (wds / "wds_vtab-cifar10" / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (wds / "wds_vtab-cifar10" / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    words = ["red", "green", "blue", "circle", "square", "small", "large", "left", "right", "top", "bottom"]
    caps = [[" ".join(rng.choice(words, 4)) for _ in range(5)] for _ in range(9)]
    _tar(str(wds / "mscoco_captions" / "test" / "0.tar"),
         [(f"r{i}", {"jpg": _png(rng), "txt": "\n".join(c).encode()}) for i, c in enumerate(caps)])
    (wds / "mscoco_captions" / "dataset_type.txt").write_text("retrieval\n")

    tdir = root / "tfds"
    tlabels = rng.integers(0, 4, 14)
    colour_feats = {"image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=["red", "green", "blue", "yellow"])}
    colour_pngs = [_png(rng, (18, 22)) for _ in tlabels]
    for name in ("bench_colours", "bench_tfrecord"):
        _tfds_dataset(tdir, name, colour_feats, [{"image": io.BytesIO(b), "label": int(y)}
                                                 for b, y in zip(colour_pngs, tlabels)])
    tcaps = [[" ".join(rng.choice(words, 3)) for _ in range(5 + (i % 2))] for i in range(6)]  # 5 or 6 captions
    cap_feats = {"image": tfds.features.Image(shape=(None, None, 3)),
                 "captions": tfds.features.Sequence({"text": tfds.features.Text()})}
    cap_pngs = [_png(rng, (16, 16)) for _ in tcaps]
    for name in ("coco_captions", "bench_tfrecord_captions"):
        _tfds_dataset(tdir, name, cap_feats, [{"image": io.BytesIO(b), "captions": {"text": c}}
                                              for b, c in zip(cap_pngs, tcaps)])
    ucaps = [[" ".join(rng.choice(words, 3)) for _ in range(2)] for _ in range(4)]
    _tfds_dataset(tdir, "bench_user_captions", {"image": tfds.features.Image(shape=(None, None, 3)),
                                                "captions": tfds.features.Sequence(tfds.features.Text())},
                  [{"image": io.BytesIO(_png(rng, (16, 20))), "captions": c} for c in ucaps])
    _tfds_dataset(tdir, "bench_one_caption", {"image": tfds.features.Image(shape=(None, None, 3)),
                                              "caption": tfds.features.Text()},
                  [{"image": io.BytesIO(_png(rng, (16, 20))), "caption": c[0]} for c in ucaps])
    # The same examples in `tfds build`'s default file format; and one whose frames are corrupt.
    _as_tfrecord(tdir / "bench_tfrecord" / "1.0.0")
    _as_tfrecord(tdir / "bench_tfrecord_captions" / "1.0.0")
    bad = _tfds_dataset(tdir, "bench_tfrecord_corrupt", colour_feats,
                        [{"image": io.BytesIO(b), "label": int(y)} for b, y in zip(colour_pngs, tlabels)])
    shard = _as_tfrecord(bad)[0]
    raw = open(shard, "rb").read()
    open(shard, "wb").write(raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 1]) + raw[len(raw) // 2 + 1:])
    return {"run": run, "wds": str(wds), "tfds": str(tdir), "labels": labels, "caps": caps,
            "tlabels": tlabels, "tcaps": tcaps, "samples": samples}


# -- numpy references (float64) -----------------------------------------------------------------


def _ref_classification(img, names, templates, model, labels):
    img = np.asarray(img, np.float64)
    cls = []
    for n in names:
        e = np.asarray(model.encode_texts([t.format(n) for t in templates]), np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(0)
        cls.append(m / np.linalg.norm(m))
    logits = img @ np.stack(cls).T
    order = np.argsort(-logits, axis=1, kind="stable")
    acc1 = np.mean(order[:, 0] == labels)
    acc5 = np.mean([y in o[:5] for y, o in zip(labels, order)]) if len(names) >= 5 else float("nan")
    recalls = [np.mean(order[labels == c, 0] == c) for c in range(len(names)) if np.any(labels == c)]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": float(np.mean(recalls))}


def _ref_retrieval(img, txt, text_image):
    sims = np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T  # [Ni, Nt]
    out = {}
    ni, nt = sims.shape
    for k in (1, 5, 10):  # a k above the gallery's size is not reported (nan)
        top_t = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        out[f"text_retrieval_recall@{k}"] = (np.mean([np.any(text_image[top] == i) for i, top in enumerate(top_t)])
                                            if k <= nt else float("nan"))
        top_i = np.argsort(-sims.T, axis=1, kind="stable")[:, :k]
        out[f"image_retrieval_recall@{k}"] = (np.mean([text_image[t] in top for t, top in enumerate(top_i)])
                                             if k <= ni else float("nan"))
    return out


def _close(got: dict, want: dict):
    for k, v in want.items():
        if np.isnan(v):
            assert got[k] is None or np.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(v, abs=1e-9), k


# -- metrics on hand-made cases -----------------------------------------------------------------


def test_classification_metrics_hand_computed():
    classes = np.eye(3, dtype=np.float32)
    # image i points at class preds[i]; labels differ for two of them
    preds, labels = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0])
    img = classes[preds] + 0.1 * np.eye(3, dtype=np.float32)[(preds + 1) % 3]  # runner-up = next class
    m = runner.classification_metrics(img, classes, labels)
    assert m["acc1"] == pytest.approx(3 / 5)
    assert np.isnan(m["acc5"])  # fewer than 5 classes
    # per-class recall: class 0: 1/2, class 1: 1/2, class 2: 1/1
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_retrieval_recall_matches_numpy_with_five_captions():
    rng = np.random.default_rng(3)
    img = rng.standard_normal((12, 8)).astype(np.float32)
    txt = rng.standard_normal((60, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    text_image = np.repeat(np.arange(12), 5)
    got = runner.retrieval_metrics(img, txt, text_image)
    _close(got, _ref_retrieval(img, txt, text_image))
    # hand case: 2 images, captions 0,1 -> image 0, caption 2 -> image 1; caption 2 is image 0's best
    img2 = np.array([[1, 0], [0, 1]], np.float32)
    txt2 = np.array([[0.6, 0.8], [0.8, 0.6], [1, 0]], np.float32)
    m = runner.retrieval_metrics(img2, txt2, np.array([0, 0, 1]))
    # image 0's best text is caption 2 (image 1's), image 1's best is caption 0 (image 0's): both miss
    assert m["text_retrieval_recall@1"] == 0.0
    assert np.isnan(m["text_retrieval_recall@5"])  # k above the gallery size: not reported
    # caption 0 -> image 1 (0.8 > 0.6) miss, caption 1 -> image 0 hit, caption 2 -> image 0 miss
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 3)


# -- the command --------------------------------------------------------------------------------


def _run_cli(args):
    from contrastive_jax.cli import main

    return main(args)


def test_command_numbers_missing_and_csv(fixtures, tmp_path, capsys):
    import contrastive_jax

    out = tmp_path / "out"
    names = ("cifar10,mscoco_captions,bench_colours,coco_captions,flickr30k,not_a_dataset,bench_tfrecord,"
             "bench_user_captions,bench_tfrecord_captions,bench_tfrecord_corrupt,bench_one_caption")
    code = _run_cli(["benchmark", "--checkpoint", fixtures["run"], "--datasets", names, "--data-dir",
                     fixtures["tfds"], "--wds-root", fixtures["wds"], "--output", str(out), "--batch-size", "8",
                     "--no-progress"])
    assert code == 0
    res = json.load(open(out / "benchmark.json"))
    rows = {r["dataset"]: r for r in res["results"]}
    assert [r["dataset"] for r in res["results"]] == names.split(",")
    assert set(res["missing"]) == {"flickr30k", "not_a_dataset"}
    for name in ("cifar10", "mscoco_captions", "bench_colours", "coco_captions", "bench_user_captions",
                 "bench_tfrecord", "bench_tfrecord_captions"):
        assert rows[name]["status"] == "ok", rows[name]
    # TFRecord-format TFDS datasets, read without TensorFlow: the numbers of the same examples read
    # from array_record through tfds.data_source; a corrupt frame is an error naming the record.
    assert "tensorflow" not in sys.modules
    for rec, arr in (("bench_tfrecord", "bench_colours"), ("bench_tfrecord_captions", "coco_captions")):
        assert rows[rec]["metrics"] == rows[arr]["metrics"] and rows[rec]["num_examples"] == rows[arr]["num_examples"]
    assert rows["bench_tfrecord_corrupt"]["status"] == "error"
    assert "CRC mismatch" in rows["bench_tfrecord_corrupt"]["reason"]
    # a user's captioned TFDS dataset (as `data convert` writes) is benchmarked on retrieval
    assert rows["bench_user_captions"]["task"] == "zeroshot_retrieval"
    assert rows["bench_user_captions"]["num_examples"] == 4
    # one Text `caption` per image (as the built-in `shapes`): retrieval with one caption each
    assert rows["bench_one_caption"]["status"] == "ok" and rows["bench_one_caption"]["task"] == "zeroshot_retrieval"
    assert rows["bench_one_caption"]["num_examples"] == 4

    model = contrastive_jax.load(fixtures["run"])  # the unsharded notebook API: an independent path
    s = fixtures["samples"]
    img = model.encode_images([Image.open(io.BytesIO(p.get("png") or p["webp"])).convert("RGB") for _, p in s])
    _close(rows["cifar10"]["metrics"], _ref_classification(img, CLASSES, TEMPLATES, model, fixtures["labels"]))
    assert rows["cifar10"]["num_examples"] == 22

    import tensorflow_datasets as tfds

    skip = {"image": tfds.decode.SkipDecoding()}
    ds = tfds.builder_from_directory(os.path.join(fixtures["tfds"], "bench_colours", "1.0.0")).as_data_source(
        "test", decoders=skip)
    timg = model.encode_images([Image.open(io.BytesIO(ds[i]["image"])).convert("RGB") for i in range(len(ds))])
    tlab = np.array([ds[i]["label"] for i in range(len(ds))])
    _close(rows["bench_colours"]["metrics"],
           _ref_classification(timg, ["red", "green", "blue", "yellow"], list(runner.DEFAULT_TEMPLATES), model, tlab))

    caps = fixtures["caps"]
    rimg = model.encode_images([Image.open(io.BytesIO(_wds_images(fixtures["wds"], "mscoco_captions")[i])).convert("RGB")
                                for i in range(len(caps))])
    rtxt = model.encode_texts([c for cs in caps for c in cs])
    _close(rows["mscoco_captions"]["metrics"], _ref_retrieval(rimg, rtxt, np.repeat(np.arange(len(caps)), 5)))

    cds = tfds.builder_from_directory(os.path.join(fixtures["tfds"], "coco_captions", "1.0.0")).as_data_source(
        "test", decoders=skip)
    cimg = model.encode_images([Image.open(io.BytesIO(cds[i]["image"])).convert("RGB") for i in range(len(cds))])
    ccaps = [[t.decode() for t in cds[i]["captions"]["text"]] for i in range(len(cds))]
    assert sorted(map(len, ccaps)) == [5, 5, 5, 6, 6, 6]
    ctxt = model.encode_texts([c for cs in ccaps for c in cs])
    _close(rows["coco_captions"]["metrics"],
           _ref_retrieval(cimg, ctxt, np.repeat(np.arange(len(ccaps)), [len(c) for c in ccaps])))

    uds = tfds.builder_from_directory(os.path.join(fixtures["tfds"], "bench_user_captions", "1.0.0")).as_data_source(
        "test", decoders=skip)
    uimg = model.encode_images([Image.open(io.BytesIO(uds[i]["image"])).convert("RGB") for i in range(len(uds))])
    ucaps = [[t.decode() for t in uds[i]["captions"]] for i in range(len(uds))]
    _close(rows["bench_user_captions"]["metrics"],
           _ref_retrieval(uimg, model.encode_texts([c for cs in ucaps for c in cs]), np.repeat(np.arange(4), 2)))

    with open(out / "benchmark.csv") as fh:
        lines = list(csv.DictReader(fh))
    header = open(out / "benchmark.csv").readline().strip().split(",")
    assert header[:7] == ["dataset", "model", "pretrained", "task", "acc1", "acc5", "mean_per_class_recall"]
    for col in ("image_retrieval_recall@5", "text_retrieval_recall@5", "model_fullname", "status"):
        assert col in header
    by = {ln["dataset"]: ln for ln in lines}
    assert by["cifar10"]["task"] == "zeroshot_classification"
    assert float(by["cifar10"]["acc1"]) == pytest.approx(rows["cifar10"]["metrics"]["acc1"])
    assert by["mscoco_captions"]["acc1"] == "" and by["flickr30k"]["status"] == "missing"
    assert os.path.getsize(out / "benchmark.png") > 1000
    printed = capsys.readouterr().out
    assert "cifar10" in printed and "missing" in printed


def _wds_images(root, folder):
    with tarfile.open(os.path.join(root, folder, "test", "0.tar")) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]


def test_nothing_found_exits_1_and_bad_suite_is_rejected(fixtures, tmp_path):
    code = _run_cli(["benchmark", "--checkpoint", fixtures["run"], "--datasets", "flickr30k",
                     "--data-dir", str(tmp_path), "--output", str(tmp_path / "o"), "--no-progress"])
    assert code == 1
    assert json.load(open(tmp_path / "o" / "benchmark.json"))["missing"] == ["flickr30k"]
    with pytest.raises(SystemExit):
        _run_cli(["benchmark", "--checkpoint", fixtures["run"], "--suite", "nope"])
    # the compositional suite: the other module's names, each listed missing
    code = _run_cli(["benchmark", "--checkpoint", fixtures["run"], "--suite", "compositional",
                     "--compositional-root", str(tmp_path), "--output", str(tmp_path / "c"), "--no-progress"])
    assert code == 1
    res = json.load(open(tmp_path / "c" / "benchmark.json"))
    assert res["missing"] == list(runner.compositional_names()) and len(res["missing"]) >= 3
    assert {r["task"] for r in res["results"]} == {"compositional"}


def test_eight_devices_equal_one(fixtures):
    import contrastive_jax

    assert len(jax.devices()) == 8
    model = contrastive_jax.load(fixtures["run"])
    kw = dict(wds_root=fixtures["wds"], batch_size=8, progress=False)
    one = runner.run_benchmark(model, ["cifar10", "mscoco_captions"], devices=jax.devices()[:1], **kw)
    eight = runner.run_benchmark(model, ["cifar10", "mscoco_captions"], devices=jax.devices(), **kw)
    for a, b in zip(one, eight):
        assert a["status"] == b["status"] == "ok"
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-12, nan_ok=True)
    x = np.random.default_rng(0).integers(0, 256, (11, 20, 20, 3), dtype=np.uint8)
    e1 = runner.ShardedEncoder(model, jax.devices()[:1], 8).images(list(x))
    e8 = runner.ShardedEncoder(model, jax.devices(), 8).images(list(x))
    np.testing.assert_allclose(e1, e8, atol=1e-5)
    np.testing.assert_allclose(e8, model.encode_images(x), atol=1e-5)


# -- shipped metadata ---------------------------------------------------------------------------


def test_every_suite_dataset_has_names_and_templates():
    for name in bds.suite_names("all"):
        d = bds.DATASETS[name]
        if d.task != bds.CLASSIFICATION:
            continue
        names, temps = bds.class_names(d), bds.templates(d)
        # CLIP_benchmark names one clevr distance class '' (as published); every other name is non-empty
        blank_ok = name == "clevr_closest_object_distance"
        assert names and all(n and all(isinstance(s, str) and (s or blank_ok) for s in n) for n in names), name
        assert temps and all(t.count("{}") == 1 for t in temps), name
    assert len(bds.class_names(bds.DATASETS["imagenet1k"])) == 1000
    for sub in ("imagenet-a", "imagenet-r"):
        idx = bds.imagenet_subset(sub)
        assert len(idx) == 200 and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < 1000
        assert len(bds.class_names(bds.DATASETS[sub])) == 200
    assert len(bds.CLIP_SUITE) == 24 and len(bds.VTAB_SUITE) == 19


def test_imagenet_names_and_templates_match_open_clip():
    meta = pytest.importorskip("open_clip.zero_shot_metadata",
                               reason="open_clip (the [test] extra) holds a second copy of CLIP's ImageNet names")
    names = [n[0] for n in bds.class_names(bds.DATASETS["imagenet1k"])]
    assert names == list(meta.IMAGENET_CLASSNAMES)
    assert bds.templates(bds.DATASETS["imagenet1k"]) == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    # ImageNet-A / -R: the subsets' names are the published 1000-class names at those indices
    wnids = bds._json("imagenet_subsets.json")["wnids"]
    assert wnids[0] == "n01440764" and len(set(wnids)) == 1000
    assert names[bds.imagenet_subset("imagenet-r")[0]] == "goldfish"  # n01443537


def test_table_formats_missing_and_ok_rows():
    rows = [{"dataset": "a", "task": "zeroshot_classification", "status": "ok", "num_examples": 3,
             "metrics": {"acc1": 0.5, "acc5": float("nan"), "mean_per_class_recall": 0.25}},
            {"dataset": "winoground", "task": "compositional", "status": "ok",
             "metrics": {"text_score": 0.25, "image_score": 0.125, "group_score": 0.0625, "n": 400.0}},
            {"dataset": "b", "task": "zeroshot_retrieval", "status": "missing", "reason": "not found", "metrics": {}}]
    text = table.format_table(rows)
    assert "50.00" in text and "25.00" in text and text.splitlines()[-1].rstrip().endswith("missing")
    # compositional: the paper's headline score first, counts left to the JSON/CSV
    wino = next(ln for ln in text.splitlines() if ln.startswith("winoground"))
    assert wino.split()[-3:] == ["group_score=6.25", "image_score=12.50", "text_score=25.00"]
    assert table.headline(rows[1]) == [("group_score", 0.0625)]
    lines = list(csv.DictReader(io.StringIO(table.csv_text(rows, "m", "p"))))
    assert lines[0]["acc5"] == "" and lines[0]["model_fullname"] == "m p" and lines[2]["status"] == "missing"
    assert lines[1]["group_score"] == "0.0625" and lines[1]["n"] == "400.0"


def test_benchmark_package_imports_light():
    import subprocess
    import sys

    code = ("import sys, contrastive_jax.evaluate.benchmark as b, contrastive_jax.evaluate.benchmark.datasets; "
            "print(sorted(m for m in ('jax', 'tensorflow_datasets', 'tqdm', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
