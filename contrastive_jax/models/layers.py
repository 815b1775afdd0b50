"""Building blocks shared by the towers: dense layers, attention, pre-norm transformer encoder.

Every parameter is created through ``nn.with_logical_partitioning`` so that sharding rules can map
logical axis names to mesh axes later. Logical names used here:

- ``embed``: a tower's residual width.
- ``mlp``: the hidden dimension of a transformer MLP.
- ``heads`` / ``kv``: attention heads and per-head feature dimension.
- ``joint``: the shared embedding dimension of the projection heads.
- ``vocab``, ``length``, ``patch_height``, ``patch_width``, ``channels``: see the towers.

Parameters are always float32; ``dtype`` is the compute dtype (activations and matmul inputs).
LayerNorm statistics and attention softmax are computed in float32 regardless (bf16 is too
coarse for them).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Large negative logit for masked attention entries. Finite (not -inf) so that a row whose keys
# are all masked yields a uniform softmax instead of NaN.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def fan_in_init(num_in_dims: int, ndim: int):
    """Truncated-normal fan-in init for a kernel whose first ``num_in_dims`` dims are inputs.

    Flax's default ``lecun_normal`` assumes a 2-D kernel (in_axis=-2); for multi-dim kernels such
    as ``[embed, heads, kv]`` that would take ``heads`` as the fan-in, so the axes are explicit.
    """
    return nn.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=tuple(range(num_in_dims)),
        out_axis=tuple(range(num_in_dims, ndim)),
    )


class DenseGeneral(nn.Module):
    """``y = x · kernel + bias`` contracting the last ``num_in_dims`` dims of ``x``.

    Shapes: x ``[..., *in_dims]`` -> y ``[..., *features]`` in ``dtype``; kernel
    ``[*in_dims, *features]`` float32 with logical names ``kernel_axes``; bias ``[*features]``
    with ``bias_axes`` (``None``: no bias).
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    bias_axes: Sequence[str] | None = None
    num_in_dims: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        in_shape = tuple(x.shape[x.ndim - self.num_in_dims :])
        shape = in_shape + features
        if len(self.kernel_axes) != len(shape):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not match kernel shape {shape}")
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(fan_in_init(len(in_shape), len(shape)), tuple(self.kernel_axes)),
            shape,
            jnp.float32,
        )
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.num_in_dims)
        if self.bias_axes is not None:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.bias_axes)),
                features,
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, statistics in float32, output cast to ``dtype``.

    Params ``scale``/``bias`` ``[embed]`` float32.
    """

    dtype: Dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (width,), jnp.float32
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (width,), jnp.float32
        )
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention.

    Args (call): x ``[B, L, W]``; mask bool broadcastable to ``[B, heads, L, L]`` (True = query
    may attend to key) or None. Returns ``[B, L, W]`` in ``dtype``.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def heads_proj(name):
            return DenseGeneral(
                (self.num_heads, head_dim), ("embed", "heads", "kv"), ("heads", "kv"),
                dtype=self.dtype, name=name,
            )(x)

        q, k, v = heads_proj("query"), heads_proj("key"), heads_proj("value")  # [B, L, H, Dh]
        q = q * jnp.asarray(head_dim**-0.5, self.dtype)
        # Logits and softmax in float32: bf16 logits lose the small differences softmax amplifies.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, _MASK_VALUE)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return DenseGeneral(
            (width,), ("heads", "kv", "embed"), ("embed",), num_in_dims=2, dtype=self.dtype,
            name="out",
        )(out)


class MlpBlock(nn.Module):
    """``Dense(mlp_dim) -> GELU -> Dense(width)``; x ``[..., W]`` -> ``[..., W]``."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = DenseGeneral((self.mlp_dim,), ("embed", "mlp"), ("mlp",), dtype=self.dtype, name="fc1")(x)
        h = nn.gelu(h)
        return DenseGeneral((width,), ("mlp", "embed"), ("embed",), dtype=self.dtype, name="fc2")(h)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = LayerNorm(dtype=self.dtype, name="norm_attn")(x)
        x = x + MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(h, mask)
        h = LayerNorm(dtype=self.dtype, name="norm_mlp")(x)
        return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(h)


class Encoder(nn.Module):
    """``depth`` pre-norm blocks (``block_0`` ...) followed by a final LayerNorm (``norm``).

    x ``[B, L, W]`` -> ``[B, L, W]`` in ``dtype``.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f"block_{i}")(x, mask)
        return LayerNorm(dtype=self.dtype, name="norm")(x)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Float32 ``x / ||x||`` over the last dim; ``eps`` keeps a zero vector finite (stays zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
