"""contrastive_jax.data.pipeline: grain training iterators (batches, epochs, seeds, hosts,
checkpointable state, worker processes, views and augmentation, token masking, extra features,
bad records) and evaluation arrays -- on the shapes dataset (uint8 array records) and on converted
user data (encoded image bytes)."""
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from contrastive_jax import data
from contrastive_jax.data import registry
from contrastive_jax.data.pipeline import SKIP_REASONS, DataQualityError
from data_test_helpers import N_TEST, N_TRAIN, png, shapes_config, user_config

SIMCLR = dict(crop="random_resized_crop", flip_prob=0.5, jitter_prob=0.8, grayscale_prob=0.2,
              blur_prob=0.5, solarize_prob=0.2)


def _row_ids(batch, cfg, train_index):
    """Train indices of a batch's rows, by denormalizing its images (also checks normalization)."""
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    pixels = (batch["image"] * std + mean) * 255.0
    rounded = np.rint(pixels)
    assert np.abs(pixels - rounded).max() < 1e-3  # exactly (x/255 - mean)/std of uint8 x
    return [train_index[img.astype(np.uint8).tobytes()] for img in rounded]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _iterator(cfg, tok, batch, *, seed=0, p=0, n=1):
    return data.make_train_iterator(cfg, tokenizer=tok, global_batch_size=batch, seed=seed,
                                    process_index=p, process_count=n)


def _source(request, source, **overrides):
    """(config, tokenizer) of the shapes fixture dataset or of the converted user folder."""
    if source == "shapes":
        assert not overrides
        return request.getfixturevalue("shapes_cfg"), request.getfixturevalue("shapes_tok")
    root = request.getfixturevalue("user_folder")[0]
    cfg = user_config(root / "tfds", "my_pics", **overrides)
    return cfg, data.build_tokenizer(cfg)


# ---------------------------------------------------------------------------------------------
# Training batches: format, order, hosts, state
# ---------------------------------------------------------------------------------------------


def test_train_batches_shapes_dtypes_and_alignment(shapes_cfg, shapes_tok, shapes_records, shapes_train_index):
    cfg, tok = shapes_cfg, shapes_tok
    it = _iterator(cfg, tok, 16)
    for batch in _take(it, 3):
        assert set(batch) == {"image", "text", "kind", "color", "size", "position", "attributes", "example_id"}
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (16, 64, 64, 3)
        # example_id: each row's index in the split (found independently from its image).
        assert batch["example_id"].dtype == np.int32
        assert batch["example_id"].tolist() == list(_row_ids(batch, cfg, shapes_train_index))
        assert batch["text"].dtype == np.int32 and batch["text"].shape == (16, cfg.max_text_len)
        for k in ("kind", "color", "size", "position"):
            assert batch[k].dtype == np.int32 and batch[k].shape == (16,)
        # Every row's text and labels belong to the row's image.
        for row, i in enumerate(_row_ids(batch, cfg, shapes_train_index)):
            rec = shapes_records["train"][i]
            assert tok.decode(batch["text"][row])[0] == data.normalize_text(rec["caption"].decode())
            assert [batch[k][row] for k in ("kind", "color", "size", "position")] == [
                rec[k] for k in ("kind", "color", "size", "position")]


def test_epochs_are_permutations_reshuffled_and_seeded(shapes_cfg, shapes_tok, shapes_train_index):
    cfg, tok, index = shapes_cfg, shapes_tok, shapes_train_index
    g = 20  # 15 steps per epoch of 300
    batches = _take(_iterator(cfg, tok, g, seed=0), 30)
    ids = [_row_ids(b, cfg, index) for b in batches]
    # example_id is the row's index in the split in every epoch (not the stream position).
    assert [list(b["example_id"]) for b in batches] == [list(i) for i in ids]
    epoch1 = [i for b in ids[:15] for i in b]
    epoch2 = [i for b in ids[15:] for i in b]
    assert sorted(epoch1) == list(range(N_TRAIN)) and sorted(epoch2) == list(range(N_TRAIN))
    assert epoch1 != epoch2 and epoch1 != list(range(N_TRAIN))
    other = [i for b in _take(_iterator(cfg, tok, g, seed=1), 2) for i in _row_ids(b, cfg, index)]
    assert other != epoch1[: 2 * g]
    again = [i for b in _take(_iterator(cfg, tok, g, seed=0), 2) for i in _row_ids(b, cfg, index)]
    assert again == epoch1[: 2 * g]


@pytest.mark.parametrize("source,g", [("shapes", 8), ("user", 4)])
def test_global_batch_is_independent_of_host_count(request, source, g):
    # Whatever the record format: shapes stores uint8 arrays, converted user data encoded bytes.
    cfg, tok = _source(request, source)
    n_train = len(data.build_dataset(cfg)["train"])
    epoch_steps = n_train // g
    steps = epoch_steps + 3  # crosses the epoch boundary (shapes: 300 / 8 = 37.5 steps)
    single = _take(_iterator(cfg, tok, g), steps)
    for n in (2, 4):
        hosts = [_take(_iterator(cfg, tok, g, p=p, n=n), steps) for p in range(n)]
        for step in range(steps):
            for key in single[step]:
                assert hosts[0][step][key].shape[0] == g // n
                np.testing.assert_array_equal(
                    np.concatenate([h[step][key] for h in hosts]), single[step][key])
    rows = {r.tobytes() for b in single[:epoch_steps] for r in b["image"]}
    assert len(rows) == epoch_steps * g  # no record twice within the epoch's batches


def test_hosts_cover_an_epoch_disjointly(shapes_cfg, shapes_tok, shapes_train_index):
    n, g = 4, 20
    per_host = [[i for b in _take(_iterator(shapes_cfg, shapes_tok, g, p=p, n=n), N_TRAIN // g)
                 for i in _row_ids(b, shapes_cfg, shapes_train_index)] for p in range(n)]
    assert all(len(ids) == N_TRAIN // n for ids in per_host)
    assert sorted(i for ids in per_host for i in ids) == list(range(N_TRAIN))


def test_batch_must_divide_over_hosts(shapes_cfg, shapes_tok):
    with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=4"):
        _iterator(shapes_cfg, shapes_tok, 10, n=4)


@pytest.mark.parametrize("source,g,p,n,skip,compare,overrides", [
    ("shapes", 16, 1, 2, 3, 4, {}),  # host 1 of 2
    # Mid-epoch (27 train records, batch 8), with augmented views and token masking: their
    # random draws continue exactly too.
    ("user", 8, 0, 1, 2, 3, dict(num_views=3, augment=SIMCLR, text_mask_prob=0.3)),
], ids=["shapes-host1of2", "user-views-masking"])
def test_iterator_state_round_trip(request, source, g, p, n, skip, compare, overrides):
    cfg, tok = _source(request, source, **overrides)
    it = _iterator(cfg, tok, g, p=p, n=n)
    _take(it, skip)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = _take(it, compare)
    resumed = _iterator(cfg, tok, g, p=p, n=n)
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, compare)):
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert resumed.stats() == it.stats()  # counters included


def test_worker_processes_give_the_same_stream(shapes_cfg, shapes_tok):
    want = _take(_iterator(shapes_cfg, shapes_tok, 16), 3)
    mp_cfg = shapes_config(shapes_cfg.data_dir, worker_count=1, mean=shapes_cfg.mean, std=shapes_cfg.std)
    it = _iterator(mp_cfg, shapes_tok, 16)
    got = _take(it, 3)
    json.dumps(it.get_state())
    for w, g in zip(want, got):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])


@pytest.mark.parametrize("p, n", [(0, 1), (1, 2)])
def test_peek_shapes_are_the_first_batch_and_leave_the_stream_alone(shapes_cfg, shapes_tok, p, n):
    """What the loop compiles the train step from before the first batch exists."""
    want = _take(_iterator(shapes_cfg, shapes_tok, 16, p=p, n=n), 2)
    it = _iterator(shapes_cfg, shapes_tok, 16, p=p, n=n)
    shapes = it.peek_shapes()
    assert shapes == {k: (v.shape, v.dtype) for k, v in want[0].items()}
    assert shapes["image"][0][0] == 16 // n  # this host's rows
    state = it.get_state()
    assert state["counters"]["records_read"] == 0  # peeking is not reading
    for w, g in zip(want, _take(it, 2)):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])


def test_cache_raw_gives_the_same_stream_and_reads_each_record_once(shapes_cfg, shapes_tok, monkeypatch):
    from contrastive_jax.data import pipeline

    reads = []
    real_build = pipeline.build_dataset

    class Counted:
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            reads.append(i)
            return self.source[i]

    monkeypatch.setattr(pipeline, "build_dataset",
                        lambda cfg: {k: Counted(v) for k, v in real_build(cfg).items()})
    batches = 3 * N_TRAIN // 16 + 2  # three epochs and a bit
    warm = N_TRAIN // 16 + 6  # past the first epoch and the read-ahead of the second
    want = _take(_iterator(shapes_cfg, shapes_tok, 16), batches)
    assert len(reads) >= batches * 16  # uncached: every visit reads
    reads.clear()
    cached_cfg = shapes_config(shapes_cfg.data_dir, cache_raw=True, mean=shapes_cfg.mean, std=shapes_cfg.std)
    it = _iterator(cached_cfg, shapes_tok, 16)
    got = _take(it, warm)
    first_epoch = list(reads)
    got += _take(it, batches - warm)
    for w, g in zip(want, got):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])
    # Cached: the first epoch reads the split (some records twice: seen 21-38 extra reads of 300,
    # varying from run to run with grain's read-ahead threads); the later epochs read nothing.
    assert sorted(set(first_epoch)) == list(range(N_TRAIN)) and len(first_epoch) < 2 * N_TRAIN
    assert reads == first_epoch


def test_no_tensorflow_imported(shapes_records, shapes_cfg, shapes_tok):
    _take(_iterator(shapes_cfg, shapes_tok, 8), 1)
    assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------------------------------------
# Views, augmentation, token masking
# ---------------------------------------------------------------------------------------------


def test_views_are_augmented_deterministically_and_tokens_masked(user_folder):
    root = user_folder[0]
    cfg = user_config(root / "tfds", "my_pics", num_views=3, augment=SIMCLR, text_mask_prob=0.3)
    tok = data.build_tokenizer(cfg)

    def it(seed=0):
        return _iterator(cfg, tok, 8, seed=seed)

    a = _take(it(), 3)
    b0 = a[0]
    assert set(b0) == {"image", "text", "image_views", "example_id"}
    assert b0["image_views"].shape == (8, 3, 24, 24, 3) and b0["image_views"].dtype == np.float32
    assert b0["image"].shape == (8, 24, 24, 3) and b0["image"].dtype == np.float32
    np.testing.assert_array_equal(b0["image"], b0["image_views"][:, 0])
    assert not np.allclose(b0["image_views"][:, 0], b0["image_views"][:, 1])  # views differ
    for x, y in zip(a, _take(it(), 3)):  # same seed: same stream
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = next(it(seed=1))
    assert not np.allclose(other["image_views"], b0["image_views"])
    # Token masking: only content positions change, and only into the mask id.
    unmasked = next(data.make_train_iterator(
        user_config(root / "tfds", "my_pics", num_views=3, augment=SIMCLR), tokenizer=tok,
        global_batch_size=8, process_index=0, process_count=1))
    changed = unmasked["text"] != b0["text"]
    assert changed.any()
    assert (b0["text"][changed] == tok.mask_id).all()
    assert not np.isin(unmasked["text"][changed], [tok.eos_id, tok.pad_id]).any()
    np.testing.assert_array_equal(unmasked["image_views"], b0["image_views"])


# ---------------------------------------------------------------------------------------------
# Extra features and bad records (in-memory registered datasets)
# ---------------------------------------------------------------------------------------------


def _memory_entry(records, **kw):
    return data.DatasetEntry(prepare=lambda c: {"train": records, "test": records[:4]},
                             vocabulary_texts=lambda c: ["a", "b", "c"], key_field="key", **kw)


def _records(n, bad=()):
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        blob = png(rng, 20, 20)
        if i in bad:
            blob = b"" if i % 2 else b"garbage"
        out.append({"image": blob, "caption": "a b c"[: 1 + 2 * (i % 3)], "key": f"r{i}",
                    "signal": np.arange(5, dtype=np.float32) + i, "group": np.int64(i // 4)})
    return out


def test_extra_features_pass_through_stacked(tmp_path):
    recs = _records(16)
    data.register_dataset("_extras", _memory_entry(recs, extra_features=("signal", "group")))
    try:
        cfg = user_config(tmp_path, "_extras", image_size=20)
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
        registry._DATASETS.pop("_extras")


def test_bad_records_at_load_time_are_replaced_and_counted(tmp_path):
    bad = {1, 4, 9}  # zero-byte (odd) and non-image bytes (even)
    recs = _records(40, bad)
    data.register_dataset("_bad", _memory_entry(recs, extra_features=("signal",)))
    try:
        cfg = user_config(tmp_path, "_bad", image_size=20, max_bad_fraction=0.1)
        tok = data.build_tokenizer(cfg)
        it = data.make_train_iterator(cfg, tokenizer=tok, global_batch_size=8, process_index=0,
                                      process_count=1)
        rows = [int(r) for _ in range(5) for r in next(it)["signal"][:, 0]]  # one epoch
        assert not set(rows) & bad  # bad records never reach a batch
        s = it.stats()
        assert s["data/records_read"] == 40 and s["data/skipped"] == 3
        assert s["data/skipped/empty_image"] == 2 and s["data/skipped/undecodable"] == 1
        assert set(SKIP_REASONS) >= {k.split("/")[-1] for k in s if k.startswith("data/skipped/")}
        strict = user_config(tmp_path, "_bad", image_size=20, max_bad_fraction=0.01)
        it = data.make_train_iterator(strict, tokenizer=tok, global_batch_size=8, process_index=0,
                                      process_count=1)
        with pytest.raises(DataQualityError, match="max_bad_fraction=0.01"):
            for _ in range(20):
                next(it)
    finally:
        registry._DATASETS.pop("_bad")


def test_whitespace_caption_is_skipped(tmp_path):
    recs = _records(12)
    recs[3]["caption"] = "  \n "
    data.register_dataset("_ws", _memory_entry(recs, extra_features=("signal",)))
    try:
        cfg = user_config(tmp_path, "_ws", image_size=20, max_bad_fraction=0.2)
        it = data.make_train_iterator(cfg, tokenizer=data.build_tokenizer(cfg), global_batch_size=4,
                                      process_index=0, process_count=1)
        rows = [int(r) for _ in range(3) for r in next(it)["signal"][:, 0]]
        assert 3 not in rows and it.stats()["data/skipped/empty_caption"] == 1
    finally:
        registry._DATASETS.pop("_ws")


# ---------------------------------------------------------------------------------------------
# Evaluation arrays
# ---------------------------------------------------------------------------------------------


def test_load_eval_arrays(shapes_cfg, shapes_tok, shapes_records):
    cfg, records = shapes_cfg, shapes_records
    ev = data.load_eval_arrays(cfg, "test", tokenizer=shapes_tok)
    assert set(ev) == {"image", "text", "caption", "kind", "color", "size", "position", "attributes"}
    assert ev["image"].shape == (N_TEST, 64, 64, 3) and ev["image"].dtype == np.float32
    assert ev["text"].shape == (N_TEST, cfg.max_text_len) and ev["text"].dtype == np.int32
    assert ev["caption"] == [r["caption"].decode() for r in records["test"]]
    want = (np.stack([r["image"] for r in records["test"]]) / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(ev["image"], want, atol=1e-5)
    np.testing.assert_array_equal(ev["color"], [r["color"] for r in records["test"]])
    assert ev["color"].dtype == np.int32
    first = data.load_eval_arrays(cfg, "validation", tokenizer=shapes_tok, max_examples=5)
    assert first["caption"] == [r["caption"].decode() for r in records["validation"][:5]]
    assert first["image"].shape[0] == 5


def _reference_image(blob, size):
    """Independent eval transform: shorter side -> size (bicubic), centre crop."""
    img = Image.open(io.BytesIO(blob)).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    l, t = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((l, t, l + size, t + size)))


def test_user_eval_arrays_match_reference(user_folder):
    root, files, captions, _ = user_folder
    cfg = user_config(root / "tfds", "my_pics", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
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
