"""Flax (linen) models: ViT / ResNet image towers, transformer text tower, generic encoders for
1-D signals and feature vectors, the two-tower CLIP/SigLIP model and the N-tower model.

Typical use::

    model = models.build(config.model)                 # model.modalities == ('image', 'text')
    variables = model.init(rng, images, texts)         # params boxed with logical axis names
    params = nn.meta.unbox(variables['params'])         # plain arrays work the same
    out = model.apply({'params': params}, images, texts)  # image/text [B, D], scale, bias
    img = model.apply({'params': params}, 'image', images, method='encode')

New model kinds: :func:`register_model`; new N-tower encoders: :func:`register_encoder`.
Parameter counts and FLOPs: :mod:`contrastive_jax.models.inspect`.
"""
from contrastive_jax.models.build import (
    DTYPES,
    ENCODERS,
    IMAGE_TOWERS,
    MODELS,
    TEXT_TOWERS,
    build,
    encoder_defaults,
    register_encoder,
    register_image_tower,
    register_model,
    register_text_tower,
    sample_inputs,
)
from contrastive_jax.models.generic import MlpEncoder, SignalTransformer
from contrastive_jax.models.distill import Distill  # registers model.name 'distill'
from contrastive_jax.models.multiview import MultiView  # registers model.name 'multiview' and 'slip'
from contrastive_jax.models.layers import (
    ACTIVATIONS,
    DenseGeneral,
    Encoder,
    EncoderBlock,
    LayerNorm,
    MAPHead,
    MlpBlock,
    MultiHeadAttention,
    l2_normalize,
)
from contrastive_jax.models.resnet import ResNet
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.towers import MlpHead, NTower, TwoTower, logical_param_axes, make_head
from contrastive_jax.models.vit import VisionTransformer, vit_variant

__all__ = [
    "Distill",
    "ACTIVATIONS", "DTYPES", "DenseGeneral", "ENCODERS", "Encoder", "EncoderBlock", "IMAGE_TOWERS", "MultiView",
    "LayerNorm", "MAPHead", "MODELS", "MlpBlock", "MlpEncoder", "MlpHead", "MultiHeadAttention", "NTower",
    "ResNet", "SignalTransformer", "TEXT_TOWERS", "TextTransformer", "TwoTower", "VisionTransformer",
    "build", "encoder_defaults", "l2_normalize", "logical_param_axes", "make_head", "register_encoder",
    "register_image_tower", "register_model", "register_text_tower", "sample_inputs", "vit_variant",
]
