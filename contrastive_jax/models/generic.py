"""Encoders for other modalities: 1-D signals and feature vectors.

- :class:`SignalTransformer` — a 1-D signal ``[B, T, C]`` (audio frames, sensor channels, a
  time series; ``[B, T]`` is taken as one channel) is cut into non-overlapping patches of
  ``patch_size`` steps, each flattened patch is mapped linearly to ``width`` (a ViT patch stem in
  1-D), a learned position embedding is added and a pre-norm transformer encodes the tokens,
  pooled by ``gap``, ``cls`` or ``map``.
- :class:`MlpEncoder` — a feature vector ``[B, F]`` (tabular data, precomputed features):
  a linear stem to ``width`` then ``depth`` pre-norm residual MLP blocks and a final LayerNorm.
  ``depth=0`` is a linear stem + LayerNorm.

Both return ``[B, width]`` in ``dtype`` and are the encoders ``signal`` and ``mlp`` of the
N-tower model (``models.ENCODERS``, see :mod:`contrastive_jax.models.build`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import DenseGeneral, Dtype, Encoder, LayerNorm, MAPHead, MlpBlock, constrain

POOL_TYPES = ("gap", "cls", "map")


class SignalTransformer(nn.Module):
    """1-D patch stem + transformer. x ``[B, T, C]`` or ``[B, T]`` float -> ``[B, width]``.

    Params: ``patch_embed/{kernel [patch_size * C, W], bias [W]}``, ``pos_embedding [T / patch_size
    (+1 for cls), W]`` (fixed by the length seen at init), ``cls [W]``, ``encoder/...``, ``map/...``.

    Attributes (the fields of an N-tower entry with ``encoder='signal'``; defaults of the
    required ones in ``models/config.py``):
      patch_size: time steps per patch (``T`` must be a multiple of it).
      width: token width ``W``, the output feature size. depth: number of encoder blocks.
      num_heads: attention heads. mlp_dim: hidden width of each block's MLP.
      pool: ``'gap'`` | ``'cls'`` | ``'map'``. act / remat / scan: as the ViT's.
      dtype: compute dtype (params stay float32).
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "gap"
    act: str = "gelu"
    remat: str = "none"
    scan: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        if self.pool not in POOL_TYPES:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOL_TYPES}")
        if x.ndim == 2:
            x = x[:, :, None]
        if x.ndim != 3:
            raise ValueError(f"SignalTransformer expects [B, T, C] or [B, T], got shape {x.shape}")
        b, t, c = x.shape
        if t % self.patch_size:
            raise ValueError(f"signal length {t} is not divisible by patch_size {self.patch_size}")
        x = x.astype(self.dtype).reshape(b, t // self.patch_size, self.patch_size * c)
        x = DenseGeneral((self.width,), ("channels", "embed"), ("embed",), dtype=self.dtype, name="patch_embed")(x)
        n = x.shape[1]
        use_cls = self.pool == "cls"
        pos = self.param(
            "pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (n + use_cls, self.width), jnp.float32,
        ).astype(self.dtype)
        if use_cls:
            cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                             (self.width,), jnp.float32).astype(self.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
        x = constrain(x + pos[None], ("batch", "act_length", "act_embed"))
        x = Encoder(self.depth, self.num_heads, self.mlp_dim, act=self.act, remat=self.remat, scan=self.scan,
                    dtype=self.dtype, name="encoder")(x)
        if use_cls:
            return x[:, 0]
        if self.pool == "map":
            return MAPHead(self.num_heads, self.mlp_dim, self.act, dtype=self.dtype, name="map")(x)
        return jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype)


class MlpEncoder(nn.Module):
    """Feature vectors ``[B, F]`` float -> ``[B, width]``: linear stem, ``depth`` residual
    ``x + MLP(LN(x))`` blocks, final LayerNorm.

    Params: ``stem/{kernel [F, W], bias}``, ``block_{i}/{norm, mlp/fc1, mlp/fc2}``, ``norm``.

    Attributes (the fields of an N-tower entry with ``encoder='mlp'``):
      width: ``W``, the output feature size. depth: residual blocks (0: stem + LayerNorm).
      mlp_dim: hidden width of each block (0: ``4 * width``). act: the blocks' activation.
      dtype: compute dtype (params stay float32).
    """

    width: int
    depth: int = 2
    mlp_dim: int = 0  # 0: 4 * width
    act: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        if x.ndim != 2:
            raise ValueError(f"MlpEncoder expects feature vectors [B, F], got shape {x.shape}")
        x = DenseGeneral((self.width,), ("channels", "embed"), ("embed",), dtype=self.dtype, name="stem")(x)
        for i in range(self.depth):
            h = LayerNorm(dtype=self.dtype, name=f"block_{i}_norm")(x)
            x = x + MlpBlock(self.mlp_dim or 4 * self.width, self.act, dtype=self.dtype, name=f"block_{i}_mlp")(h)
        return LayerNorm(dtype=self.dtype, name="norm")(x)
