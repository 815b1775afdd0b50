"""Two-tower (CLIP/SigLIP) model: image tower + text tower, linear heads, learnable scale/bias.

Param tree (top level)::

    image/       the image tower (e.g. VisionTransformer)
    text/        the text tower (e.g. TextTransformer)
    image_proj/  kernel [image_width, embed_dim]  ('embed', 'joint'), no bias
    text_proj/   kernel [text_width, embed_dim]   ('embed', 'joint'), no bias
    log_scale    []  float32, init scale_init
    bias         []  float32, init bias_init
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import DenseGeneral, Dtype, l2_normalize


class TwoTower(nn.Module):
    """CLIP-style two-tower model.

    Attributes:
      image: image tower module, ``[B, H, W, 3] -> [B, image_width]``.
      text: text tower module, ``[B, L] int32 -> [B, text_width]``.
      embed_dim: shared embedding dimension ``D``.
      scale_init: initial ``log_scale`` (CLIP: log(1/0.07); SigLIP: log(10)).
      bias_init: initial ``bias`` (CLIP: 0, unused by its loss; SigLIP: -10).
      max_scale: the output scale is ``exp(min(log_scale, log(max_scale)))``.
      dtype: compute dtype of the heads (the towers carry their own).
    """

    image: nn.Module
    text: nn.Module
    embed_dim: int
    scale_init: float = math.log(1 / 0.07)
    bias_init: float = 0.0
    max_scale: float = 100.0
    dtype: Dtype = jnp.float32

    def setup(self):
        self.image_proj = DenseGeneral((self.embed_dim,), ("embed", "joint"), None, dtype=self.dtype)
        self.text_proj = DenseGeneral((self.embed_dim,), ("embed", "joint"), None, dtype=self.dtype)
        self.log_scale = self.param(
            "log_scale", nn.with_logical_partitioning(nn.initializers.constant(self.scale_init), ()),
            (), jnp.float32,
        )
        self.logit_bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.constant(self.bias_init), ()),
            (), jnp.float32,
        )

    def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """images ``[B, H, W, 3]`` float32 -> ``[B, D]`` float32, unit L2 norm."""
        return l2_normalize(self.image_proj(self.image(images, train=train)))

    def encode_text(self, texts: jax.Array, *, train: bool = False) -> jax.Array:
        """texts ``[B, L]`` int32 (0 = pad, last non-pad = EOS) -> ``[B, D]`` float32, unit norm."""
        return l2_normalize(self.text_proj(self.text(texts, train=train)))

    def scale_and_bias(self) -> tuple[jax.Array, jax.Array]:
        """Returns ``(scale, bias)``, scalars float32; scale clamped at ``max_scale``.

        The clamp is on log_scale, so its gradient is zero above the cap (as CLIP's in-place clamp
        stops the parameter from growing).
        """
        scale = jnp.exp(jnp.minimum(self.log_scale, math.log(self.max_scale)))
        return scale, self.logit_bias

    def __call__(self, images: jax.Array, texts: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """Returns ``dict(image=[B, D] f32, text=[B, D] f32, scale=[] f32, bias=[] f32)``."""
        scale, bias = self.scale_and_bias()
        return dict(
            image=self.encode_image(images, train=train),
            text=self.encode_text(texts, train=train),
            scale=scale,
            bias=bias,
        )


def logical_param_axes(model: nn.Module, *sample_inputs: Any, method: str | Callable | None = None) -> Any:
    """Logical axis names of every parameter, without allocating any.

    Args:
      model: e.g. ``build(config.model)``.
      sample_inputs: arrays or ``jax.ShapeDtypeStruct`` of the call's inputs, e.g.
        ``(images [B, H, W, 3] float32, texts [B, L] int32)``.
      method: optional method to init through (e.g. ``'encode_image'``).

    Returns:
      The ``params`` tree with a ``jax.sharding.PartitionSpec`` of logical names per leaf (e.g.
      ``PartitionSpec('embed', 'mlp')``); map them to mesh axes with
      ``nn.logical_to_mesh_axes`` / ``nn.logical_to_mesh_sharding`` and a rules table.
    """
    kwargs = {} if method is None else {"method": method}
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *sample_inputs, **kwargs))
    return nn.get_partition_spec(abstract["params"])
