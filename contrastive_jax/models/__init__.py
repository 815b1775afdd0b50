"""Flax (linen) models: ViT image tower, transformer text tower, two-tower CLIP/SigLIP model.

Typical use::

    model = models.build(config.model)
    variables = model.init(rng, images, texts)         # params boxed with logical axis names
    params = nn.meta.unbox(variables['params'])         # plain arrays work the same
    out = model.apply({'params': params}, images, texts)  # image/text [B, D], scale, bias
    img = model.apply({'params': params}, images, method='encode_image')
"""
from contrastive_jax.models.build import (
    DTYPES,
    IMAGE_TOWERS,
    TEXT_TOWERS,
    build,
    register_image_tower,
    register_text_tower,
)
from contrastive_jax.models.layers import (
    DenseGeneral,
    Encoder,
    EncoderBlock,
    LayerNorm,
    MlpBlock,
    MultiHeadAttention,
    l2_normalize,
)
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.towers import TwoTower, logical_param_axes
from contrastive_jax.models.vit import VisionTransformer

__all__ = [
    "DTYPES",
    "DenseGeneral",
    "Encoder",
    "EncoderBlock",
    "IMAGE_TOWERS",
    "LayerNorm",
    "MlpBlock",
    "MultiHeadAttention",
    "TEXT_TOWERS",
    "TextTransformer",
    "TwoTower",
    "VisionTransformer",
    "build",
    "l2_normalize",
    "logical_param_axes",
    "register_image_tower",
    "register_text_tower",
]
