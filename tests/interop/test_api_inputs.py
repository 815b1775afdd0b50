"""The notebook API validates its inputs (issue 17, item 7) and keeps sigmoid semantics (issue 16, item 4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from contrastive_jax import models
from contrastive_jax.api import Model
from contrastive_jax.interop.clip import clip_tokenizer, run_config
from contrastive_jax.train.config import default_config, merge
from tests.interop.test_interop import VOCAB, merges  # noqa: F401  (merges: the fixture of its merges file)


@pytest.fixture(scope="module")
def model(merges):
    return tiny_clip(merges)


def tiny_clip(merges) -> Model:
    """A tiny random CLIP (16 px images, 1 block per tower) with a CLIP BPE tokenizer."""
    common = dict(act="quick_gelu", norm_eps=1e-5)
    arch = dict(
        embed_dim=16, image_size=16, logit_bias=False,
        image=dict(name="vit", patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, pool="cls", cls_posemb=True,
                   norm_pre=True, patch_bias=False, posemb="learn", stem="patch", **common),
        text=dict(name="transformer", vocab_size=VOCAB, context_length=8, width=32, depth=1, num_heads=2,
                  mlp_dim=64, causal=True, pool="eos", eos_id=VOCAB - 1, **common))
    config = merge(default_config(), run_config(arch), source="test")
    module = models.build(config.model)
    params = nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 8), jnp.int32))["params"])
    return Model(config, module, params, clip_tokenizer(merges, VOCAB, 8))


def test_one_string_where_a_list_is_expected_is_an_error(model):
    with pytest.raises(TypeError, match=r"class_names must be a list of strings, got one string 'red'"):
        model.zero_shot_classifier("red")
    with pytest.raises(TypeError, match="texts must be a list of strings, got one string"):
        model.encode_texts("a dog")


def test_non_string_texts_are_named_by_index(model):
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str, got int"):
        model.encode_texts([1, 2])
    with pytest.raises(TypeError, match=r"class_names\[1\] must be a str, got NoneType"):
        model.zero_shot_classifier(["dog", None])


def test_float_images_outside_unit_range_need_value_range(model):
    u8 = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    f255 = u8.astype(np.float32)
    with pytest.raises(ValueError, match=r"value_range=\(0, 255\)"):
        model.encode_images(f255)
    with pytest.raises(ValueError, match="outside"):
        model.encode_images(list(f255))  # a list of arrays too
    want = model.encode_images(u8)
    np.testing.assert_allclose(model.encode_images(f255, value_range=(0, 255)), want, atol=1e-5)
    np.testing.assert_allclose(model.encode_images(f255 / 255.0), want, atol=1e-5)
    # Another size goes through resizing: the rescale happens once, not twice.
    big = np.repeat(np.repeat(f255, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(model.encode_images(big, value_range=(0, 255)),
                               model.encode_images(big.astype(np.uint8)), atol=1e-5)


def test_grayscale_images_are_expanded_to_three_channels(model):
    gray = np.random.default_rng(1).integers(0, 256, (2, 16, 16), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    want = model.encode_images(rgb)
    np.testing.assert_allclose(model.encode_images(gray), want, atol=1e-6)            # [N, H, W]
    np.testing.assert_allclose(model.encode_images(gray[0]), want[:1], atol=1e-6)     # [H, W]
    np.testing.assert_allclose(model.encode_images(gray[..., None]), want, atol=1e-6)  # [N, H, W, 1]
    np.testing.assert_allclose(model.encode_images(list(gray)), want, atol=1e-6)      # list of [H, W]
    with pytest.raises(ValueError, match=r"1 or 3 channels.*\(2, 16, 16, 4\)"):
        model.encode_images(np.zeros((2, 16, 16, 4), np.uint8))


def test_zero_shot_activation_follows_the_training_loss(model):
    images = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    clf = model.zero_shot_classifier(["dog", "cat", "the"])
    assert clf.activation == "softmax" and "softmax" in repr(clf)
    np.testing.assert_allclose(clf(images).sum(1), 1.0, atol=1e-5)
    config = merge(model.config, {"loss": {"name": "sigmoid"}}, source="test")
    params = dict(model.params, bias=np.float32(-3.0))
    sig = Model(config, model.module, params, model.tokenizer)
    sclf = sig.zero_shot_classifier(["dog", "cat", "the"])
    assert sclf.activation == "sigmoid" and "sigmoid" in repr(sclf)
    logits = sig.logit_scale * sig.encode_images(images) @ sclf.class_embeddings.T - 3.0
    np.testing.assert_allclose(sclf(images), 1 / (1 + np.exp(-logits)), atol=1e-5)
