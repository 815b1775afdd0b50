"""Multi-crop views (SwAV, Caron et al. 2020) from the data pipeline: image_local_views next to the
global image_views -- shapes, dtypes, normalization, determinism per (seed, example, view), global
views unchanged by adding local ones, local crops differ from the global crops, config errors."""
import io

import numpy as np
import pytest
from PIL import Image

from contrastive_jax import data
from contrastive_jax.data import registry
from contrastive_jax.data.pipeline import ExampleProcessor
from data_test_helpers import user_config

SIZE, LOCAL = 24, 8


def _png(rng):
    # Smooth random image (a gradient plus noise), so crops of different areas differ clearly.
    yy, xx = np.mgrid[0:30, 0:40]
    img = np.stack([xx * 6, yy * 8, (xx + yy) * 3], -1) + rng.integers(0, 40, size=(30, 40, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _records(n):
    rng = np.random.default_rng(0)
    return [{"image": _png(rng), "caption": "a b", "key": f"r{i}"} for i in range(n)]


def _entry(records):
    return data.DatasetEntry(prepare=lambda c: {"train": records, "test": records[:4]},
                             vocabulary_texts=lambda c: ["a", "b"], key_field="key")


AUG = dict(crop="random_resized_crop", crop_scale=(0.3, 1.0), local_crop_scale=(0.05, 0.2), flip_prob=0.5)


def _cfg(tmp_path, **over):
    kw = dict(image_size=SIZE, num_views=2, local_views=3, local_view_size=LOCAL, augment=AUG)
    kw.update(over)
    return user_config(tmp_path, "_multicrop", **kw)


@pytest.fixture(autouse=True)
def multicrop_dataset():
    # Registered for every test: the processors' word tokenizer is built from its vocabulary.
    recs = _records(16)
    data.register_dataset("_multicrop", _entry(recs))
    yield recs
    registry._DATASETS.pop("_multicrop")


def _processor(cfg, recs):
    return ExampleProcessor(_entry(recs), data.build_tokenizer(cfg), cfg, train=True, seed=7)


def test_batch_has_normalized_local_views_of_the_local_size(tmp_path, multicrop_dataset):
    cfg = _cfg(tmp_path, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    tok = data.build_tokenizer(cfg)

    def first_batch():
        return next(data.make_train_iterator(cfg, tokenizer=tok, global_batch_size=8, process_index=0,
                                             process_count=1))

    b = first_batch()
    assert b["image_views"].shape == (8, 2, SIZE, SIZE, 3)
    assert b["image_local_views"].shape == (8, 3, LOCAL, LOCAL, 3)
    assert b["image_local_views"].dtype == np.float32
    # Normalized as (x / 255 - mean) / std from uint8 pixels: undoing it gives integers 0..255.
    pixels = (b["image_local_views"].astype(np.float64) * np.array(cfg.std) + np.array(cfg.mean)) * 255
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    # The same seed gives the same crops (the stream is deterministic).
    np.testing.assert_array_equal(first_batch()["image_local_views"], b["image_local_views"])


def test_processor_shapes_dtypes_and_determinism(tmp_path):
    recs = _records(4)
    cfg = _cfg(tmp_path)
    proc = _processor(cfg, recs)
    a, b = proc(recs[1], 5), _processor(cfg, recs)(recs[1], 5)
    assert a["image_local_views"].shape == (3, LOCAL, LOCAL, 3) and a["image_local_views"].dtype == np.uint8
    assert a["image_views"].shape == (2, SIZE, SIZE, 3)
    # Same (seed, example position, view): identical pixels; another position or seed: different.
    np.testing.assert_array_equal(a["image_local_views"], b["image_local_views"])
    assert not np.array_equal(a["image_local_views"], proc(recs[1], 6)["image_local_views"])
    other_seed = ExampleProcessor(_entry(recs), data.build_tokenizer(cfg), cfg, train=True, seed=8)
    assert not np.array_equal(a["image_local_views"], other_seed(recs[1], 5)["image_local_views"])
    # The local crops of one example differ from each other (own generator per view).
    lv = a["image_local_views"].astype(int)
    assert all(np.abs(lv[i] - lv[j]).mean() > 1 for i in range(3) for j in range(i))


def test_adding_local_views_leaves_the_global_views_unchanged(tmp_path):
    recs = _records(4)
    with_local = _processor(_cfg(tmp_path), recs)(recs[2], 3)
    without = _processor(_cfg(tmp_path, local_views=0), recs)(recs[2], 3)
    assert "image_local_views" not in without
    np.testing.assert_array_equal(with_local["image_views"], without["image_views"])
    np.testing.assert_array_equal(with_local["image"], without["image"])


def test_local_crops_are_small_area_crops_not_the_whole_image(tmp_path):
    recs = _records(2)
    img = Image.open(io.BytesIO(recs[0]["image"])).convert("RGB")
    whole = np.asarray(img.resize((LOCAL, LOCAL), Image.BILINEAR), np.float64)
    # Independent reference: with local_crop_scale (1, 1) and the image's own aspect (40 / 30) the
    # only crop of the whole area is the whole image, so a local crop is PIL's bilinear resize of
    # it (flip off, no other op in the recipe).
    full = dict(AUG, local_crop_scale=(1.0, 1.0), crop_ratio=(40 / 30, 40 / 30), flip_prob=0.0)
    got = _processor(_cfg(tmp_path, augment=full), recs)(recs[0], 0)["image_local_views"]
    for v in range(3):
        np.testing.assert_allclose(got[v].astype(np.float64), whole, atol=1.0)
    # The default small areas (5-20 % of the image) are not the whole image, nor a global crop.
    small = _processor(_cfg(tmp_path), recs)(recs[0], 0)
    for v in range(3):
        assert np.abs(small["image_local_views"][v].astype(np.float64) - whole).mean() > 5
        g = np.asarray(Image.fromarray(small["image_views"][0]).resize((LOCAL, LOCAL), Image.BILINEAR), np.float64)
        assert np.abs(small["image_local_views"][v].astype(np.float64) - g).mean() > 5


def test_evaluation_never_makes_local_views(tmp_path):
    recs = _records(2)
    cfg = _cfg(tmp_path)
    ev = ExampleProcessor(_entry(recs), data.build_tokenizer(cfg), cfg, train=False)(recs[0], 0)
    assert "image_local_views" not in ev and "image_views" not in ev


@pytest.mark.parametrize("over, match", [
    (dict(local_views=-1), r"config\.data\.local_views=-1 is invalid"),
    (dict(local_view_size=0), r"config\.data\.local_view_size=0 is invalid"),
    (dict(local_view_size=SIZE + 1), r"config\.data\.local_view_size=25 is invalid"),
    (dict(augment=dict(AUG, local_crop_scale=(0.5, 0.2))), r"config\.data\.augment\.local_crop_scale=\(0\.5, 0\.2\) "
                                                            r"is invalid"),
])
def test_config_errors_name_the_field(tmp_path, over, match):
    recs = _records(2)
    with pytest.raises(ValueError, match=match):
        _processor(_cfg(tmp_path, **over), recs)
