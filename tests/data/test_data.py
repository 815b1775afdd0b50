"""Tests of the shapes dataset and the grain pipelines (small datasets, generated in tmp dirs)."""
import json
import re
import sys

import numpy as np
import pytest

from contrastive_jax import data
from contrastive_jax.data import shapes
from contrastive_jax.train.config import default_config

N_TRAIN, N_VAL, N_TEST = 300, 40, 60
KINDS = ["circle", "square", "triangle", "star", "cross", "diamond"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
# Nominal colours, written independently of the renderer: every rendered shape must be nearest
# to its own label's colour.
NOMINAL_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
               "yellow": (235, 215, 40), "purple": (145, 60, 190), "orange": (245, 140, 30)}
SIZE_WORDS = {"small": {"small", "tiny", "little"}, "large": {"large", "big"}}
ROW_WORDS = [{"top", "upper"}, {"bottom", "lower"}]
COL_WORDS = [{"left"}, {"right"}]


def _config(data_dir, **overrides):
    cfg = default_config().data
    cfg.data_dir = str(data_dir)
    cfg.num_train, cfg.num_validation, cfg.num_test = N_TRAIN, N_VAL, N_TEST
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return _config(tmp_path_factory.mktemp("tfds"), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def sources(cfg):
    return data.build_dataset(cfg)


@pytest.fixture(scope="module")
def records(sources):
    """All records of all splits, decoded once: {split: list of dicts}."""
    return {split: [src[i] for i in range(len(src))] for split, src in sources.items()}


@pytest.fixture(scope="module")
def tok(cfg):
    return data.build_tokenizer(cfg)


@pytest.fixture(scope="module")
def train_index(records):
    """Image bytes -> train index: identifies which example a pipeline row came from."""
    index = {r["image"].tobytes(): i for i, r in enumerate(records["train"])}
    assert len(index) == N_TRAIN  # images are unique, so identification is unambiguous
    return index


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


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def test_split_sizes_and_example_format(records):
    assert {s: len(r) for s, r in records.items()} == {
        "train": N_TRAIN, "validation": N_VAL, "test": N_TEST}
    for r in records["train"][:50]:
        img = r["image"]
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
        assert img.reshape(-1, 3).std(axis=0).max() > 10  # not one flat colour
        assert isinstance(r["caption"], bytes)
        assert 0 <= r["template_id"] < len(shapes.CAPTION_TEMPLATES)


def test_same_seed_is_identical_different_seed_differs(tmp_path):
    small = dict(image_size=32, num_train=12, num_validation=4, num_test=4)
    a = data.build_dataset(_config(tmp_path / "a", **small))
    b = data.build_dataset(_config(tmp_path / "b", **small))
    c = data.build_dataset(_config(tmp_path / "c", dataset_seed=1, **small))
    for split in ("train", "validation", "test"):
        for i in range(len(a[split])):
            ra, rb = a[split][i], b[split][i]
            assert ra.keys() == rb.keys()
            for k in ra:
                np.testing.assert_array_equal(ra[k], rb[k])
        assert any(not np.array_equal(a[split][i]["image"], c[split][i]["image"])
                   for i in range(len(a[split])))
    # Files on disk are byte-identical too.
    for split in ("train", "test"):
        fa = sorted((tmp_path / "a").rglob(f"shapes-{split}.array_record*"))
        fb = sorted((tmp_path / "b").rglob(f"shapes-{split}.array_record*"))
        assert fa and [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb]


def test_settings_get_distinct_dirs_and_prepared_data_is_reused(tmp_path):
    base = dict(image_size=32, num_validation=4, num_test=4)
    s1 = data.build_dataset(_config(tmp_path, num_train=8, **base))
    s2 = data.build_dataset(_config(tmp_path, num_train=10, **base))
    assert len(s1["train"]) == 8 and len(s2["train"]) == 10
    names = sorted(p.name for p in (tmp_path / "shapes").iterdir() if not p.name.startswith("."))
    assert names == ["s32_n10_4_4_seed0", "s32_n8_4_4_seed0"]
    files = list((tmp_path / "shapes" / "s32_n8_4_4_seed0").rglob("*.array_record*"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again = data.build_dataset(_config(tmp_path, num_train=8, **base))
    assert len(again["train"]) == 8
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes  # not regenerated


def test_stored_records_are_the_generator_output(records):
    for split in ("train", "test"):
        for i in (0, 7, len(records[split]) - 1):
            ex = shapes.generate_example(0, split, i, 64)
            rec = records[split][i]
            np.testing.assert_array_equal(rec["image"], ex["image"])
            assert rec["caption"].decode() == ex["caption"]
            assert [rec[k] for k in ("kind", "color", "size", "position")] == [
                ex[k] for k in ("kind", "color", "size", "position")]


def test_held_out_combinations(records):
    held = shapes.held_out_pairs()
    assert len(held) >= 5
    # Each colour and each kind keeps most partners in training.
    for c in range(len(COLORS)):
        assert sum(1 for k in range(len(KINDS)) if (k, c) not in held) >= len(KINDS) - 1
    for k in range(len(KINDS)):
        assert sum(1 for c in range(len(COLORS)) if (k, c) not in held) >= len(COLORS) - 1
    assert shapes.HELD_OUT_PAIRS == {(KINDS[k], COLORS[c]) for k, c in held}

    pairs = {s: {(r["kind"], r["color"]) for r in rs} for s, rs in records.items()}
    assert pairs["test"] <= held
    assert not pairs["train"] & held and not pairs["validation"] & held
    assert {k for k, _ in pairs["train"]} == set(range(len(KINDS)))
    assert {c for _, c in pairs["train"]} == set(range(len(COLORS)))
    assert len(pairs["test"]) == len(held)  # 60 test examples cover all 6 held-out pairs


def test_attribute_names_and_prompts():
    assert shapes.ATTRIBUTES["kind"] == KINDS and shapes.ATTRIBUTES["color"] == COLORS
    assert shapes.ATTRIBUTES["size"] == ["small", "large"]
    assert len(shapes.ATTRIBUTES["position"]) == shapes.GRID ** 2 >= 4
    assert len(shapes.CAPTION_TEMPLATES) >= 6
    for attr, templates in shapes.ZERO_SHOT_TEMPLATES.items():
        assert len(templates) >= 3 and all(t.count("{}") == 1 for t in templates)
    assert "an orange object" in shapes.zero_shot_prompts("color")[COLORS.index("orange")]


def test_labels_agree_with_caption_words(records):
    for split, rs in records.items():
        for r in rs:
            words = re.findall(r"[a-z]+", r["caption"].decode())
            assert [w for w in words if w in KINDS] == [KINDS[r["kind"]]], r["caption"]
            assert [w for w in words if w in COLORS] == [COLORS[r["color"]]], r["caption"]
            size_words = [w for w in words if w in SIZE_WORDS["small"] | SIZE_WORDS["large"]]
            assert len(size_words) == 1
            assert size_words[0] in SIZE_WORDS[shapes.ATTRIBUTES["size"][r["size"]]]
            row, col = divmod(r["position"], shapes.GRID)
            pos_words = set(words) - set(KINDS) - set(COLORS) - SIZE_WORDS["small"] - SIZE_WORDS["large"]
            place = pos_words & {"top", "upper", "middle", "center", "bottom", "lower", "left", "right"}
            expected_row, expected_col = ROW_WORDS[row], COL_WORDS[col]
            assert place & expected_row and place & expected_col, (r["caption"], r["position"])
            assert place <= expected_row | expected_col, (r["caption"], r["position"])
            # The caption is its template filled in.
            pattern = re.escape(shapes.CAPTION_TEMPLATES[r["template_id"]])
            pattern = re.sub(r"\\\{\w+\\\}", "[a-z ]+", pattern).replace("a\\ ", "an?\\ ")
            assert re.fullmatch(pattern, r["caption"].decode()), r["caption"]


def test_images_show_the_labelled_colour_position_and_size(records):
    s = 64
    names = list(NOMINAL_RGB)
    nominal = np.array([NOMINAL_RGB[n] for n in names], np.float32)
    for r in records["train"][:150] + records["test"]:
        img = r["image"].astype(np.float32)
        # Background is near-grey; every shape colour is strongly saturated.
        mask = img.max(-1) - img.min(-1) > 60
        assert mask.sum() > 40, "shape not found"
        mean_rgb = img[mask].mean(0)
        assert names[np.argmin(((nominal - mean_rgb) ** 2).sum(-1))] == COLORS[r["color"]]
        ys, xs = np.nonzero(mask)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        row, col = divmod(r["position"], shapes.GRID)
        for centre, want in ((cy, row), (cx, col)):
            got = int(centre >= s / 2)
            assert got == want, (r["caption"], cy, cx)
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert (extent > 0.34 * s) == (r["size"] == 1), (r["caption"], extent)
        if r["size"] == 0:
            assert extent >= 14  # small shapes stay recognisable


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def test_train_batches_shapes_dtypes_and_alignment(cfg, tok, records, train_index):
    it = _iterator(cfg, tok, 16)
    for batch in _take(it, 3):
        assert set(batch) == {"image", "text", "kind", "color", "size", "position", "attributes"}
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (16, 64, 64, 3)
        assert batch["text"].dtype == np.int32 and batch["text"].shape == (16, cfg.max_text_len)
        for k in ("kind", "color", "size", "position"):
            assert batch[k].dtype == np.int32 and batch[k].shape == (16,)
        # Every row's text and labels belong to the row's image.
        for row, i in enumerate(_row_ids(batch, cfg, train_index)):
            rec = records["train"][i]
            assert tok.decode(batch["text"][row])[0] == data.normalize_text(rec["caption"].decode())
            assert [batch[k][row] for k in ("kind", "color", "size", "position")] == [
                rec[k] for k in ("kind", "color", "size", "position")]


def test_epochs_are_permutations_reshuffled_and_seeded(cfg, tok, train_index):
    g = 20  # 15 steps per epoch of 300
    ids = [_row_ids(b, cfg, train_index) for b in _take(_iterator(cfg, tok, g, seed=0), 30)]
    epoch1 = [i for b in ids[:15] for i in b]
    epoch2 = [i for b in ids[15:] for i in b]
    assert sorted(epoch1) == list(range(N_TRAIN)) and sorted(epoch2) == list(range(N_TRAIN))
    assert epoch1 != epoch2 and epoch1 != list(range(N_TRAIN))
    other = [i for b in _take(_iterator(cfg, tok, g, seed=1), 2) for i in _row_ids(b, cfg, train_index)]
    assert other != epoch1[: 2 * g]
    again = [i for b in _take(_iterator(cfg, tok, g, seed=0), 2) for i in _row_ids(b, cfg, train_index)]
    assert again == epoch1[: 2 * g]


def test_global_batch_is_independent_of_host_count(cfg, tok):
    g, steps = 8, 40  # crosses the epoch boundary (300 / 8 = 37.5 steps)
    single = _take(_iterator(cfg, tok, g), steps)
    for n in (2, 4):
        hosts = [_take(_iterator(cfg, tok, g, p=p, n=n), steps) for p in range(n)]
        for step in range(steps):
            for key in single[step]:
                assert hosts[0][step][key].shape[0] == g // n
                np.testing.assert_array_equal(
                    np.concatenate([h[step][key] for h in hosts]), single[step][key])


def test_hosts_cover_an_epoch_disjointly(cfg, tok, train_index):
    n, g = 4, 20
    per_host = [[i for b in _take(_iterator(cfg, tok, g, p=p, n=n), N_TRAIN // g)
                 for i in _row_ids(b, cfg, train_index)] for p in range(n)]
    assert all(len(ids) == N_TRAIN // n for ids in per_host)
    assert sorted(i for ids in per_host for i in ids) == list(range(N_TRAIN))


def test_batch_must_divide_over_hosts(cfg, tok):
    with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=4"):
        _iterator(cfg, tok, 10, n=4)


def test_iterator_state_round_trip(cfg, tok):
    it = _iterator(cfg, tok, 16, p=1, n=2)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = _take(it, 4)
    resumed = _iterator(cfg, tok, 16, p=1, n=2)
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 4)):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_load_eval_arrays(cfg, tok, records):
    ev = data.load_eval_arrays(cfg, "test", tokenizer=tok)
    assert set(ev) == {"image", "text", "caption", "kind", "color", "size", "position", "attributes"}
    assert ev["image"].shape == (N_TEST, 64, 64, 3) and ev["image"].dtype == np.float32
    assert ev["text"].shape == (N_TEST, cfg.max_text_len) and ev["text"].dtype == np.int32
    assert ev["caption"] == [r["caption"].decode() for r in records["test"]]
    want = (np.stack([r["image"] for r in records["test"]]) / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(ev["image"], want, atol=1e-5)
    np.testing.assert_array_equal(ev["color"], [r["color"] for r in records["test"]])
    assert ev["color"].dtype == np.int32
    first = data.load_eval_arrays(cfg, "validation", tokenizer=tok, max_examples=5)
    assert first["caption"] == [r["caption"].decode() for r in records["validation"][:5]]
    assert first["image"].shape[0] == 5


def test_unknown_dataset_name(cfg):
    bad = _config(cfg.data_dir, name="imagenet_typo")
    with pytest.raises(ValueError, match="config.data.name='imagenet_typo'.*shapes"):
        data.build_dataset(bad)


def test_registry_dispatches_by_name(cfg):
    calls = []
    entry = data.DatasetEntry(prepare=lambda c: calls.append(c) or {"train": [1, 2]},
                              vocabulary_texts=lambda c: ["hello world"])
    data.register_dataset("_test_dataset", entry)
    try:
        with pytest.raises(ValueError, match="already registered"):
            data.register_dataset("_test_dataset", entry)
        custom = _config(cfg.data_dir, name="_test_dataset")
        assert data.build_dataset(custom) == {"train": [1, 2]} and calls == [custom]
        assert data.build_tokenizer(custom).vocabulary[3:] == ["hello", "world"]
    finally:
        data.registry._DATASETS.pop("_test_dataset")


def test_worker_processes_give_the_same_stream(cfg, tok):
    want = _take(_iterator(cfg, tok, 16), 3)
    mp_cfg = _config(cfg.data_dir, worker_count=1, mean=cfg.mean, std=cfg.std)
    it = _iterator(mp_cfg, tok, 16)
    got = _take(it, 3)
    json.dumps(it.get_state())
    for w, g in zip(want, got):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])


def test_no_tensorflow_imported(records, cfg, tok):
    _take(_iterator(cfg, tok, 8), 1)
    assert "tensorflow" not in sys.modules


def test_ensemble_prompts_name_their_class_and_marginalize_the_others():
    from contrastive_jax.data.tokenizer import build_tokenizer
    import ml_collections

    tok = build_tokenizer(ml_collections.ConfigDict(dict(name="shapes", max_text_len=16)))
    for attr, names in shapes.ATTRIBUTES.items():
        prompts = shapes.ensemble_prompts(attr)
        assert len(prompts) == len(names)
        others = int(np.prod([len(v) for a, v in shapes.ATTRIBUTES.items() if a != attr]))
        for name, per_class in zip(names, prompts):
            assert len(per_class) == len(shapes.CAPTION_TEMPLATES) * others
            assert all(name in p for p in per_class)
            # Nothing falls out of the vocabulary, and nothing is truncated.
            ids = tok.encode(per_class)
            assert not np.any(ids == tok.unk_id)
            assert np.all(tok.eos_positions(ids) < tok.max_len)
