"""The evaluator list of config.eval: validation, results of a whole evaluation, identical
results on 1 and 8 devices with a ragged last batch, and the report's pictures."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import evaluate, models
from contrastive_jax.parallel.mesh import make_mesh
from contrastive_jax.train import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")

COLORS = ["red", "green", "blue"]
KINDS = ["circle", "square", "triangle", "star"]


class Tok:
    """Word ids (1-based), EOS = len(words) + 1, pad 0, fixed length 8."""

    words = COLORS + KINDS + ["a", "photo", "of", "the", "shape", "big", "small"]

    def __init__(self):
        self.ids = {w: i + 1 for i, w in enumerate(self.words)}

    def encode(self, texts):
        out = np.zeros((len(texts), 8), np.int32)
        for i, t in enumerate(texts):
            ids = [self.ids[w] for w in t.rstrip(".").split()][:7] + [len(self.words) + 1]
            out[i, : len(ids)] = ids
        return out


TOK = Tok()
INFO = {"class_names": {"color": COLORS, "kind": KINDS}, "templates": {"color": ["a {} shape"]},
        "prompts": {}, "label_keys": ("color", "kind")}


def synthetic_set(n, seed, image_size=32):
    rng = np.random.default_rng(seed)
    color, kind = rng.integers(0, 3, n), rng.integers(0, 4, n)
    images = rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32)
    big = rng.random(n) < 0.5
    captions = [f"a {'big' if b else 'small'} {COLORS[c]} {KINDS[k]}" for b, c, k in zip(big, color, kind)]
    return {"image": images, "text": TOK.encode(captions), "caption": captions, "color": color, "kind": kind,
            "big": big.astype(np.int32)}


def specs(*entries, **eval_fields):
    config = load_config(None)
    config.eval.update(eval_fields)
    config.eval.evaluators = list(entries)
    return evaluate.parse_evaluators(config.eval, config.data)


def test_parse_evaluators_defaults_and_errors():
    out = specs("zero_shot", dict(name="knn", k=5, every_steps=0), dict(name="retrieval", split="validation"))
    assert [s.name for s in out] == ["zero_shot", "knn", "retrieval"]
    assert out[1].options["k"] == 5 and out[1].every_steps == 0 and out[1].options["temperature"] == 0.07
    assert out[0].tag == "" and out[2].tag == "shapes:validation/"
    with pytest.raises(ValueError, match=r"evaluators\[1\].name='zeroshot'"):
        specs("retrieval", "zeroshot")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kk'\] in config.eval.evaluators\[0\]"):
        specs(dict(name="knn", kk=3))
    # The default list parses, and a command-line override of the list is validated too.
    config = load_config(None, ["eval.evaluators=['retrieval', {'name': 'knn', 'k': 3}]"])
    assert [s.name for s in evaluate.parse_evaluators(config.eval, config.data)] == ["retrieval", "knn"]
    assert len(evaluate.parse_evaluators(load_config(None).eval, load_config(None).data)) == 6


def one_hot_encoders(batch_size=None):
    """Images carry (color, kind, big) in pixel [0, 0, :3]; texts are one-hot of their words.
    With ``batch_size``, every call must get exactly that many rows (the last batch padded)."""

    def image(x):
        assert batch_size is None or x.shape[0] == batch_size
        c, k = x[:, 0, 0, 0].astype(int), x[:, 0, 0, 1].astype(int)
        return np.concatenate([np.eye(3)[c], np.eye(4)[k], 0.1 * x[:, 0, 0, 2:3]], 1).astype(np.float32)

    def text(t):
        assert batch_size is None or t.shape[0] == batch_size
        out = np.zeros((len(t), 8), np.float32)
        for j, w in enumerate(COLORS + KINDS):
            out[:, j] = np.any(t == TOK.ids[w], axis=1)
        out[:, 7] = 0.1 * np.any(t == TOK.ids["big"], axis=1)  # tells the two sizes' captions apart
        return out

    return image, text


def test_evaluation_with_perfect_encoders():
    data = synthetic_set(90, 0)
    train = synthetic_set(120, 1)
    for d in (data, train):
        d["image"][:, 0, 0, 0], d["image"][:, 0, 0, 1], d["image"][:, 0, 0, 2] = d["color"], d["kind"], d["big"]
    enc_i, enc_t = one_hot_encoders(batch_size=16)  # 90 and 120 rows: the last batches are padded
    ev = evaluate.Evaluation(
        specs("zero_shot", "retrieval", "diagnostics", dict(name="linear_probe", logistic_l2=(1e-3,)),
              dict(name="knn", k=3), dict(name="few_shot", shots=(1, 2), seeds=2)),
        encode_image=enc_i, encode_text=enc_t,
        load_arrays=lambda ds, split, n: train if split == "train" else data,
        dataset_info=lambda ds: INFO, tokenizer=TOK, batch_size=16, zero_shot_ks=(1, 2, 5), matryoshka_dims=(3,))
    out = ev()
    assert out["num_examples"] == 90
    assert all(isinstance(v, float) for v in out.values())
    assert out["zeroshot/color/top1"] == 1.0 and out["zeroshot/kind/top1"] == 1.0
    assert out["zeroshot/kind/top2"] == 1.0 and out["zeroshot/color/top2"] == 1.0
    assert "zeroshot/kind/top5" not in out and "zeroshot/color/top5" not in out  # only 4 kinds, 3 colours
    assert out["zeroshot/kind/mean_per_class_top1"] == 1.0
    for attr in ("color", "kind"):
        assert out[f"probe/{attr}/ridge/top1"] == 1.0 and out[f"probe/{attr}/logistic/top1"] == 1.0
        assert out[f"knn/{attr}/top1"] == 1.0 and out[f"fewshot/{attr}/2shot/top1"] > 0.8
    # At most 24 distinct captions; images with one caption have identical embeddings, so a text
    # query ties among them, but all of them are its positives (identical strings are one text).
    assert out["retrieval/text_to_image/R@1"] == 1.0 and out["retrieval/image_to_text/R@1"] == 1.0
    assert out["retrieval/text_to_image/R@5"] == 1.0
    assert out["retrieval/image_to_text/median_rank"] == 1.0
    # The first 3 dims hold the colour only: at that Matryoshka prefix colour stays perfect and
    # kind drops to (at most) chance-level ties.
    assert out["mrl3/zeroshot/color/top1"] == 1.0 and out["mrl3/zeroshot/kind/top1"] < 0.5
    assert out["diag/modality_gap"] >= 0 and 1 <= out["diag/image/rankme"] <= 8
    # Details for the report: per-class values and retrieval examples with their pictures.
    d = ev.details
    assert d["per_class"]["kind"]["values"] == [1.0] * 4
    assert set(d["retrieval"]["images"]) >= set(d["retrieval"]["image_queries"])
    assert np.asarray(d["heatmap"]["similarity"]).shape == (16, 16)
    # Evaluation knows no normalization: the pictures are the eval arrays' own images.
    for i, img in d["retrieval"]["images"].items():
        np.testing.assert_array_equal(img, data["image"][i])


def pixels(images, mean, std):
    """Reference de-normalization (float32 arithmetic, rounded, clipped to uint8)."""
    x = np.asarray(images, np.float32) * np.float32(std) + np.float32(mean)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def test_evaluation_deprecated_image_mean_std_still_give_uint8_pictures():
    data = synthetic_set(20, 4)
    enc_i, enc_t = one_hot_encoders()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    with pytest.warns(DeprecationWarning, match="image_mean"):
        ev = evaluate.Evaluation(specs("retrieval"), encode_image=enc_i, encode_text=enc_t,
                                 load_arrays=lambda ds, split, n: data, dataset_info=lambda ds: INFO, tokenizer=TOK,
                                 batch_size=8, image_mean=mean, image_std=std)
    ev()
    images = ev.details["retrieval"]["images"]
    assert images
    for i, img in images.items():
        assert img.dtype == np.uint8
        np.testing.assert_array_equal(img, pixels(data["image"][i], np.array(mean), np.array(std)))


def tiny_model_and_params():
    config = load_config(QUICKSTART + ":tiny")
    config.model.text.vocab_size = 20
    model = models.build(config.model)
    # Random parameters of the right shapes (no init compile: seconds on a busy 2-core machine).
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                            jnp.ones((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), abstract)
    return model, params


def test_sharded_evaluation_equals_single_device_unpadded():
    """Real model, N = 37: on the mesh the last global batch is ragged (padded, then dropped);
    the reference runs on one device with one unpadded batch of 37."""
    model, params = tiny_model_and_params()
    data, train = synthetic_set(37, 2), synthetic_set(50, 3)
    # (Probes fit on host features: identical features give identical fits, so the k-NN's
    # sharded neighbour search is the part worth comparing.)
    entries = ("zero_shot", "retrieval", "diagnostics", dict(name="knn", k=5))

    def run(n_dev, bs):
        mesh = make_mesh([("data", n_dev)], jax.devices()[:n_dev])
        sh = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params)
        enc_i, enc_t = evaluate.make_encoders(model, mesh, ("data",), sh)
        host = lambda f: (lambda x: np.asarray(f(params, x)))  # noqa: E731
        ev = evaluate.Evaluation(
            specs(*entries), encode_image=host(enc_i), encode_text=host(enc_t),
            load_arrays=lambda ds, split, n: train if split == "train" else data, dataset_info=lambda ds: INFO,
            tokenizer=TOK, batch_size=bs, mesh=mesh, batch_axes=("data",))
        return ev()

    ref = run(1, 50)  # one unpadded batch (the train set has 50 rows)
    got = run(8, 16)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    assert 0 < ref["retrieval/text_to_image/R@10"] < 1  # a random model: not a degenerate case


def test_eval_runner_pictures_use_config_data_normalization(monkeypatch):
    """EvalRunner reads config.data.mean/std (the eval arrays' normalization) to turn the report's
    pictures back into uint8 pixels; the eval sets come from the (patched) data package."""
    from contrastive_jax import data as data_lib

    model, params = tiny_model_and_params()
    data = synthetic_set(20, 5)
    monkeypatch.setattr(data_lib, "load_eval_arrays", lambda dc, split, tokenizer, max_examples: data)
    monkeypatch.setattr(data_lib, "dataset_info", lambda dc: INFO)
    config = load_config(QUICKSTART + ":tiny")
    config.data.mean, config.data.std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    config.eval.evaluators, config.eval.batch_size = ["retrieval"], 16
    mesh = make_mesh([("data", 8)], jax.devices()[:8])
    sh = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params)
    runner = evaluate.EvalRunner(config, model, mesh, ("data",), sh, TOK, default_every_steps=10)
    assert runner.due(20) and not runner.due(15)
    out = runner(params)
    assert out["num_examples"] == 20 and 0 <= out["retrieval/image_to_text/R@1"] <= 1
    images = runner.details["retrieval"]["images"]
    assert set(images) >= set(runner.details["retrieval"]["image_queries"])
    for i, img in images.items():
        assert img.dtype == np.uint8
        np.testing.assert_array_equal(img, pixels(data["image"][i], np.array(config.data.mean),
                                                  np.array(config.data.std)))


def test_encoders_return_the_embedding_before_normalization():
    """The runner's encoders give the pre-normalization embedding (for the norm statistics);
    normalized, it must equal the model's own encode_image / encode_text."""
    model, params = tiny_model_and_params()
    mesh = make_mesh([("data", 2)], jax.devices()[:2])
    sh = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params)
    enc_i, enc_t = evaluate.make_encoders(model, mesh, ("data",), sh)
    data = synthetic_set(4, 0)
    for enc, x, method in ((enc_i, data["image"], "encode_image"), (enc_t, data["text"], "encode_text")):
        raw = np.asarray(enc(params, x))
        own = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))(params, x))
        norms = np.linalg.norm(raw, axis=1)
        assert np.all(np.abs(norms - 1) > 1e-3)  # really not normalized
        np.testing.assert_allclose(raw / norms[:, None], own, rtol=1e-5, atol=1e-6)
