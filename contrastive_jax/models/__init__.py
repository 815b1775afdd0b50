"""Flax (linen) models: ViT / ResNet image towers, transformer text tower, generic encoders for
1-D signals and feature vectors, the two-tower CLIP/SigLIP model, the N-tower model, the
multi-view (SimCLR / SLIP / SwAV) models, teacher-student distillation, and CoCa (a text decoder on
the image tokens) with greedy / beam-search decoding.

Typical use::

    model = models.build(config.model)                 # model.modalities == ('image', 'text')
    inputs = models.sample_inputs(config.model, config.data)   # ShapeDtypeStructs, batch 1
    variables = model.init(rng, images, texts)         # params boxed with logical axis names
    params = nn.meta.unbox(variables['params'])         # plain arrays work the same
    out = model.apply({'params': params}, images, texts)  # image/text [B, D], scale, bias
    img = model.apply({'params': params}, 'image', images, method='encode')

Every built-in model kind is in :data:`MODELS` from the start (nothing registers at import).
New model kinds: :func:`register_model`; new towers / N-tower encoders:
:func:`register_image_tower`, :func:`register_text_tower`, :func:`register_encoder`; config
groups of Flax modules: :class:`ModuleSchema` / :func:`build_module`. Parameter counts and
FLOPs: :mod:`contrastive_jax.models.inspect`.
"""
from contrastive_jax.models.build import (
    DTYPES,
    ENCODERS,
    IMAGE_TOWERS,
    MODELS,
    TEXT_TOWERS,
    ModelKind,
    build,
    build_image_tower,
    build_text_tower,
    encoder_defaults,
    register_encoder,
    register_image_tower,
    register_model,
    register_text_tower,
    sample_inputs,
)
from contrastive_jax.models.coca import CoCa
from contrastive_jax.models.decoder import DecoderBlock, TextDecoder
from contrastive_jax.models.decoding import Decoded, beam_search, generate, greedy_decode
from contrastive_jax.models.distill import Distill
from contrastive_jax.models.generic import MlpEncoder, SignalTransformer
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
from contrastive_jax.models.multiview import MultiView
from contrastive_jax.models.resnet import ResNet
from contrastive_jax.models.schema import ModuleSchema, build_module
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.towers import MlpHead, NTower, TwoTower, logical_param_axes, make_head
from contrastive_jax.models.vit import VisionTransformer, vit_variant

__all__ = [
    "CoCa", "DecoderBlock", "TextDecoder", "Decoded", "beam_search", "generate", "greedy_decode",
    "ACTIVATIONS", "DTYPES", "DenseGeneral", "Distill", "ENCODERS", "Encoder", "EncoderBlock", "IMAGE_TOWERS",
    "LayerNorm", "MAPHead", "MODELS", "MlpBlock", "MlpEncoder", "MlpHead", "ModelKind", "ModuleSchema",
    "MultiHeadAttention", "MultiView", "NTower", "ResNet", "SignalTransformer", "TEXT_TOWERS", "TextTransformer",
    "TwoTower", "VisionTransformer", "build", "build_image_tower", "build_module", "build_text_tower",
    "encoder_defaults", "l2_normalize", "logical_param_axes", "make_head", "register_encoder",
    "register_image_tower", "register_model", "register_text_tower", "sample_inputs", "vit_variant",
]
