"""Published parameter counts of SigLIP B/16-224 and So400m/14-384 (and CLIP ViT-B/32): pinned,
checked against the ``transformers`` model built from the same config (meta device: no memory),
and against our model built from that config by :func:`contrastive_jax.interop.hf.hf_model_config`
(``jax.eval_shape``: no memory either) -- the architectures match tensor for tensor in count.
"""
import math

import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch", reason="the transformers comparisons need PyTorch (the [torch] extra)")
transformers = pytest.importorskip("transformers", reason="the transformers comparisons need the [hf] extra")

from contrastive_jax import models  # noqa: E402
from contrastive_jax.interop.hf import hf_model_config  # noqa: E402
from contrastive_jax.models.config import defaults as model_defaults  # noqa: E402


def _tower(width, layers, heads, mlp, **kw):
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp, **kw)


# name -> (config class, config kwargs, published count). The SigLIP shapes are those of
# google/siglip-base-patch16-224 and google/siglip-so400m-patch14-384 (vocabulary 32,000, 64
# text positions); CLIP's is openai/clip-vit-base-patch32 (transformers' CLIPConfig defaults).
SHAPES = {
    "siglip-base-patch16-224": ("SiglipConfig", dict(
        text_config=_tower(768, 12, 12, 3072, vocab_size=32000, max_position_embeddings=64),
        vision_config=_tower(768, 12, 12, 3072, image_size=224, patch_size=16)), 203_155_970),
    "siglip-so400m-patch14-384": ("SiglipConfig", dict(
        text_config=_tower(1152, 27, 16, 4304, vocab_size=32000, max_position_embeddings=64),
        vision_config=_tower(1152, 27, 16, 4304, image_size=384, patch_size=14)), 877_960_498),
    "clip-vit-base-patch32": ("CLIPConfig", dict(), 151_277_313),
}


def _hf_count(config) -> int:
    cls = transformers.SiglipModel if config.model_type == "siglip" else transformers.CLIPModel
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())


def _our_count(config) -> int:
    model_cfg, image_size, _ = hf_model_config(config.to_dict())
    cfg = model_defaults()
    for key, value in model_cfg.items():
        if isinstance(value, dict):
            for k, v in value.items():
                cfg[key][k] = v
        else:
            cfg[key] = value
    module = models.build(cfg)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    texts = jax.ShapeDtypeStruct((1, model_cfg["text"]["context_length"]), jnp.int32)
    shapes = jax.eval_shape(lambda i, t: module.init(jax.random.key(0), i, t), images, texts)["params"]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", list(SHAPES))
def test_published_parameter_count(name):
    cls_name, kwargs, published = SHAPES[name]
    config = getattr(transformers, cls_name)(**kwargs)
    assert _hf_count(config) == published
    # Our two-tower model always holds a logit bias scalar; CLIPModel has none (ours is 0 for CLIP,
    # which its softmax loss never reads), so a CLIP counts one more.
    assert _our_count(config) == published + (config.model_type == "clip")
