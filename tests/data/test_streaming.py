"""Streaming sources (config.data.sources): WebDataset tars, Parquet, TFRecord and ArrayRecord
shards read in place, exact resume from the iterator state, weighted mixtures, per-host lanes,
s3:// over loopback HTTP, and quickstart-tiny training runs whose only data is a folder of tars
(also SIGKILLed twice and resumed) or of TFDS-written TFRecords."""
import io
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from contrastive_jax.data import streaming
from contrastive_jax.data.config import complete
from contrastive_jax.data.pipeline import make_train_iterator
from contrastive_jax.data.tokenizer import WordTokenizer

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
WORDS = ["a", "photo", "of", "red", "green", "blue", "yellow", "square", "alpha", "beta"]


def _png(color, size=16, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = color
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _sample(i, tag):
    name = list(COLORS)[i % len(COLORS)]
    return name, f"a photo of a {name} square {tag}"


def write_tars(folder, n_shards, per_shard, tag="", bad=()):
    """``n_shards`` img2dataset-style tars of ``per_shard`` samples: KEY.png + KEY.txt + KEY.json
    (every 3rd sample has no .txt, its caption only in the .json). Keys in ``bad`` get
    undecodable image bytes. Returns the shard paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = os.path.join(folder, f"shard-{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"{s:05d}{j:04d}"
                color, caption = _sample(i, tag)
                files = {"png": b"not an image" if key in bad else _png(COLORS[color]),
                         "json": json.dumps({"caption": caption, "key": key, "similarity": (i % 10) / 10,
                                             "width": 16 + 16 * (i % 2), "height": 16}).encode()}
                if i % 3:
                    files["txt"] = caption.encode()
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _data_config(sources, **kw):
    c = complete(ml_collections.ConfigDict({"name": "sources", "image_size": 16, "read_threads": 2}))
    with c.unlocked():
        c.sources = tuple(sources)
        for k, v in kw.items():
            c[k] = v
    return c


def _tokenizer():
    return WordTokenizer.from_texts([" ".join(WORDS)], max_len=8)


def _iterator(cfg, batch=8, p=0, n=1):
    return make_train_iterator(cfg, tokenizer=_tokenizer(), global_batch_size=batch, process_index=p, process_count=n)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    return {"a": write_tars(str(root / "a"), 4, 10, "alpha", bad={"000020003"}),
            "b": write_tars(str(root / "b"), 2, 12, "beta")}


def test_paths_braces_globs_and_config_errors(tars):
    folder = os.path.dirname(tars["a"][0])
    assert streaming.expand_braces("s-{08..10}-{0..1}.tar") == ["s-08-0.tar", "s-08-1.tar", "s-09-0.tar",
                                                                 "s-09-1.tar", "s-10-0.tar", "s-10-1.tar"]
    by_brace = streaming.parse_sources([{"path": folder + "/shard-{00000..00003}.tar"}])[0]
    by_glob = streaming.parse_sources([{"path": folder + "/*.tar", "weight": 2}])[0]
    by_list = streaming.parse_sources([{"path": list(reversed(tars["a"])), "format": "webdataset"}])[0]
    assert by_brace.shards == by_glob.shards == by_list.shards == tuple(tars["a"])
    assert by_glob.format == "webdataset" and by_glob.weight == 2.0
    for bad, words in [({"path": folder + "/*.zip"}, "matches no files"),
                       ({"path": folder + "/shard-00009.tar"}, "no such file"),
                       ({"path": tars["a"], "format": "tfrecords"}, "format='tfrecords'; valid"),
                       ({"path": tars["a"], "weight": 0}, "weight=0 must be a positive"),
                       ({"path": tars["a"], "colour": 1}, "unknown key(s) ['colour']")]:
        with pytest.raises(ValueError, match=r"config\.data\.sources\[0\]") as e:
            streaming.parse_sources([bad])
        assert words in str(e.value)
    with pytest.raises(ValueError, match="set config.data.name='sources'"):
        _iterator(_data_config([{"path": tars["a"]}], name="shapes"))
    with pytest.raises(ValueError, match=r"source 'source0' has 4 shard\(s\), fewer than the 8 stream lanes"):
        _iterator(_data_config([{"path": tars["a"]}], stream_lanes=8))


def test_webdataset_and_parquet_records(tars, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="parquet sources need pyarrow")
    import pyarrow as pa

    spec = streaming.parse_sources([{"path": tars["a"][0]}])[0]
    records = list(streaming.read_shard(spec.shards[0], spec, 0))
    assert [r["key"] for r in records] == [f"00000{j:04d}" for j in range(10)]
    # .txt when present, else the caption of the .json (sample 0, 3, 6, 9 have no .txt)
    assert [r["caption"] for r in records] == [_sample(j, "alpha")[1] for j in range(10)]
    assert all(isinstance(r["image"], bytes) and r["json"]["key"] == r["key"] for r in records)
    assert [r["key"] for r in streaming.read_shard(spec.shards[0], spec, 7)] == [r["key"] for r in records[7:]]
    # img2dataset's parquet layout: image bytes in 'jpg', text in 'caption' (and a custom column name).
    table = pa.table({"jpg": [_png(c) for c in COLORS.values()], "caption": [f"a {c} square" for c in COLORS],
                      "alt": ["x"] * 4, "key": [str(i) for i in range(4)]})
    pq.write_table(table, str(tmp_path / "part-0.parquet"), row_group_size=3)
    spec = streaming.parse_sources([{"path": str(tmp_path / "*.parquet"), "text_key": "alt"}])[0]
    assert spec.format == "parquet"
    rows = list(streaming.read_shard(spec.shards[0], spec, 1))
    assert [(r["key"], r["caption"]) for r in rows] == [("1", "x"), ("2", "x"), ("3", "x")]
    assert [r["key"] for r in streaming.read_shard(spec.shards[0], spec, 3)] == ["3"]  # 2nd row group only
    assert rows[0]["image"] == _png(COLORS["green"]) and streaming.count_records(spec) == 4
    it = _iterator(_data_config([{"path": str(tmp_path / "part-0.parquet")}], shuffle_buffer=1), batch=4)
    batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["text"].shape == (4, 8)


def test_array_record_shards_of_a_tfds_dataset_mix_with_tars(tars, shapes_cfg, shapes_sources):
    """The array_record shards TFDS wrote (here the generated shapes dataset) read as a source,
    record for record equal to TFDS's own data source, and mixed with a tar source."""
    import glob

    paths = sorted(glob.glob(os.path.join(shapes_cfg.data_dir, "shapes", "*", "*", "shapes-train.array_record-*")))
    assert paths, shapes_cfg.data_dir
    spec = streaming.parse_sources([{"path": paths, "name": "shapes"}])[0]
    assert spec.format == "array_record" and streaming.count_records(spec) == len(shapes_sources["train"])
    first = list(streaming.read_shard(paths[0], spec, 0))
    again = list(streaming.read_shard(paths[0], spec, 5))
    assert [r["key"] for r in again] == [r["key"] for r in first[5:]]
    tfds_records = [shapes_sources["train"][i] for i in range(len(first))]  # shard 0 = the first records
    for mine, theirs in zip(first, tfds_records):
        np.testing.assert_array_equal(mine["image"], theirs["image"])
        assert streaming.caption_text(mine) == streaming.caption_text({"caption": theirs["caption"]})
    cfg = _data_config([{"path": paths, "name": "shapes"}, {"path": tars["b"], "name": "tars"}], shuffle_buffer=8)
    it = _iterator(cfg, batch=8)
    batch = next(it)
    assert batch["image"].shape == (8, 16, 16, 3) and it.stats()["data/shapes/examples"] == 4


def test_resume_from_state_gives_the_identical_batches(tars):
    cfg = _data_config([{"path": tars["a"], "weight": 0.7, "name": "a"}, {"path": tars["b"], "weight": 0.3}],
                       shuffle_buffer=7, stream_lanes=2)
    it = _iterator(cfg, batch=6)
    ref = _take(it, 12)  # 72 examples: several epochs of 'b' (24 records), shard and window boundaries
    stats = it.stats()
    # The one undecodable record of 'a' (40 records) is read once per epoch and replaced.
    assert stats["data/skipped/undecodable"] >= 1 and stats["data/a/bad"] == stats["data/skipped"]
    assert stats["data/a/examples"] + stats["data/source1/examples"] == 72
    assert abs(stats["data/a/examples"] - 0.7 * 72) <= 2
    for cut in (1, 5, 9):
        first = _iterator(cfg, batch=6)
        _take(first, cut)
        state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
        resumed = _iterator(cfg, batch=6)
        resumed.set_state(state)
        _same(_take(resumed, 12 - cut), ref[cut:])
        assert resumed.stats() == stats
    # Without the prefetch thread: the same batches, and a state taken mid-way resumes the same.
    sync = _iterator(_data_config(cfg.sources, shuffle_buffer=7, stream_lanes=2, prefetch_batches=0), batch=6)
    _same(_take(sync, 4), ref[:4])
    resumed = _iterator(cfg, batch=6)
    resumed.set_state(sync.get_state())
    _same(_take(resumed, 2), ref[4:6])
    # Another seed is another order; the same seed the same order.
    other = _iterator(_data_config(cfg.sources, shuffle_buffer=7, stream_lanes=2, shuffle_seed=1), batch=6)
    assert not np.array_equal(next(other)["image"], ref[0]["image"])
    # A state from other lanes, other shards or another buffer is refused with the reason.
    with pytest.raises(ValueError, match="stream_lanes=1"):
        _iterator(_data_config(cfg.sources, shuffle_buffer=7, stream_lanes=1), batch=6).set_state(state)
    fewer = [{**cfg.sources[0], "path": tars["a"][:3]}, cfg.sources[1]]
    for changed in (_data_config(fewer, shuffle_buffer=7, stream_lanes=2),
                    _data_config(cfg.sources, shuffle_buffer=8, stream_lanes=2)):
        with pytest.raises(ValueError, match="written for other shards or another stream layout"):
            _iterator(changed, batch=6).set_state(state)


def test_too_many_bad_records_stop_the_stream(tmp_path):
    from contrastive_jax.data.pipeline import DataQualityError

    keys = {f"00000{j:04d}" for j in range(0, 30, 2)}  # half the records are undecodable
    cfg = _data_config([{"path": write_tars(str(tmp_path / "bad"), 1, 30, bad=keys)}], max_bad_fraction=0.2)
    it = _iterator(cfg, batch=10)
    with pytest.raises(DataQualityError, match=r"were bad .*config.data.max_bad_fraction=0.2.*'undecodable': 59\}"):
        _take(it, 20)
    with pytest.raises(DataQualityError):  # raised again, not a hang on the stopped prefetch thread
        next(it)


def test_resampled_shards_and_missing_eval_sources(tars):
    from contrastive_jax.data.pipeline import load_eval_arrays

    # With replacement: no epochs, so more lanes than shards is fine; still exactly resumable.
    cfg = _data_config([{"path": tars["b"]}], resample=True, stream_lanes=4, shuffle_buffer=3)
    it = _iterator(cfg, batch=8)
    ref = _take(it, 6)
    first = _iterator(cfg, batch=8)
    _take(first, 2)
    resumed = _iterator(cfg, batch=8)
    resumed.set_state(first.get_state())
    _same(_take(resumed, 4), ref[2:])
    spec = streaming.parse_sources(cfg.sources)[0]
    lanes = [streaming.LaneSource(spec, 0, lane, 4, seed=0, window=1, resample=True, stats=streaming.ShardReadStats())
             for lane in range(4)]
    shards = [lane._shard(0, slot) for lane in lanes for slot in range(8)]
    assert set(shards) == set(tars["b"])  # both shards drawn, in an order no epoch fixes
    with pytest.raises(ValueError, match=r"set config\.data\.eval_sources"):
        load_eval_arrays(cfg, "test", tokenizer=_tokenizer())


def test_metadata_filters_drop_records_before_decoding(tars):
    filters = ["json.similarity >= 0.5", "aspect < 1.5", "caption_words>=5", "json.nope < 1e9"]
    with pytest.raises(ValueError, match=r"sources\[0\]\.filters: 'similarity >= 1' is not"):
        streaming.parse_sources([{"path": tars["b"], "filters": ["similarity >= 1"]}])
    spec = streaming.parse_sources([{"path": tars["b"], "filters": filters[:3]}])[0]
    assert spec.filters[0] == ("json.similarity", ">=", 0.5)
    lane = streaming.LaneSource(spec, 0, 0, 1, seed=0, window=4, resample=False, stats=streaming.ShardReadStats())
    records = [lane.next() for _ in range(12)]
    # kept: similarity >= 0.5 (i % 10 >= 5) and aspect 1 (even i): i % 10 in {6, 8}
    assert sorted({int(r["key"][:5]) * 12 + int(r["key"][5:]) for r in records}) == [6, 8, 16, 18]
    assert streaming.passes_filters(records[0], spec.filters)
    assert not streaming.passes_filters(records[0], streaming.parse_filters(filters[3:], "x"))  # missing field
    it = _iterator(_data_config([{"path": tars["b"], "filters": filters[:3], "name": "f"}], shuffle_buffer=2), batch=4)
    _take(it, 3)
    stats = it.stats()
    # 12 examples from 24-record epochs of which 4 pass: each example skipped 5 records on average
    assert stats["data/f/examples"] == 12 and 45 <= stats["data/f/filtered"] <= 66, stats
    nothing = _iterator(_data_config([{"path": tars["b"], "filters": ["json.similarity > 5"]}]), batch=4)
    with pytest.raises(RuntimeError, match="do its filters drop everything"):
        next(nothing)


def test_mixture_ratios_and_same_sequence_on_one_and_two_processes(tmp_path):
    a = write_tars(str(tmp_path / "a"), 4, 250, "alpha")
    b = write_tars(str(tmp_path / "b"), 4, 250, "beta")
    sources = [{"path": a, "weight": 0.8, "name": "big"}, {"path": b, "weight": 0.2, "name": "small"}]
    cfg = _data_config(sources, stream_lanes=4, shuffle_buffer=50, image_size=8)
    one = _iterator(cfg, batch=400)
    batches = _take(one, 25)  # 10k examples
    stats = one.stats()
    assert stats["data/big/examples"] + stats["data/small/examples"] == 10000
    assert abs(stats["data/big/examples"] / 10000 - 0.8) <= 0.01, stats
    # The text tells each row's source ('alpha' / 'beta' are words of the vocabulary).
    alpha = _tokenizer().encode(["alpha"])[0][0]
    assert sum(int((b["text"] == alpha).any(axis=1).sum()) for b in batches) == stats["data/big/examples"]
    # Two hosts: the union of their rows, batch by batch, is the one-host sequence.
    two = [_iterator(cfg, batch=400, p=p, n=2) for p in range(2)]
    for step in range(3):
        halves = [next(it) for it in two]
        for key in batches[step]:
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[step][key])
    big = sum(it.stats()["data/big/examples"] for it in two)
    assert abs(big / 1200 - 0.8) <= 0.01
    # The hosts' states (what get_state's allgather merges on a pod) restore one host or two.
    merged = streaming.merge_states(streaming._allgather_json(two[0].get_state()) + [two[1].get_state()])
    assert sorted(merged["lane_states"]) == ["0", "1", "2", "3"]
    one_again = _iterator(cfg, batch=400)
    one_again.set_state(json.loads(json.dumps(merged)))
    _same(_take(one_again, 2), batches[3:5])
    restored = one_again.stats()  # the counters continue from the two hosts' 1200 examples
    assert restored["data/big/examples"] + restored["data/small/examples"] == 2000
    host1 = _iterator(cfg, batch=400, p=1, n=2)
    host1.set_state(merged)
    np.testing.assert_array_equal(next(host1)["image"], batches[3]["image"][200:])


@pytest.fixture(scope="module")
def s3_bucket(moto_s3):
    """A fresh bucket on the module's moto S3 server (tests/conftest.py); yields its s3:// URL."""
    from contrastive_jax import storage

    fs, _ = storage.filesystem("s3://cj-streaming")
    fs.mkdir("cj-streaming")
    yield "s3://cj-streaming"


def _upload(paths, url_dir):
    from contrastive_jax import storage

    fs, root = storage.filesystem(url_dir)
    for path in paths:
        fs.put_file(path, root + "/" + os.path.basename(path))
    return [f"{url_dir}/{os.path.basename(p)}" for p in paths]


def test_s3_shards_stream_like_local_ones(tars, s3_bucket):
    _upload(tars["a"], s3_bucket + "/a")
    _upload(tars["b"], s3_bucket + "/b")
    local = _data_config([{"path": tars["a"], "weight": 3}, {"path": tars["b"]}], shuffle_buffer=5, stream_lanes=2)
    remote = _data_config([{"path": s3_bucket + "/a/shard-{00000..00003}.tar", "weight": 3},
                           {"path": s3_bucket + "/b/*.tar"}], shuffle_buffer=5, stream_lanes=2)
    assert streaming.parse_sources(remote.sources)[1].shards == (s3_bucket + "/b/shard-00000.tar",
                                                                  s3_bucket + "/b/shard-00001.tar")
    it = _iterator(remote, batch=6)
    _take(it, 3)
    state = it.get_state()
    expected = _take(_iterator(local, batch=6), 8)
    _same(_take(it, 5), expected[3:])
    resumed = _iterator(remote, batch=6)
    resumed.set_state(state)
    _same(_take(resumed, 5), expected[3:])
    assert it.stats()["data/source0/bytes"] > 0


def test_truncated_and_missing_shards_are_retried_then_skipped(tars, s3_bucket, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(streaming, "RETRY_DELAYS_S", (0.0, 0.0))
    with open(tars["b"][0], "rb") as fh:
        data = fh.read()
    cut = str(tmp_path / "cut.tar")
    with open(cut, "wb") as fh:
        fh.write(data[: len(data) // 2 + 100])  # mid-member: tarfile raises on the rest
    spec = streaming.parse_sources([{"path": cut}])[0]
    stats = streaming.ShardReadStats()
    opened = []
    real = streaming._READERS["webdataset"]
    monkeypatch.setitem(streaming._READERS, "webdataset", lambda p, s, n: (opened.append(p), real(p, s, n))[1])
    got = list(streaming.read_shard(cut, spec, 0, stats))
    full = list(streaming.read_shard(tars["b"][0], streaming.parse_sources([{"path": tars["b"][0]}])[0], 0))
    assert 0 < len(got) < len(full) and [r["key"] for r in got] == [r["key"] for r in full[: len(got)]]
    assert opened.count(cut) == 3 and stats.bad_shards == {cut: 1}  # 3 tries, then skipped and counted
    assert f"skipping the rest of shard {cut} after 3 tries" in caplog.text
    # In a stream: a remote shard that does not exist is skipped the same way, the rest is read.
    cfg = _data_config([{"path": [tars["b"][1], s3_bucket + "/no-such-shard.tar"], "format": "webdataset"}],
                       shuffle_buffer=4)
    it = _iterator(cfg, batch=4)
    _take(it, 8)  # 32 examples > the 12 of the readable shard: both epochs skip the missing one
    assert it.stats()["data/source0/bad_shards"] == 1.0
    # A source whose every shard fails stops the stream with the last error, not an endless loop.
    gone = _iterator(_data_config([{"path": s3_bucket + "/gone-{0..1}.tar", "format": "webdataset"}]), batch=4)
    with pytest.raises(RuntimeError, match=r"gave no records .*Last read error: s3://cj-streaming/gone"):
        next(gone)


def _run_config(workdir, sources, eval_sources, *overrides):
    from contrastive_jax.train.config import load_config

    quickstart = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "quickstart.py")
    config = load_config(quickstart + ":tiny", ["log.progress=false", "log.tensorboard=false", "data.name=sources",
                                                "train.total_steps=8", "checkpoint.every_steps=100",
                                                "eval.every_steps=0", "eval.evaluators=['retrieval']",
                                                "data.shuffle_buffer=16", *overrides])
    with config.data.unlocked():
        config.data.sources = ({"path": sources, "name": "tars"},)
        config.data.eval_sources = ({"path": eval_sources},)
    return config


@pytest.fixture(scope="module")
def run_data(tmp_path_factory):
    """Train / eval tar folders (one undecodable training image) and an uninterrupted 8-step
    quickstart-tiny run on them: ``(train_paths, eval_paths, workdir)``."""
    from contrastive_jax.train.loop import train

    root = tmp_path_factory.mktemp("run_data")
    train_paths = write_tars(str(root / "train"), 3, 40, "", bad={"000010005"})
    eval_paths = write_tars(str(root / "eval"), 1, 48)
    straight = str(root / "straight")
    config = _run_config(straight, str(root / "train" / "*.tar"), str(root / "eval" / "shard-{00000..00000}.tar"))
    summary = train(config, straight)
    assert summary["steps"] == 8 and "retrieval/image_to_text/R@1" in summary["eval"], summary
    return train_paths, eval_paths, straight


def test_training_run_on_tars_resumes_bitwise(run_data, tmp_path):
    """The only data is two folders of tars (train, eval): the run trains and evaluates through
    config.data.sources; stopped twice and resumed, it ends with the uninterrupted run's params."""
    import jax

    from contrastive_jax.train.loop import train
    from tests.train.test_resilience import _final_params

    train_paths, eval_paths, straight = run_data
    train_glob = os.path.join(os.path.dirname(train_paths[0]), "*.tar")
    stopped = str(tmp_path / "stopped")
    for until in (3, 6):  # each invocation stops (with a checkpoint) after 3 more steps
        result = train(_run_config(stopped, train_glob, eval_paths, "train.max_steps_per_run=3"), stopped)
        assert result["stopped_at_step"] == until and result["complete"] is False, result
    result = train(_run_config(stopped, train_glob, eval_paths), stopped)
    assert result["resumed_from_step"] == 6 and result["steps"] == 8
    jax.tree.map(np.testing.assert_array_equal, _final_params(straight), _final_params(stopped))


def test_training_run_from_s3_matches_local(run_data, s3_bucket, tmp_path):
    import jax

    from contrastive_jax.train.loop import train
    from tests.train.test_resilience import _final_params

    train_paths, eval_paths, straight = run_data
    _upload(train_paths, s3_bucket + "/run/train")
    _upload(eval_paths, s3_bucket + "/run/eval")
    workdir = str(tmp_path / "from_s3")
    summary = train(_run_config(workdir, s3_bucket + "/run/train/shard-{00000..00002}.tar",
                                s3_bucket + "/run/eval/*.tar"), workdir)
    assert summary["steps"] == 8 and "retrieval/image_to_text/R@1" in summary["eval"], summary
    jax.tree.map(np.testing.assert_array_equal, _final_params(straight), _final_params(workdir))


_TWO_PROCESS_SCRIPT = """
import json, sys
import numpy as np
from contrastive_jax.parallel.distributed import initialize
address, pid, cfg_json, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
initialize(address, 2, pid)
import ml_collections
from contrastive_jax.data.config import complete
from contrastive_jax.data.pipeline import make_train_iterator
from contrastive_jax.data.tokenizer import WordTokenizer
cfg = complete(ml_collections.ConfigDict(json.loads(cfg_json)))
tok = WordTokenizer.from_texts([" ".join(json.loads(sys.argv[5]))], max_len=8)
it = make_train_iterator(cfg, tokenizer=tok, global_batch_size=8)  # this host: jax.process_index()
[next(it) for _ in range(2)]
state = it.get_state()  # a collective: every host's lanes
after = [next(it) for _ in range(2)]
np.savez(out + ".npz", **{f"{k}{i}": b[k] for i, b in enumerate(after) for k in b})
with open(out + ".json", "w") as fh:
    json.dump(state, fh)
"""


def test_two_real_processes_save_a_state_that_restores_one(tars, tmp_path):
    """jax.distributed (gloo, 127.0.0.1): the state get_state returns on either host holds both
    hosts' lanes; one process restored from it continues with the two hosts' rows."""
    import subprocess
    import sys

    from tests.train.test_resilience import _env, _free_port

    cfg = _data_config([{"path": tars["a"], "weight": 2, "name": "a"}, {"path": tars["b"], "name": "b"}],
                       shuffle_buffer=5, stream_lanes=2)
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, address, str(i), cfg.to_json(),
                               str(tmp_path / f"p{i}"), json.dumps(WORDS)], env=_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    states = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]
    assert states[0] == states[1] and sorted(states[0]["lane_states"]) == ["0", "1"]
    halves = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    one = _iterator(cfg, batch=8)
    one.set_state(states[0])
    for step in range(2):
        batch = next(one)
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([h[f"{key}{step}"] for h in halves]), batch[key])
    # ... and the same rows as a one-process run from the start.
    _same([next(one)], _take(_iterator(cfg, batch=8), 5)[4:])


def test_sigkilled_twice_on_tars_resumes_to_the_uninterrupted_params(run_data, tmp_path):
    """`contrastive-jax train` on a folder of tars, SIGKILLed twice (each time right after a new
    checkpoint is on disk, the prefetch thread ahead of the step), re-run to the end: the final
    params are the uninterrupted in-process run's, bitwise, and so is every logged loss."""
    import signal
    import subprocess
    import sys

    import jax

    from tests.train.test_resilience import _env, _final_params, _wait_for_checkpoint
    from tests.train.test_train import REPO, _read_metrics

    train_paths, eval_paths, straight = run_data
    sources = [{"path": os.path.join(os.path.dirname(train_paths[0]), "*.tar"), "name": "tars"}]
    # The CLI form of _run_config(...) (the straight run), plus a checkpoint every 2 steps.
    cmd = [sys.executable, "-m", "contrastive_jax.cli", "train", "--config",
           os.path.join(REPO, "configs", "quickstart.py:tiny"), "--workdir", str(tmp_path / "killed"),
           *[f"--config.{o}" for o in ("log.progress=false", "log.tensorboard=false", "data.name=sources",
                                       "train.total_steps=8", "eval.every_steps=0", "eval.evaluators=['retrieval']",
                                       "data.shuffle_buffer=16", "checkpoint.every_steps=2",
                                       "train.log_every_steps=1")],
           f"--config.data.sources={sources!r}", f"--config.data.eval_sources={[{'path': eval_paths}]!r}"]
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    killed_at = []
    for at_least in (2, 4):
        proc = subprocess.Popen(cmd, env=_env(8), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            killed_at.append(_wait_for_checkpoint(proc, ckpt_dir, at_least))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, killed_at  # killed, not finished on its own
        assert killed_at[-1] < 8, killed_at
    last = subprocess.run(cmd, env=_env(8), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "Resuming from step" in last.stderr, (killed_at, last.stderr[-2000:])
    a, b = _final_params(straight, 8), _final_params(str(tmp_path / "killed"), 8)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), (jax.tree_util.keystr(path), killed_at)
    # Steps re-run after a kill log again (the later line wins); the straight run logged steps 5, 8.
    straight_logs = {m["step"]: m for m in _read_metrics(straight) if "train/loss" in m}
    killed_logs = {m["step"]: m for m in _read_metrics(str(tmp_path / "killed")) if "train/loss" in m}
    assert set(killed_logs) == set(range(1, 9)) and set(straight_logs) == {5, 8}, sorted(killed_logs)
    for step in straight_logs:
        for key in ("train/loss", "train/data/tars/examples", "train/data/skipped/undecodable"):
            assert killed_logs[step][key] == straight_logs[step][key], (step, key, killed_at)


def _write_img2dataset_tfrecords(folder, n_shards, per_shard):
    """img2dataset's tfrecord layout, written by the ``tfrecord`` package (an independent
    TFRecord writer): ``key``, ``png`` image bytes, ``txt`` caption and metadata features.
    Returns ``(paths, {key: (png bytes, caption, similarity, width)})``."""
    tfrecord = pytest.importorskip("tfrecord", reason="the tfrecord package writes this test's TFRecord shards")
    os.makedirs(folder, exist_ok=True)
    paths, written = [], {}
    for s in range(n_shards):
        paths.append(os.path.join(folder, f"{s:05d}.tfrecord"))
        writer = tfrecord.TFRecordWriter(paths[-1])
        for j in range(per_shard):
            i = s * per_shard + j
            color, caption = _sample(i, "")
            key = f"{s:05d}{j:04d}"
            written[key] = (_png(COLORS[color]), caption, (i % 10) / 10, 16 + 16 * (i % 2))
            writer.write({"key": (key.encode(), "byte"), "png": (written[key][0], "byte"),
                          "txt": (caption.encode(), "byte"), "similarity": (written[key][2], "float"),
                          "width": (written[key][3], "int"), "height": (16, "int")})
        writer.close()
    return paths, written


def test_tfrecord_shards_of_img2dataset_read_as_written_and_bad_framing_is_a_bad_shard(tmp_path, monkeypatch):
    paths, written = _write_img2dataset_tfrecords(str(tmp_path / "tfr"), 2, 6)
    spec = streaming.parse_sources([{"path": str(tmp_path / "tfr" / "*.tfrecord")}])[0]
    assert spec.format == "tfrecord" and streaming.count_records(spec) == 12
    records = [r for p in paths for r in streaming.read_shard(p, spec, 0)]
    assert [r["key"] for r in records] == sorted(written)
    for r in records:
        png, caption, similarity, width = written[r["key"]]
        assert r["image"] == png and r["caption"] == caption and r["json"]["width"] == width
        assert r["json"]["similarity"] == np.float32(similarity)  # a float_list holds float32
    assert [r["key"] for r in streaming.read_shard(paths[1], spec, 4)] == sorted(written)[10:]
    # Metadata filters see the Example's other features, as they see img2dataset's .json.
    kept = streaming.parse_sources([{"path": paths, "filters": ["json.similarity >= 0.5", "json.width < 20"]}])[0]
    assert [r["key"] for p in paths for r in streaming.read_shard(p, kept, 0) if streaming.passes_filters(
        r, kept.filters)] == [k for k in sorted(written) if written[k][2] >= 0.5 - 1e-6 and written[k][3] < 20]
    # A flipped payload byte (CRC) and a file cut mid-record: the records before are read, then the
    # shard is retried and the rest skipped as a bad shard.
    monkeypatch.setattr(streaming, "RETRY_DELAYS_S", (0.0, 0.0))
    data = open(paths[0], "rb").read()
    third = data.index(written["000000002"][0])  # inside record 2's payload
    for name, broken in (("flipped.tfrecord", data[:third + 5] + bytes([data[third + 5] ^ 1]) + data[third + 6:]),
                         ("cut.tfrecord", data[:third + 5])):
        with open(tmp_path / name, "wb") as fh:
            fh.write(broken)
        stats = streaming.ShardReadStats()
        got = list(streaming.read_shard(str(tmp_path / name), spec, 0, stats))
        assert [r["key"] for r in got] == ["000000000", "000000001"], name
        assert stats.bad_shards == {str(tmp_path / name): 1}
        assert ("payload CRC mismatch" if name.startswith("flipped") else "truncated") in stats.last_error
    # Counting seeks over payloads (their CRC unchecked) but still finds the cut.
    with pytest.raises(streaming.TFRecordError, match="record 2: file ends inside the record"):
        streaming.count_records(streaming.parse_sources([{"path": str(tmp_path / "cut.tfrecord")}])[0])
    # Without the CRC package: one line naming the extra, at config time and when reading.
    monkeypatch.setitem(__import__("sys").modules, "crc32c", None)
    extra = r"pip install 'contrastive_jax\[tfrecord\]'"
    with pytest.raises(ValueError, match=r"sources\[0\]\.format='tfrecord': .*" + extra):
        streaming.parse_sources([{"path": paths}])
    with pytest.raises(ImportError, match=r"contrastive_jax\[tfrecord\]"):
        list(streaming.read_shard(paths[0], spec, 0))


def _write_tfds_tfrecords(folder, n_shards, per_shard):
    """TFDS-written TFRecord shards (``NAME-train.tfrecord-0000s-of-0000n`` + features.json):
    encoded image bytes, a caption (Text), a label (ClassLabel) and a key (Text), serialized by
    TFDS and framed with the ``tfrecord`` package's masked CRC. Returns ``(paths, [(png, caption,
    label)])``."""
    import struct

    import tensorflow_datasets as tfds

    tfrecord = pytest.importorskip("tfrecord", reason="the tfrecord package's CRC frames this test's records")
    os.makedirs(folder, exist_ok=True)
    features = tfds.features.FeaturesDict({"image": tfds.features.Tensor(shape=(), dtype=np.object_),
                                           "caption": tfds.features.Text(),
                                           "label": tfds.features.ClassLabel(names=list(COLORS)),
                                           "key": tfds.features.Text()})
    features.save_config(folder)
    paths, written = [], []
    for s in range(n_shards):
        paths.append(os.path.join(folder, f"colors-train.tfrecord-{s:05d}-of-{n_shards:05d}"))
        with open(paths[-1], "wb") as fh:
            for j in range(per_shard):
                color, caption = _sample(s * per_shard + j, "")
                written.append((_png(COLORS[color]), caption, list(COLORS).index(color)))
                raw = features.serialize_example({"image": written[-1][0], "caption": caption,
                                                  "label": written[-1][2], "key": f"k{s}-{j}"})
                head = struct.pack("<Q", len(raw))
                mask = tfrecord.TFRecordWriter.masked_crc
                fh.write(head + mask(head) + raw + mask(raw))
    return paths, written


def test_tfds_written_tfrecord_shards_train_through_the_stream(run_data, tmp_path):
    """TFDS-style TFRecord shards (image bytes + text + label) are parsed with their features.json,
    record for record as written, and a quickstart-tiny run trains and evaluates on them."""
    from contrastive_jax.train.loop import train
    from tests.train.test_train import _read_metrics

    paths, written = _write_tfds_tfrecords(str(tmp_path / "colors"), 3, 40)
    spec = streaming.parse_sources([{"path": str(tmp_path / "colors" / "colors-train.tfrecord-*")}])[0]
    assert spec.format == "tfrecord" and streaming.count_records(spec) == 120
    records = [r for p in paths for r in streaming.read_shard(p, spec, 0)]
    assert [(r["image"], streaming.caption_text(r)) for r in records] == [(png, c) for png, c, _ in written]
    assert [r["key"] for r in records] == [f"k{s}-{j}" for s in range(3) for j in range(40)]  # str, not "b'..'"
    _, eval_paths, _ = run_data
    workdir = str(tmp_path / "run")
    summary = train(_run_config(workdir, str(tmp_path / "colors" / "*.tfrecord-*"), eval_paths), workdir)
    assert summary["steps"] == 8 and "retrieval/image_to_text/R@1" in summary["eval"], summary
    last = [m for m in _read_metrics(workdir) if "train/loss" in m][-1]
    assert last["step"] == 8 and last["train/data/tars/examples"] == 8 * 32 and last["train/data/skipped"] == 0


def test_tfrecord_shards_stream_from_s3_like_local_ones(s3_bucket, tmp_path):
    """Both TFRecord layouts read from s3:// (loopback HTTP) give the local records, also from a
    record offset (the TFDS layout's features.json is fetched from the bucket)."""
    img2dataset, _ = _write_img2dataset_tfrecords(str(tmp_path / "i2d"), 2, 5)
    tfds_paths, _ = _write_tfds_tfrecords(str(tmp_path / "colors"), 2, 5)
    _upload(img2dataset, s3_bucket + "/tfr/i2d")
    _upload(tfds_paths + [str(tmp_path / "colors" / "features.json")], s3_bucket + "/tfr/colors")
    for local, remote in ((img2dataset, s3_bucket + "/tfr/i2d/*.tfrecord"),
                          (tfds_paths, s3_bucket + "/tfr/colors/colors-train.tfrecord-{00000..00001}-of-00002")):
        local_spec, remote_spec = streaming.parse_sources([{"path": local}, {"path": remote}])
        assert remote_spec.format == "tfrecord" and len(remote_spec.shards) == 2
        for start in (0, 3):
            mine = [r for p in local_spec.shards for r in streaming.read_shard(p, local_spec, start)]
            theirs = [r for p in remote_spec.shards for r in streaming.read_shard(p, remote_spec, start)]
            assert len(mine) == 2 * (5 - start) and len(theirs) == len(mine)
            for a, b in zip(mine, theirs):
                assert a["image"] == b["image"] and streaming.caption_text(a) == streaming.caption_text(b)
                assert a["key"] == b["key"] and a["json"] == b["json"]


def test_stream_as_a_grain_iter_dataset_composes_and_checkpoints(tars):
    """stream_dataset: the same batches as the training iterator; a grain .map on top; the
    composed iterator's grain state (JSON) resumes exactly, also on an iterator already used."""
    import grain

    cfg = _data_config([{"path": tars["a"], "weight": 2, "name": "a"}, {"path": tars["b"]}], shuffle_buffer=5,
                       stream_lanes=2)
    ref = _take(_iterator(cfg, batch=6), 7)
    ds = streaming.stream_dataset(cfg, tokenizer=_tokenizer(), global_batch_size=6, process_index=0, process_count=1)
    assert isinstance(ds, grain.IterDataset)
    _same(_take(iter(ds), 7), ref)
    mapped = ds.map(lambda b: {"image_sum": b["image"].astype(np.float64).sum(axis=(1, 2, 3)), "text": b["text"]})
    it = iter(mapped)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    want = [{"image_sum": b["image"].astype(np.float64).sum(axis=(1, 2, 3)), "text": b["text"]} for b in ref[3:]]
    _same(_take(it, 4), want)
    again = iter(mapped)
    again.set_state(state)
    _same(_take(again, 4), want)
    it.set_state(state)  # an iterator that already ran ahead goes back too
    _same(_take(it, 2), want[:2])
    with pytest.raises(ValueError, match="config.data.name='sources'"):
        streaming.stream_dataset(_data_config([{"path": tars["a"]}], name="shapes"), tokenizer=_tokenizer(),
                                 global_batch_size=6)
