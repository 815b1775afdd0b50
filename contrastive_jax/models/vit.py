"""Vision Transformer image tower: pre-norm encoder, 'gap' or 'cls' pooling, a linear patch
embedding or a convolutional stem, learned or fixed 2-D sin-cos position embeddings.

References: ViT (Dosovitskiy et al. 2021); convolutional stem: "Early Convolutions Help
Transformers See Better" (Xiao et al. 2021); 2-D sin-cos position embeddings as in MoCo v3
(Chen et al. 2021) and "Better plain ViT baselines" (Beyer et al. 2022).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import Dtype, Encoder

POOL_TYPES = ("gap", "cls")
POSEMB_TYPES = ("learn", "sincos2d")
STEM_TYPES = ("patch", "conv")


def sincos_2d_posemb(h: int, w: int, dim: int, temperature: float = 10_000.0) -> jax.Array:
    """Fixed position embedding ``[h * w, dim]`` float32 (row-major over the patch grid).

    A quarter of the channels each hold sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω) for geometrically
    spaced frequencies ω from 1 down to 1/temperature, so every patch position is distinguishable
    from the first step of training (learned embeddings start random and must be learned).
    """
    if dim % 4:
        raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {dim}")
    y, x = jnp.mgrid[:h, :w]
    omega = jnp.arange(dim // 4, dtype=jnp.float32) / max(dim // 4 - 1, 1)
    omega = 1.0 / (temperature ** omega)
    y = y.reshape(-1, 1).astype(jnp.float32) * omega[None]
    x = x.reshape(-1, 1).astype(jnp.float32) * omega[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


class VisionTransformer(nn.Module):
    """Small ViT returning one feature vector per image.

    Params (under this module): ``patch_embed/{kernel [p, p, 3, W], bias [W]}`` (stem='patch')
    or ``stem_{i}/{kernel [3, 3, C_in, C_i], bias}`` + ``patch_embed/{kernel [1, 1, C, W], bias}``
    (stem='conv'), ``pos_embedding [num_patches, W]`` (posemb='learn' only), ``cls [W]`` (only
    for pool='cls'), ``encoder/...``. The position embedding covers the patches only (the CLS
    token gets none); its length is fixed by the image size seen at init.

    stem='conv' replaces the single p x p patch projection by log2(p) stride-2 3x3 convolutions
    (GELU between) and a 1x1 projection: the same token grid, at a few percent more FLOPs, and
    much faster, more stable optimisation for small models (Xiao et al. 2021).
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "gap"
    posemb: str = "learn"
    stem: str = "patch"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """images ``[B, H, W, C]`` float -> features ``[B, width]`` in ``dtype``.

        ``train`` is accepted for API symmetry; the tower is deterministic (no dropout).
        """
        del train
        if self.pool not in POOL_TYPES:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOL_TYPES}")
        _, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
        if self.posemb not in POSEMB_TYPES:
            raise ValueError(f"unknown posemb {self.posemb!r}; expected one of {POSEMB_TYPES}")
        if self.stem not in STEM_TYPES:
            raise ValueError(f"unknown stem {self.stem!r}; expected one of {STEM_TYPES}")
        x = images.astype(self.dtype)
        if self.stem == "conv":
            if p & (p - 1):
                raise ValueError(f"stem='conv' needs a power-of-two patch_size, got {p}")
            n = p.bit_length() - 1
            for i in range(n):
                # Channels grow to the width at the last stride-2 layer.
                channels = max(self.width >> (n - 1 - i), 8)
                x = nn.gelu(self._conv(channels, (3, 3), (2, 2), "SAME", f"stem_{i}")(x))
            x = self._conv(self.width, (1, 1), (1, 1), "VALID", "patch_embed")(x)
        else:
            # Conv with kernel = stride = patch size is exactly a linear map of each flattened patch.
            x = self._conv(self.width, (p, p), (p, p), "VALID", "patch_embed")(x)
        grid_h, grid_w = x.shape[1], x.shape[2]
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)  # [B, num_patches, W]
        if self.posemb == "learn":
            pos = self.param(
                "pos_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                (x.shape[1], self.width),
                jnp.float32,
            )
        else:
            pos = sincos_2d_posemb(grid_h, grid_w, self.width)
        x = x + pos.astype(self.dtype)[None]
        if self.pool == "cls":
            cls = self.param(
                "cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (self.width,), jnp.float32,
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)
        x = Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, name="encoder")(x)
        if self.pool == "cls":
            return x[:, 0]
        # Mean in float32: summing many bf16 tokens loses precision.
        return jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype)

    def _conv(self, features: int, kernel, strides, padding: str, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            kernel,
            strides=strides,
            padding=padding,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("patch_height", "patch_width", "channels", "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name=name,
        )
