"""contrastive_jax.data.shapes: the built-in ``shapes`` dataset -- generation, storage, held-out
pairs, captions and images agreeing with the labels, the ``attributes`` feature (Symile's third
modality) and the dataset's word vocabulary and prompts."""
import hashlib
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from contrastive_jax import data
from contrastive_jax.data import shapes
from contrastive_jax.train.config import default_config
from data_test_helpers import N_TEST, N_TRAIN, N_VAL, shapes_config

KINDS = ["circle", "square", "triangle", "star", "cross", "diamond"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
# Nominal colours, written independently of the renderer: every rendered shape must be nearest
# to its own label's colour.
NOMINAL_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
               "yellow": (235, 215, 40), "purple": (145, 60, 190), "orange": (245, 140, 30)}
SIZE_WORDS = {"small": {"small", "tiny", "little"}, "large": {"large", "big"}}
ROW_WORDS = [{"top", "upper"}, {"bottom", "lower"}]
COL_WORDS = [{"left"}, {"right"}]

# sha256 of (image bytes, caption, labels) from the 3.0.0 generator (before ``attributes``).
PINNED_3_0_0 = {
    ("train", 0): "1bdc299dd3d9f1e5004edc9ffb36f68fce676ca24c4c9caae5e7ff1bd727d608",
    ("validation", 5): "3b9c13df0970e9bd5c35ed61b169fbf8288e6213fee86848dcad153bf84affeb",
    ("test", 7): "78bbe02f77efff9360592a16df1b28f343c0ffb3222c170a6270742e0e351de0",
}


def _words(text):
    # Independent of the tokenizer's regex: pad punctuation with spaces, then whitespace-split.
    return re.sub(r"([,.:;!?])", r" \1 ", text.lower()).split()


def _vocab_config(**overrides):
    """``config.data`` with defaults (no data_dir: building the vocabulary generates nothing)."""
    cfg = default_config().data
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


# ---------------------------------------------------------------------------------------------
# Generation and storage
# ---------------------------------------------------------------------------------------------


def test_split_sizes_and_example_format(shapes_records):
    assert {s: len(r) for s, r in shapes_records.items()} == {
        "train": N_TRAIN, "validation": N_VAL, "test": N_TEST}
    for r in shapes_records["train"][:50]:
        img = r["image"]
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
        assert img.reshape(-1, 3).std(axis=0).max() > 10  # not one flat colour
        assert isinstance(r["caption"], bytes)
        assert 0 <= r["template_id"] < len(shapes.CAPTION_TEMPLATES)


def test_same_seed_is_identical_different_seed_differs(tmp_path):
    small = dict(image_size=32, num_train=12, num_validation=4, num_test=4)
    a = data.build_dataset(shapes_config(tmp_path / "a", **small))
    b = data.build_dataset(shapes_config(tmp_path / "b", **small))
    c = data.build_dataset(shapes_config(tmp_path / "c", dataset_seed=1, **small))
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
    s1 = data.build_dataset(shapes_config(tmp_path, num_train=8, **base))
    s2 = data.build_dataset(shapes_config(tmp_path, num_train=10, **base))
    assert len(s1["train"]) == 8 and len(s2["train"]) == 10
    names = sorted(p.name for p in (tmp_path / "shapes").iterdir() if not p.name.startswith("."))
    assert names == ["s32_n10_4_4_seed0", "s32_n8_4_4_seed0"]
    files = list((tmp_path / "shapes" / "s32_n8_4_4_seed0").rglob("*.array_record*"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again = data.build_dataset(shapes_config(tmp_path, num_train=8, **base))
    assert len(again["train"]) == 8
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes  # not regenerated


def test_stored_records_are_the_generator_output(shapes_records):
    for split in ("train", "test"):
        for i in (0, 7, len(shapes_records[split]) - 1):
            ex = shapes.generate_example(0, split, i, 64)
            rec = shapes_records[split][i]
            np.testing.assert_array_equal(rec["image"], ex["image"])
            assert rec["caption"].decode() == ex["caption"]
            assert [rec[k] for k in ("kind", "color", "size", "position")] == [
                ex[k] for k in ("kind", "color", "size", "position")]


def test_parallel_generation_matches_serial_order_and_bytes():
    # Two worker interpreters (the default on the 2-core machine for the quickstart's splits)
    # must yield exactly the serial stream, in index order, across several interleaved chunks.
    n = 3 * shapes._CHUNK + 17
    par = list(shapes.generate_split(0, "validation", n, 16, workers=2))
    assert len(par) == n
    for i in (0, 1, shapes._CHUNK - 1, shapes._CHUNK, 2 * shapes._CHUNK + 5, n - 1):
        ref = shapes.generate_example(0, "validation", i, 16)
        np.testing.assert_array_equal(par[i]["image"], ref["image"])
        np.testing.assert_array_equal(par[i]["attributes"], ref["attributes"])
        assert (par[i]["caption"], par[i]["kind"], par[i]["color"]) == (ref["caption"], ref["kind"], ref["color"])


def test_parallel_generation_reports_a_dead_worker():
    with pytest.raises(RuntimeError, match="render worker 0 for split 'nosuch' exited with code 1"):
        list(shapes.generate_split(0, "nosuch", 600, 16, workers=2))


def test_parallel_generation_from_a_script_without_main_guard(tmp_path):
    # A spawned multiprocessing pool would re-run this script in every worker (and hang); the
    # subprocess workers never import the caller's __main__.
    script = tmp_path / "gen.py"
    script.write_text("from contrastive_jax.data import shapes\n"
                      "print(len(list(shapes.generate_split(0, 'test', 600, 16, workers=2))))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "600"


@pytest.mark.parametrize("split,index", sorted(PINNED_3_0_0))
def test_other_features_are_byte_identical_to_3_0_0(split, index):
    # Adding ``attributes`` changed no other feature.
    e = shapes.generate_example(0, split, index, 32)
    labels = bytes([e["kind"], e["color"], e["size"], e["position"], e["template_id"]])
    digest = hashlib.sha256(e["image"].tobytes() + e["caption"].encode() + labels).hexdigest()
    assert digest == PINNED_3_0_0[(split, index)]


# ---------------------------------------------------------------------------------------------
# Labels, held-out pairs, captions, images
# ---------------------------------------------------------------------------------------------


def test_held_out_combinations(shapes_records):
    held = shapes.held_out_pairs()
    assert len(held) >= 5
    # Each colour and each kind keeps most partners in training.
    for c in range(len(COLORS)):
        assert sum(1 for k in range(len(KINDS)) if (k, c) not in held) >= len(KINDS) - 1
    for k in range(len(KINDS)):
        assert sum(1 for c in range(len(COLORS)) if (k, c) not in held) >= len(COLORS) - 1
    assert shapes.HELD_OUT_PAIRS == {(KINDS[k], COLORS[c]) for k, c in held}

    pairs = {s: {(r["kind"], r["color"]) for r in rs} for s, rs in shapes_records.items()}
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


def test_labels_agree_with_caption_words(shapes_records):
    for split, rs in shapes_records.items():
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


def test_images_show_the_labelled_colour_position_and_size(shapes_records):
    s = 64
    names = list(NOMINAL_RGB)
    nominal = np.array([NOMINAL_RGB[n] for n in names], np.float32)
    for r in shapes_records["train"][:150] + shapes_records["test"]:
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
# The ``attributes`` feature
# ---------------------------------------------------------------------------------------------


def _onehot(e):
    return np.concatenate([np.eye(len(v), dtype=np.float32)[e[k]] for k, v in shapes.ATTRIBUTES.items()])


def test_attribute_vector_encodes_the_scene():
    dim = sum(len(v) for v in shapes.ATTRIBUTES.values())
    assert shapes.ATTRIBUTE_VECTOR_DIM == dim == 18
    hits, n = 0, 200
    for i in range(n):
        e = shapes.generate_example(0, "train", i, 16 + 16)
        a = e["attributes"]
        assert a.shape == (dim,) and a.dtype == np.float32
        # Blocks in ATTRIBUTES order; with noise sigma 0.3 the argmax of a block is its label
        # unless the noise closes a gap of 1.
        off, ok = 0, True
        for attr in shapes.ATTRIBUTES:
            k = len(shapes.ATTRIBUTES[attr])
            ok &= int(np.argmax(a[off:off + k])) == e[attr]
            off += k
        hits += ok
    assert hits / n > 0.6
    res = np.concatenate([shapes.generate_example(0, "train", i, 32)["attributes"] for i in range(50)])
    onehot = np.concatenate([_onehot(shapes.generate_example(0, "train", i, 32)) for i in range(50)])
    noise = res - onehot
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - shapes.ATTRIBUTE_NOISE) < 0.03


# ---------------------------------------------------------------------------------------------
# The dataset's word vocabulary and prompts
# ---------------------------------------------------------------------------------------------


def test_vocabulary_covers_every_template_and_prompt():
    tok = data.build_tokenizer(_vocab_config())
    assert tok.max_len == 16
    placeholder = re.compile(r"\{\w*\}")
    texts = [placeholder.sub(" ", t) for t in shapes.CAPTION_TEMPLATES]
    texts += [placeholder.sub(" ", t) for ts in shapes.ZERO_SHOT_TEMPLATES.values() for t in ts]
    texts += [n for names in shapes.ATTRIBUTES.values() for n in names]
    texts += [s for forms in shapes.SYNONYMS.values() for ss in forms.values() for s in ss]
    for text in texts:
        for w in _words(text):
            assert w in tok, f"{w!r} (from {text!r}) is not in the vocabulary"
    for attr in shapes.ATTRIBUTES:
        prompts = [p for per_class in shapes.zero_shot_prompts(attr) for p in per_class]
        assert len(prompts) >= 3 * len(shapes.ATTRIBUTES[attr])
        ids = tok.encode(prompts)
        assert not (ids == tok.unk_id).any()


def test_captions_encode_without_unk_or_truncation():
    tok = data.build_tokenizer(_vocab_config())
    rng = np.random.default_rng(0)
    captions = []
    for _ in range(300):
        labels = [int(rng.integers(len(shapes.ATTRIBUTES[a])))
                  for a in ("kind", "color", "size", "position")]
        captions.append(shapes.make_caption(rng, *labels)[0])
    ids = tok.encode(captions)
    assert not (ids == tok.unk_id).any()
    # Room for EOS: no caption is cut.
    np.testing.assert_array_equal(tok.eos_positions(ids), [len(_words(c)) for c in captions])
    assert tok.decode(ids) == [" ".join(_words(c)) for c in captions]


def test_vocabulary_does_not_depend_on_sampling():
    a = data.build_tokenizer(_vocab_config(dataset_seed=0, num_train=100))
    b = data.build_tokenizer(_vocab_config(dataset_seed=7, num_train=5000, max_text_len=16))
    assert a.vocabulary == b.vocabulary
    assert data.build_tokenizer(_vocab_config(max_text_len=9)).max_len == 9


def test_ensemble_prompts_name_their_class_and_marginalize_the_others():
    tok = data.build_tokenizer(ml_collections.ConfigDict(dict(name="shapes", max_text_len=16)))
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
