"""ResNet image tower (ResNet-18/34 basic blocks, ResNet-50/101/152 bottlenecks) for SimCLR-style
image-only training and as a CLIP image tower.

Reference: He et al. 2016, "Deep Residual Learning for Image Recognition", with the stride on the
3x3 convolution of the bottleneck ("ResNet v1.5", as torchvision). Normalization is GroupNorm
(Wu & He 2018; 32 groups) rather than BatchNorm: the model stays a pure function of its params
(no running statistics to thread through the train step), and batch statistics would otherwise
leak information between a contrastive batch's positives (the reason SimCLR needs synchronized
or shuffled BN). GroupNorm has the same parameters as BatchNorm (a scale and a bias per
channel), so parameter counts equal the published torchvision ones: ResNet-18 trunk 11,176,512,
ResNet-50 trunk 23,508,032 (the published 11.69M / 25.56M minus the 1000-class classifier).
The last norm of every residual branch starts at zero scale (Goyal et al. 2017) so each block
starts as the identity.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import Dtype

# depth -> (block kind, blocks per stage)
RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _conv(features, kernel, strides, name, dtype):
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding=[(kernel // 2, kernel // 2)] * 2,
        use_bias=False, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"), ("conv_h", "conv_w", "conv_in", "conv_out")
        ),
        name=name,
    )


class _GroupNorm(nn.Module):
    """GroupNorm with min(32, C) groups, statistics in float32; params ``scale``/``bias [C]``."""

    zero: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        groups = min(32, c)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.zeros if self.zero else nn.initializers.ones,
                                                  ("conv_out",)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (c,), jnp.float32)
        xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
        axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


class _Block(nn.Module):
    kind: str  # 'basic' | 'bottleneck'
    width: int
    strides: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        out_ch = self.width * (4 if self.kind == "bottleneck" else 1)
        if self.kind == "basic":
            y = nn.relu(_GroupNorm(dtype=self.dtype, name="norm1")(_conv(self.width, 3, self.strides, "conv1", self.dtype)(x)))
            y = _GroupNorm(zero=True, dtype=self.dtype, name="norm2")(_conv(self.width, 3, 1, "conv2", self.dtype)(y))
        else:
            y = nn.relu(_GroupNorm(dtype=self.dtype, name="norm1")(_conv(self.width, 1, 1, "conv1", self.dtype)(x)))
            y = nn.relu(_GroupNorm(dtype=self.dtype, name="norm2")(_conv(self.width, 3, self.strides, "conv2", self.dtype)(y)))
            y = _GroupNorm(zero=True, dtype=self.dtype, name="norm3")(_conv(out_ch, 1, 1, "conv3", self.dtype)(y))
        if self.strides != 1 or x.shape[-1] != out_ch:
            x = _GroupNorm(dtype=self.dtype, name="down_norm")(_conv(out_ch, 1, self.strides, "down_conv", self.dtype)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet trunk: images ``[B, H, W, C]`` float -> globally average-pooled ``[B, F]`` in
    ``dtype`` (F = 8·width for basic blocks, 32·width for bottlenecks; width=64 is the standard
    network: 512 / 2048 features).

    Params: ``stem_conv [7, 7, C, width]``, ``stem_norm``, ``stage{s}_block{b}/...``.

    Attributes (read from ``model.image`` with ``name='resnet'``, or an N-tower entry with
    ``encoder='resnet'``):
      depth: 18 | 34 | 50 | 101 | 152 (:data:`RESNET_DEPTHS`).
      width: channels of the first stage (64: the standard network; later stages double it).
      dtype: compute dtype (params stay float32).
    """

    depth: int = 50
    width: int = 64
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        if self.depth not in RESNET_DEPTHS:
            raise ValueError(f"unknown ResNet depth {self.depth}; known: {sorted(RESNET_DEPTHS)}")
        if images.ndim != 4:
            raise ValueError(f"ResNet expects images [B, H, W, C], got shape {images.shape}")
        kind, stages = RESNET_DEPTHS[self.depth]
        x = images.astype(self.dtype)
        x = nn.relu(_GroupNorm(dtype=self.dtype, name="stem_norm")(_conv(self.width, 7, 2, "stem_conv", self.dtype)(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, n_blocks in enumerate(stages):
            for b in range(n_blocks):
                strides = 2 if (s > 0 and b == 0) else 1
                x = _Block(kind, self.width * 2**s, strides, self.dtype, name=f"stage{s}_block{b}")(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
