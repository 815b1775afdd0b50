"""Vision Transformer image tower (pre-norm, learned position embedding, 'gap' or 'cls' pooling)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import Dtype, Encoder

POOL_TYPES = ("gap", "cls")


class VisionTransformer(nn.Module):
    """Small ViT returning one feature vector per image.

    Params (under this module): ``patch_embed/{kernel [p, p, 3, W], bias [W]}``,
    ``pos_embedding [num_patches, W]``, ``cls [W]`` (only for pool='cls'), ``encoder/...``.
    The position embedding covers the patches only (the CLS token gets none), so its shape is
    the same for both poolings; its length is fixed by the image size seen at init.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "gap"
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
        # Conv with kernel = stride = patch size is exactly a linear map of each flattened patch.
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("patch_height", "patch_width", "channels", "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(images.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)  # [B, num_patches, W]
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (x.shape[1], self.width),
            jnp.float32,
        )
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
