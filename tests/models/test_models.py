"""Tests for contrastive_jax.models: shapes, normalization, scale/bias, pooling, axes, sharding."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax import models
from contrastive_jax.train.config import default_config

IMAGE_SIZE = 8
TEXT_LEN = 6
EXTRA_PAD = 3  # models are initialized with TEXT_LEN + EXTRA_PAD so shorter inputs are accepted
VOCAB = 20
BATCH = 8


def tiny_model_config(**overrides):
    """A small but complete config.model (every tower feature on, sizes cut down for CPU)."""
    cfg = default_config().model
    cfg.embed_dim = 16
    cfg.image.patch_size = 4
    cfg.image.width = 32
    cfg.image.depth = 2
    cfg.image.num_heads = 2
    cfg.image.mlp_dim = 64
    cfg.text.vocab_size = VOCAB
    cfg.text.width = 24
    cfg.text.depth = 2
    cfg.text.num_heads = 3
    cfg.text.mlp_dim = 48
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def sample_inputs(seed=0, batch=BATCH, length=TEXT_LEN):
    """images [B, 8, 8, 3] float32; texts [B, L] int32 with 1..L real tokens then pads (0)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    lengths = rng.integers(1, length + 1, size=batch)
    texts = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int32)
    texts[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return images, texts


def pad_texts(texts, extra):
    return np.concatenate([texts, np.zeros((texts.shape[0], extra), np.int32)], axis=1)


def init_variables(model, seed=0):
    """Boxed variables; texts are padded at init so the context length is TEXT_LEN + EXTRA_PAD."""
    images, texts = sample_inputs()
    return jax.jit(model.init)(jax.random.key(seed), images, pad_texts(texts, EXTRA_PAD))


# Compiling a model's init is the slowest step on CPU (seconds), so each distinct param tree is
# initialized once per module (the default model); variants that differ only in computation
# (causal, dtype) reuse its params.
@pytest.fixture(scope="module")
def fp32_variables():
    return init_variables(models.build(tiny_model_config()))


@pytest.fixture(scope="module")
def fp32(fp32_variables):
    return models.build(tiny_model_config()), nn.meta.unbox(fp32_variables["params"])


@pytest.fixture(scope="module")
def apply_fn():
    # One jitted apply shared by all tests; the (hashable) model is static, so each model variant
    # compiles once per input shape.
    return jax.jit(lambda model, params, *args, **kw: model.apply({"params": params}, *args, **kw),
                   static_argnums=0, static_argnames=("method", "capture_intermediates"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_outputs_shapes_dtypes_and_unit_norm(fp32, apply_fn, dtype):
    ref_model, params = fp32
    model = models.build(tiny_model_config(dtype=dtype))
    images, texts = sample_inputs()
    out = apply_fn(model, params, images, texts)
    assert set(out) == {"image", "text", "scale", "bias"}
    for key in ("image", "text"):
        assert out[key].shape == (BATCH, 16) and out[key].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out[key]), axis=-1), 1.0, atol=1e-5)
    assert out["scale"].shape == () and out["bias"].shape == ()
    # Params are float32 whatever the compute dtype (same params serve both models here).
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    if dtype == "bfloat16":
        # Same weights, lower precision: must be the same function up to bf16 rounding, and
        # must actually differ (else compute did not happen in bf16).
        ref = apply_fn(ref_model, params, images, texts)
        for key in ("image", "text"):
            diff = np.abs(np.asarray(out[key]) - np.asarray(ref[key])).max()
            assert 0 < diff < 0.05, (key, diff)


def test_encode_methods_match_call(fp32, apply_fn):
    model, params = fp32
    images, texts = sample_inputs(seed=1)
    out = apply_fn(model, params, images, texts)
    img = apply_fn(model, params, images, method=models.TwoTower.encode_image)
    txt = apply_fn(model, params, texts, method="encode_text")
    np.testing.assert_allclose(img, out["image"], atol=1e-6)
    np.testing.assert_allclose(txt, out["text"], atol=1e-6)
    # Different inputs give different embeddings (guards against a constant output).
    assert np.abs(np.asarray(img[0]) - np.asarray(img[1])).max() > 1e-3


def test_siglip_scale_bias_init():
    model = models.build(tiny_model_config(scale_init=math.log(10.0), bias_init=-10.0))
    # Initializing through scale_and_bias creates only the two scalars (cheap to compile).
    variables = model.init(jax.random.key(0), method="scale_and_bias")
    params = nn.meta.unbox(variables["params"])
    assert set(params) == {"log_scale", "bias"}
    assert float(params["log_scale"]) == pytest.approx(math.log(10.0))
    scale, bias = model.apply(variables, method="scale_and_bias")
    assert float(scale) == pytest.approx(10.0, rel=1e-6)
    assert float(bias) == pytest.approx(-10.0)


def test_scale_clamped_at_max_scale(fp32, apply_fn):
    model, params = fp32
    images, texts = sample_inputs()
    below = dict(params, log_scale=jnp.asarray(math.log(50.0), jnp.float32))
    assert float(apply_fn(model, below, images, texts)["scale"]) == pytest.approx(50.0, rel=1e-5)
    above = dict(params, log_scale=jnp.asarray(10.0, jnp.float32))  # exp(10) ~ 22026 > 100
    assert float(apply_fn(model, above, images, texts)["scale"]) == pytest.approx(100.0, rel=1e-5)


def test_default_clip_scale(fp32, apply_fn):
    model, params = fp32
    out = apply_fn(model, params, *sample_inputs())
    assert float(out["scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    assert float(out["bias"]) == 0.0


def encode_text_with_hidden(apply_fn, model, params, texts):
    """Returns (embeddings [B, D], text encoder output [B, L, W]) from one call."""
    emb, state = apply_fn(model, params, texts, method="encode_text", capture_intermediates=True)
    return np.asarray(emb), np.asarray(state["intermediates"]["text"]["encoder"]["__call__"][0])


@pytest.mark.parametrize("causal", [True, False])
def test_text_pooling_ignores_padding(fp32, apply_fn, causal):
    model = models.build(tiny_model_config(**{"text.causal": causal}))
    params = fp32[1]
    _, texts = sample_inputs(seed=2)
    emb, hidden = encode_text_with_hidden(apply_fn, model, params, texts)
    emb_padded = apply_fn(model, params, pad_texts(texts, EXTRA_PAD), method="encode_text")
    np.testing.assert_allclose(emb, emb_padded, atol=1e-6)
    # Pooling is at the EOS token: recompute the embedding from the encoder output.
    eos = (texts != 0).sum(1) - 1
    proj = hidden[np.arange(len(texts)), eos] @ np.asarray(params["text_proj"]["kernel"])
    ref = proj / np.linalg.norm(proj, axis=-1, keepdims=True)
    np.testing.assert_allclose(emb, ref, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_eos_state_ignores_later_tokens(fp32, apply_fn, causal):
    """EOS hidden state must not depend on tokens after it iff attention is causal."""
    model = models.build(tiny_model_config(**{"text.causal": causal}))
    _, texts = sample_inputs(seed=2)  # same shape as above: reuses the compiled function
    texts[0] = [5, 6, 7, 2, 0, 0]
    texts[1] = [5, 6, 7, 2, 9, 11]  # same prefix, extra (non-pad) tokens after position 3
    _, hidden = encode_text_with_hidden(apply_fn, model, fp32[1], texts)
    diff = np.abs(hidden[0, 3] - hidden[1, 3]).max()
    if causal:
        assert diff < 1e-6
    else:
        assert diff > 1e-4  # bidirectional attention sees the later tokens


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_image_pooling(fp32, apply_fn, pool):
    model = models.build(tiny_model_config(**{"image.pool": pool}))
    images, _ = sample_inputs(seed=3)
    params = fp32[1]
    if pool == "cls":
        # The 'cls' tree is the default tree plus image/cls [W]; add a random one instead of
        # compiling a second init (slow on CPU), after checking that this is the tree init makes.
        params = dict(params, image=dict(params["image"], cls=jnp.asarray(
            np.random.default_rng(0).normal(size=(32,)), jnp.float32)))
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, method="encode_image"), images)
    assert ("cls" in abstract["params"]["image"]) == (pool == "cls")
    assert jax.tree.structure(nn.meta.unbox(abstract["params"]["image"])) == jax.tree.structure(params["image"])
    emb, state = apply_fn(model, params, images, method="encode_image", capture_intermediates=True)
    hidden = np.asarray(state["intermediates"]["image"]["encoder"]["__call__"][0])  # [B, T, W]
    num_patches = (IMAGE_SIZE // 4) ** 2
    assert hidden.shape[1] == num_patches + (pool == "cls")
    pooled = hidden[:, 0] if pool == "cls" else hidden.mean(axis=1)
    proj = pooled @ np.asarray(params["image_proj"]["kernel"])
    np.testing.assert_allclose(emb, proj / np.linalg.norm(proj, axis=-1, keepdims=True), atol=1e-5)


def test_logical_axes_on_every_param():
    model = models.build(tiny_model_config(**{"image.pool": "cls"}))
    images, texts = sample_inputs()
    boxed = jax.eval_shape(model.init, jax.random.key(0), images, texts)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) > 20
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    assert set(boxed) == {"image", "text", "image_proj", "text_proj", "log_scale", "bias"}
    specs = models.logical_param_axes(model, images, texts)
    assert specs["text"]["token_embedding"] == P("vocab", "embed")
    assert specs["image_proj"]["kernel"] == P("embed", "joint")
    assert specs["image"]["encoder"]["block_0"]["attn"]["query"]["kernel"] == P("embed", "heads", "kv")
    assert specs["text"]["encoder"]["block_1"]["mlp"]["fc1"]["kernel"] == P("embed", "mlp")
    assert specs["log_scale"] == P()


def test_boxed_and_unboxed_params_agree(fp32, fp32_variables, apply_fn):
    model, params = fp32
    images, texts = sample_inputs()
    a = jax.jit(model.apply)(fp32_variables, images, texts)  # boxed LogicallyPartitioned leaves
    b = apply_fn(model, params, images, texts)
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
    np.testing.assert_allclose(a["text"], b["text"], atol=1e-6)


def test_sharded_forward_matches_single_device(fp32):
    model, params = fp32
    images, texts = sample_inputs(seed=4, batch=16)
    single = jax.jit(model.apply)({"params": params}, images, texts)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    sharded_params = jax.device_put(params, replicated)
    images_s = jax.device_put(images, batch_sharding)
    texts_s = jax.device_put(texts, batch_sharding)
    assert len(images_s.sharding.device_set) == 8
    out = jax.jit(
        model.apply,
        in_shardings=(replicated, batch_sharding, batch_sharding),
        out_shardings=dict(image=batch_sharding, text=batch_sharding, scale=replicated, bias=replicated),
    )({"params": sharded_params}, images_s, texts_s)
    for key in ("image", "text", "scale", "bias"):
        np.testing.assert_allclose(np.asarray(out[key]), np.asarray(single[key]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"image.name": "swin"}, r"model.image.name 'swin'.*known: resnet, vit"),
        ({"name": "clip"}, r"model.name 'clip'.*known: distill, multiview, n_tower, slip, two_tower"),
        ({"image.name": "vit_b16"}, r"model.image.name 'vit_b16'"),  # no substring dispatch
        ({"text.name": "gpt"}, r"model.text.name 'gpt'.*known: transformer"),
        ({"dtype": "float16"}, r"model.dtype 'float16'"),
        ({"text.vocab_size": -1}, r"vocab_size"),
    ],
)
def test_build_errors_clearly(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        models.build(tiny_model_config(**overrides))


def test_text_longer_than_context_is_rejected(fp32):
    model, params = fp32
    texts = np.ones((2, TEXT_LEN + EXTRA_PAD + 1), np.int32)
    with pytest.raises(ValueError, match="context length"):
        model.apply({"params": params}, texts, method="encode_text")


def test_sincos_posemb_formula_and_no_param():
    from contrastive_jax.models.vit import sincos_2d_posemb

    pe = np.asarray(sincos_2d_posemb(3, 4, 8))
    assert pe.shape == (12, 8)
    # Hand formula: omega = 1 / 10000 ** (k / (D/4 - 1)), k = 0..D/4-1; row-major (y, x) grid.
    omega = 1.0 / 10000.0 ** (np.arange(2) / 1.0)
    for idx, (y, x) in enumerate((y, x) for y in range(3) for x in range(4)):
        want = np.concatenate([np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)])
        np.testing.assert_allclose(pe[idx], want, atol=1e-6)
    assert len({tuple(np.round(r, 5)) for r in pe}) == 12  # every position distinguishable


@pytest.mark.parametrize("stem, posemb", [("conv", "learn"), ("conv", "sincos2d"), ("patch", "sincos2d")])
def test_vit_stem_and_posemb_options(stem, posemb):
    from contrastive_jax.models.vit import VisionTransformer

    vit = VisionTransformer(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, stem=stem, posemb=posemb)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = vit.init(jax.random.key(1), images)
    params = variables["params"]
    assert ("pos_embedding" in params) == (posemb == "learn")
    assert any(k.startswith("stem_") for k in params) == (stem == "conv")
    if stem == "conv":
        assert sorted(k for k in params if k.startswith("stem_")) == ["stem_0", "stem_1", "stem_2"]  # log2(8)
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
    out = vit.apply(variables, images)
    assert out.shape == (2, 32) and np.all(np.isfinite(np.asarray(out)))
    # The position embedding makes the tower position-aware: a shifted image gives other features.
    shifted = jnp.roll(images, 8, axis=2)
    assert not np.allclose(np.asarray(vit.apply(variables, shifted)), np.asarray(out), atol=1e-4)
