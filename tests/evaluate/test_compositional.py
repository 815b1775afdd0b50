"""Compositional benchmarks (SugarCrepe, ARO, Winoground) on tiny fixtures in each published layout.

Each fixture is written here in the benchmark's own file format (JSON / JSONL with the published
keys, solid-colour PNG images). A stub model maps each image to a vector chosen by its mean colour
(so a wrong crop or a swapped image gives another vector) and each text to a chosen vector; the
expected metrics are worked out by hand in the comments next to each case.
"""
import json
import math

import numpy as np
import pytest
from PIL import Image

from contrastive_jax.evaluate.benchmark import compositional as comp
from tests.interop.test_interop import merges  # noqa: F401  (the fixture of a tiny CLIP BPE merges file)

RED, GREEN, BLUE, GRAY, YELLOW = (200, 0, 0), (0, 200, 0), (0, 0, 200), (100, 100, 100), (200, 200, 0)


def _unit2(deg):
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg)), 0.0])


class StubModel:
    """``encode_images``: the vector of the image's mean colour; ``encode_texts``: the vector of the
    text (``default`` for texts not listed). Vectors are returned unnormalized (scaled by 3) so that
    the benchmark's own normalization is exercised; calls are recorded."""

    def __init__(self, images: dict, texts: dict, default=(0.0, 0.0, 1.0)):
        self.images, self.texts, self.default = images, texts, np.asarray(default, float)
        self.image_calls, self.text_calls = [], []

    def encode_images(self, images):
        self.image_calls.append(len(images))
        out = []
        for img in images:
            arr = np.asarray(img.convert("RGB"), np.float64).reshape(-1, 3)
            key = tuple(int(v) for v in np.round(arr.mean(0)))
            out.append(3.0 * np.asarray(self.images[key], float))
        return np.stack(out).astype(np.float32)

    def encode_texts(self, texts):
        self.text_calls.append(len(texts))
        return np.stack([3.0 * np.asarray(self.texts.get(t, self.default), float) for t in texts]).astype(np.float32)


def _png(path, colour, size=(16, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG bytes also for *.jpg names: PIL reads by content, and lossless colours keep the stub exact.
    Image.new("RGB", size, colour).save(path, format="PNG")


def _halves(path, left, right):
    """A 20x10 image, left half ``left``, right half ``right`` (ARO crops select one half)."""
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10], arr[:, 10:] = left, right
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


# -- SugarCrepe -------------------------------------------------------------------------------------

def _sugarcrepe(root, images_dir="val2017", ann_sub=""):
    folder = root / "sugarcrepe"
    _png(folder / images_dir / "000000000001.jpg", RED)
    _png(folder / images_dir / "000000000002.jpg", GREEN)
    ann = folder / ann_sub if ann_sub else folder
    ann.mkdir(parents=True, exist_ok=True)
    # Per subset: (filename, positive, negative). Texts 'P*' point at the image's vector, 'N*' away;
    # 'T*' captions all map to one vector (a tie).
    cases = {
        "add_att": [("000000000001.jpg", "Pred", "Ngreen"), ("000000000002.jpg", "Pgreen", "Nred")],  # 2/2
        "add_obj": [("000000000001.jpg", "Ngreen", "Pred")],  # negative wins: 0/1
        "replace_att": [("000000000001.jpg", "Tie a", "Tie b"), ("000000000002.jpg", "Pgreen", "Nred")],  # tie wrong: 1/2
        "replace_obj": [("000000000002.jpg", "Pgreen", "Nred")] * 3 + [("000000000001.jpg", "Ngreen", "Pred")],  # 3/4
        "replace_rel": [("000000000001.jpg", "Pred", "Nred-ish")],  # 1/1
        "swap_att": [("000000000002.jpg", "Nred", "Pgreen")],  # 0/1
        "swap_obj": [("000000000002.jpg", "Pgreen", "Nred"), ("000000000001.jpg", "Pred", "Ngreen")],  # 2/2
    }
    for subset, rows in cases.items():
        data = {str(i): {"filename": f, "caption": p, "negative_caption": n} for i, (f, p, n) in enumerate(rows)}
        (ann / f"{subset}.json").write_text(json.dumps(data))
    return folder


def _sugarcrepe_model():
    texts = {"Pred": _unit2(0), "Pgreen": _unit2(90), "Nred": _unit2(0), "Ngreen": _unit2(90),
             "Tie a": _unit2(45), "Tie b": _unit2(45), "Nred-ish": _unit2(60)}
    return StubModel({RED: _unit2(0), GREEN: _unit2(90)}, texts)


def test_sugarcrepe_scores_per_subset_ties_and_means(tmp_path):
    folder = _sugarcrepe(tmp_path)
    assert comp.find("sugarcrepe", tmp_path) == str(folder)
    model = _sugarcrepe_model()
    out = comp.evaluate("sugarcrepe", folder, model, batch_size=3, progress=False)
    want = {"add_att": 1.0, "add_obj": 0.0, "replace_att": 0.5, "replace_obj": 0.75, "replace_rel": 1.0,
            "swap_att": 0.0, "swap_obj": 1.0}
    for k, v in want.items():
        assert out[k] == pytest.approx(v), k
    assert out["add"] == pytest.approx(0.5)
    assert out["replace"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert out["swap"] == pytest.approx(0.5)
    assert out["mean"] == pytest.approx(sum(want.values()) / 7)  # unweighted over subsets, not over 13 cases
    assert out["n"] == 13
    assert out[comp.MAIN_METRIC["sugarcrepe"]] == out["mean"]
    # Each distinct image / text is encoded once, in batches of at most 3.
    assert sum(model.image_calls) == 2 and max(model.image_calls) <= 3
    assert sum(model.text_calls) == 7 and max(model.text_calls) <= 3


def test_sugarcrepe_annotations_in_data_subfolder(tmp_path):
    folder = _sugarcrepe(tmp_path, ann_sub="data")
    assert comp.find("sugarcrepe", tmp_path) == str(folder)
    assert comp.evaluate("sugarcrepe", folder, _sugarcrepe_model(), progress=False)["add_att"] == 1.0


def test_sugarcrepe_correct_is_strict():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    pos = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    neg = np.array([[1.0, -1.0], [1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(comp.sugarcrepe_correct(img, pos, neg), [False, False, True])


# -- find ------------------------------------------------------------------------------------------

def test_find_none_for_missing_and_partial_folders(tmp_path):
    for name in comp.DATASETS:
        assert comp.find(name, tmp_path / "nope") is None
        assert comp.find(name, tmp_path) is None
        assert comp.find(name, None) is None
    folder = _sugarcrepe(tmp_path)
    (folder / "swap_obj.json").unlink()  # 6 of 7 subsets
    assert comp.find("sugarcrepe", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="found 6 of 7"):
        comp.evaluate("sugarcrepe", folder, _sugarcrepe_model(), progress=False)
    # Annotations without images.
    aro = tmp_path / "aro"
    aro.mkdir()
    (aro / "visual_genome_relation.json").write_text("[]")
    assert comp.find("aro_vg_relation", tmp_path) is None
    (aro / "images").mkdir()
    assert comp.find("aro_vg_relation", tmp_path) is None  # empty image folder
    _png(aro / "images" / "1.jpg", RED)
    assert comp.find("aro_vg_relation", tmp_path) == str(aro)
    assert comp.find("aro_vg_relation", aro) == str(aro)  # root may be the dataset folder itself
    assert comp.find("aro_vg_attribution", tmp_path) is None  # its own JSON is missing
    with pytest.raises(ValueError, match="unknown compositional benchmark 'aro'"):
        comp.find("aro", tmp_path)


# -- ARO VG-Relation / VG-Attribution --------------------------------------------------------------

def _vg_entry(image, box, true, false, **group):
    x, y, w, h = box
    return dict(image_id=0, image_path=image, bbox_x=x, bbox_y=y, bbox_w=w, bbox_h=h, true_caption=true,
                false_caption=false, **group)


LEFT, RIGHT = (0, 0, 10, 10), (10, 0, 10, 10)


def _vg_model():
    # Crops: the red half -> e_x, the blue half -> e_y. 'X' captions -> e_x, 'Y' captions -> e_y.
    return StubModel({RED: _unit2(0), BLUE: _unit2(90)},
                     {"X true": _unit2(0), "X false": _unit2(90), "Y true": _unit2(90), "Y false": _unit2(0),
                      "tie true": _unit2(30), "tie false": _unit2(30)})


def test_aro_vg_relation_macro_excludes_listed_relations_and_differs_from_micro(tmp_path):
    aro = tmp_path / "aro"
    _halves(aro / "images" / "10.jpg", RED, BLUE)
    rel = lambda r, box, t, f: _vg_entry("10.jpg", box, t, f, relation_name=r)  # noqa: E731
    data = ([rel("on", LEFT, "X true", "X false")] * 3 + [rel("on", RIGHT, "Y true", "Y false")]  # on: 4/4
            # 'above': the crop must be the blue half ('Y true' wins there, 'X true' would not): 0/2
            + [rel("above", RIGHT, "X true", "X false"), rel("above", LEFT, "tie true", "tie false")]
            + [rel("next to", LEFT, "X false", "X true")])  # excluded by the paper: 0/1
    (aro / "visual_genome_relation.json").write_text(json.dumps(data))
    assert "next to" in comp.ARO_VG_RELATION_EXCLUDED and "on" not in comp.ARO_VG_RELATION_EXCLUDED
    out = comp.evaluate("aro_vg_relation", comp.find("aro_vg_relation", tmp_path), _vg_model(), progress=False)
    assert out["micro_accuracy"] == pytest.approx(4 / 7)
    assert out["accuracy"] == pytest.approx((1.0 + 0.0) / 2)  # macro over 'on', 'above'
    assert out["macro_accuracy_all_relations"] == pytest.approx(1 / 3)
    assert out["num_relations"] == 2 and out["n"] == 7


def test_aro_vg_attribution_drops_pairs_under_25_cases(tmp_path):
    aro = tmp_path / "aro"
    _halves(aro / "images" / "a.jpg", RED, BLUE)
    _halves(aro / "images" / "b.jpg", BLUE, RED)
    att = lambda img, box, t, f, pair: _vg_entry(img, box, t, f, attributes=pair)  # noqa: E731
    data = ([att("a.jpg", LEFT, "X true", "X false", ["red", "blue"])] * 20  # a.jpg left = red: right
            + [att("b.jpg", LEFT, "X true", "X false", ["red", "blue"])] * 5  # b.jpg left = blue: wrong
            + [att("b.jpg", RIGHT, "X true", "X false", ["wet", "dry"])] * 25  # b.jpg right = red: right
            + [att("a.jpg", LEFT, "tie true", "tie false", ["big", "small"])] * 3)  # < 25 cases: dropped
    (aro / "visual_genome_attribution.json").write_text(json.dumps(data))
    model = _vg_model()
    out = comp.evaluate("aro_vg_attribution", str(aro), model, batch_size=16, progress=False)
    assert out["accuracy"] == pytest.approx((20 / 25 + 25 / 25) / 2)
    assert out["micro_accuracy"] == pytest.approx(45 / 53)
    assert out["num_attribute_pairs"] == 2 and out["n"] == 53
    # 53 cases but 3 distinct (image, box) crops, each encoded once.
    assert sum(model.image_calls) == 3


def test_group_accuracy_against_numpy():
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.6
    groups = rng.choice(["a", "b", "c", "d"], size=200, p=[0.5, 0.3, 0.15, 0.05]).tolist()
    macro, per = comp.group_accuracy(correct, groups, min_count=15, exclude=["b"])
    g = np.array(groups)
    kept = [k for k in "acd" if (g == k).sum() >= 15]
    assert sorted(per) == kept
    assert macro == pytest.approx(np.mean([correct[g == k].mean() for k in kept]))


# -- ARO order -------------------------------------------------------------------------------------

TAGS = {"a": "DT", "red": "JJ", "small": "JJ", "dog": "NN", "cat": "NN", "mat": "NN", "on": "IN", "sits": "VBZ",
        "the": "DT", "near": "IN", ".": "."}


def _tagger(text):
    toks = comp.word_tokens(text)
    return [(t, TAGS.get(t.lower(), "NN")) for t in toks]


def test_order_options_are_the_four_perturbations():
    caption = "A red dog sits on the small mat near a cat."
    rng = np.random.default_rng(0)
    opts = comp.order_options(caption, rng, _tagger)
    assert len(opts) == 5
    assert opts[0] == "a red dog sits on the small mat near a cat"  # cleaned, '.' removed
    words = sorted(opts[0].split())
    for o in opts[1:]:
        assert sorted(o.split()) == words  # a permutation of the same words
    toks = [t for t, _ in _tagger(caption)]
    tags = [TAGS.get(t.lower(), "NN") for t in toks]
    # Perturbation 1 keeps every other word in place ('.' stays last, so cleaning shifts nothing).
    got, want = opts[1].split(), [t.lower() for t in toks if t != "."]
    assert [g for g, tg in zip(got, tags) if tg not in ("NN", "JJ")] == \
        [w for w, tg in zip(want, tags) if tg not in ("NN", "JJ")]
    # Perturbation 2 keeps nouns and adjectives in their slots, so their sequence is unchanged.
    content = [t.lower() for t, tg in zip(toks, tags) if tg in ("NN", "JJ")]
    assert [w for w in opts[2].split() if w in content] == content
    # Nouns move among noun slots only.
    noun_slots = [i for i, tg in enumerate(tags) if tg == "NN"]
    assert sorted(opts[1].split()[i] for i in noun_slots) == ["cat", "dog", "mat"]
    # Within-trigram shuffle keeps each trigram's words; trigram shuffle keeps trigrams intact.
    grams = [toks[i:i + 3] for i in range(0, len(toks), 3)]
    p3 = [w for w in comp.word_tokens(opts[3])]
    assert [sorted(p3[i:i + 3]) for i in range(0, len(p3), 3)][:3] == [sorted(w.lower() for w in g) for g in grams][:3]
    joined = [" ".join(g).lower().replace(" .", "").strip() for g in grams]
    assert all(j in opts[4] for j in joined)
    # Deterministic for a seed.
    assert comp.order_options(caption, np.random.default_rng(0), _tagger) == opts


def test_clean_caption_matches_aro_rules():
    assert comp.clean_caption("A  Dog (black); jumps!  ") == "a dog black jumps"
    assert comp.clean_caption(" ".join(f"w{i}" for i in range(40))) == " ".join(f"w{i}" for i in range(30))


def test_order_correct_tie_with_true_caption_counts():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    opts = np.array([[[1.0, 0.0], [0.0, 1.0]],     # true wins
                     [[0.0, 1.0], [1.0, 0.1]],     # a perturbation wins
                     [[1.0, 1.0], [2.0, 2.0]]])    # tie (same direction): first = true wins, as np.argmax
    np.testing.assert_array_equal(comp.order_correct(img, opts), [True, False, True])


@pytest.mark.parametrize("name,folder,ann,image_dir", [
    ("aro_coco_order", "coco", "coco_karpathy_test.json", "val2014"),
    ("aro_flickr_order", "flickr30k", "flickr30k_test.json", "flickr30k-images"),
])
def test_aro_order_end_to_end(tmp_path, name, folder, ann, image_dir):
    base = tmp_path / folder
    _png(base / image_dir / "one.jpg", RED)
    _png(base / image_dir / "two.jpg", GREEN)
    entries = [{"image": f"{image_dir}/one.jpg", "caption": ["A red dog sits on the mat.", "the cat ."]},
               {"image": f"{image_dir}/two.jpg", "caption": ["A small cat on a mat."]}]
    (base / ann).write_text(json.dumps(entries))
    assert comp.find(name, tmp_path) == str(base)
    # Case 1: its true caption points at the red image, perturbations at the default -> right.
    # Case 2: "the cat" and its perturbations all get the default vector (all tied) -> right (argmax 0).
    # Case 3: its true caption points away from the green image -> wrong. Accuracy 2/3.
    texts = {"a red dog sits on the mat": _unit2(0), "a small cat on a mat": _unit2(-90)}
    model = StubModel({RED: _unit2(0), GREEN: _unit2(90)}, texts, default=(0.0, 0.0, 1.0))
    out = comp.evaluate(name, base, model, progress=False, tagger=_tagger)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["n"] == 3


def test_order_without_tagger_explains(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_spacy(name, *a, **k):
        if name == "spacy":
            raise ImportError("no spacy here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_spacy)
    with pytest.raises(RuntimeError, match="en_core_web_sm"):
        comp.spacy_tagger()


# -- Winoground ------------------------------------------------------------------------------------

def _winoground(root, sub=""):
    folder = root / "winoground"
    base = folder / sub if sub else folder
    colours = [RED, GREEN, BLUE, GRAY, YELLOW, (0, 200, 200)]
    lines = []
    for i in range(3):
        for j in range(2):
            _png(base / "images" / f"ex_{i}_img_{j}.png", colours[2 * i + j])
        lines.append(json.dumps({"id": i, "caption_0": f"c{i}0", "caption_1": f"c{i}1", "tag": "Object",
                                 "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": "Object",
                                 "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1"}))
    (base / "examples.jsonl").write_text("\n".join(lines) + "\n")
    # Images at 0 and 90 degrees. Example 0: captions at 0 / 90 -> all right. Example 1: captions at
    # 10 / 40: s00=cos10 > s10=cos40 and s11=sin40 > s01=sin10 (text right), but s11=sin40 < s10=cos40
    # (image wrong). Example 2: both captions at 45 -> every comparison ties -> all wrong.
    images = {RED: _unit2(0), GREEN: _unit2(90), BLUE: _unit2(0), GRAY: _unit2(90), YELLOW: _unit2(0),
              (0, 200, 200): _unit2(90)}
    texts = {"c00": _unit2(0), "c01": _unit2(90), "c10": _unit2(10), "c11": _unit2(40), "c20": _unit2(45),
             "c21": _unit2(45)}
    return folder, StubModel(images, texts)


@pytest.mark.parametrize("sub", ["", "data"])
def test_winoground_text_image_group(tmp_path, sub):
    folder, model = _winoground(tmp_path, sub)
    assert comp.find("winoground", tmp_path) == str(folder)
    out = comp.evaluate("winoground", folder, model, progress=False)
    assert out == pytest.approx({"text_score": 2 / 3, "image_score": 1 / 3, "group_score": 1 / 3, "n": 3})


def test_winoground_scores_against_loop_reference():
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=(500, 2, 2)), 1)  # rounding makes ties common
    text = image = group = 0
    for m in s:
        t = m[0, 0] > m[1, 0] and m[1, 1] > m[0, 1]
        i = m[0, 0] > m[0, 1] and m[1, 1] > m[1, 0]
        text, image, group = text + t, image + i, group + (t and i)
    out = comp.winoground_scores(s)
    assert out["text_score"] == pytest.approx(text / 500)
    assert out["image_score"] == pytest.approx(image / 500)
    assert out["group_score"] == pytest.approx(group / 500)


# -- errors ----------------------------------------------------------------------------------------

def test_missing_image_and_bad_json_are_clear(tmp_path):
    folder, model = _winoground(tmp_path)
    (folder / "images" / "ex_1_img_0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"winoground: 1 image file\(s\) missing, e.g. .*ex_1_img_0.png"):
        comp.evaluate("winoground", folder, model, progress=False)
    (folder / "examples.jsonl").write_text('{"id": 0}\n')
    with pytest.raises(ValueError, match=r"examples.jsonl:1: needs keys"):
        comp.evaluate("winoground", folder, model, progress=False)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        comp.evaluate("winoground", tmp_path / "absent", model)
    with pytest.raises(ValueError, match="batch_size"):
        comp.evaluate("winoground", folder, model, batch_size=0)


# -- a real model ----------------------------------------------------------------------------------

def test_real_model_matches_direct_similarities(tmp_path, merges):
    """A tiny random contrastive_jax Model (PIL lists through its own preprocessing): the Winoground
    scores equal the ones computed from ``Model.similarity`` on the images opened directly."""
    from tests.interop.test_api_inputs import tiny_clip

    model = tiny_clip(merges)
    folder, _ = _winoground(tmp_path)
    # Photos-like content instead of flat colours, so that embeddings differ.
    rng = np.random.default_rng(0)
    for p in sorted((folder / "images").glob("*.png")):
        Image.fromarray(rng.integers(0, 256, (20 + rng.integers(0, 20), 24, 3), dtype=np.uint8)).save(p)
    lines = [json.loads(x) for x in (folder / "examples.jsonl").read_text().splitlines()]
    sims = np.stack([model.similarity([Image.open(folder / "images" / f"{e[k]}.png") for k in ("image_0", "image_1")],
                                      [e["caption_0"], e["caption_1"]]) for e in lines])  # [n, image, caption]
    want = comp.winoground_scores(sims.transpose(0, 2, 1))
    got = comp.evaluate("winoground", folder, model, batch_size=4, progress=True)
    assert got == pytest.approx(want, abs=1e-9)
