"""Vision Transformer image tower.

Pre-norm encoder; pooling ``gap`` (mean of tokens), ``cls`` (a class token) or ``map``
(multihead attention pooling); a linear patch embedding or a convolutional stem; learned or fixed
2-D sin-cos position embeddings; GELU or QuickGELU; FLIP patch dropout at train time; remat and
scanned layers.

References: ViT (Dosovitskiy et al. 2021); OpenAI CLIP's ViT variant — bias-free patch
projection, a LayerNorm before the encoder (``norm_pre``), a position for the class token,
QuickGELU (Radford et al. 2021); convolutional stem: "Early Convolutions Help Transformers See
Better" (Xiao et al. 2021); 2-D sin-cos position embeddings as in MoCo v3 (Chen et al. 2021) and
"Better plain ViT baselines" (Beyer et al. 2022); MAP pooling as in SigLIP (Zhai et al. 2023);
patch dropout: FLIP, "Scaling Language-Image Pre-training via Masking" (Li et al. 2023); patch
masking with a learned mask token (``patch_mask``): BEiT (Bao et al. 2022), iBOT (Zhou et al.
2022), as used for masked prediction by TIPS (Maninis et al. 2024) and SigLIP 2 (Tschannen et al.
2025).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import Dtype, Encoder, LayerNorm, MAPHead, constrain

POOL_TYPES = ("gap", "cls", "map")
POSEMB_TYPES = ("learn", "sincos2d")
STEM_TYPES = ("patch", "conv")

# Published ViT shapes by name: (width, depth, mlp_dim, num_heads). Ti/S/B/L/H from Dosovitskiy
# et al. 2021 and Steiner et al. 2021; g (giant) and So400m (shape-optimized, Alabdulmohsin
# et al. 2023) as used by SigLIP. Patch size is separate ("B/16" = VIT_VARIANTS["B"], patch 16).
VIT_VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "So400m": (1152, 27, 4304, 16),
}


def vit_variant(name: str) -> dict:
    """``'B/16'`` -> ``dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)``."""
    size, _, patch = name.partition("/")
    if size not in VIT_VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; sizes: {', '.join(VIT_VARIANTS)}")
    width, depth, mlp_dim, heads = VIT_VARIANTS[size]
    out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
    if patch:
        out["patch_size"] = int(patch)
    return out


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


def patch_dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """FLIP patch dropout: keeps a random ``round((1 - rate) * N)`` of the N tokens per example.

    x ``[B, N, W]`` -> ``[B, K, W]`` (kept tokens in their original order). Position embeddings
    must already be added, so kept tokens remember where they came from. Compute scales with K:
    at rate 0.5 the encoder does about half the work (Li et al. 2023).
    """
    b, n, _ = x.shape
    keep = max(1, int(round(n * (1.0 - rate))))
    if keep >= n:
        return x
    noise = jax.random.uniform(rng, (b, n))
    idx = jnp.sort(jnp.argsort(noise, axis=1)[:, :keep], axis=1)  # [B, K]
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


class VisionTransformer(nn.Module):
    """ViT returning one feature vector per image.

    Params (under this module): ``patch_embed/{kernel [p, p, 3, W], bias [W]}`` (stem='patch';
    no bias with ``patch_bias=False``) or ``stem_{i}/...`` + ``patch_embed/{kernel [1, 1, C, W],
    bias}`` (stem='conv'), ``pos_embedding [num_patches (+1 with cls_posemb), W]``
    (posemb='learn' only), ``cls [W]`` (pool='cls'), ``norm_pre/...`` (norm_pre), ``encoder/...``,
    ``map/...`` (pool='map'). The position embedding's length is fixed by the image size seen at
    init; by default it covers the patches only, ``cls_posemb=True`` gives the class token a
    position too (OpenAI CLIP).

    stem='conv' replaces the single p x p patch projection by log2(p) stride-2 3x3 convolutions
    (GELU between) and a 1x1 projection: the same token grid, at a few percent more FLOPs, and
    much faster, more stable optimisation for small models (Xiao et al. 2021).

    ``patch_dropout`` (FLIP): at ``train=True`` only this fraction of the patch tokens is dropped
    at random (rng stream ``'dropout'``); at ``train=False`` all tokens are used.

    ``patch_mask`` (a call argument, for masked prediction): the embeddings of the masked patches
    are replaced by a learned ``mask_token`` ``[W]`` (float32 param, created on the first call
    with a mask) before the position embeddings are added, so a masked token still knows its
    position but not its content. Without a mask nothing changes (no param, same output bits).

    ``norm_eps``: every LayerNorm's epsilon (1e-6; checkpoints converted from PyTorch use 1e-5).

    These fields are the config group ``model.image`` (``models/config.py``: their defaults
    here are the run's defaults; the required ones get theirs there).

    Attributes:
      patch_size: side of a square patch in pixels (image sides must be multiples of it).
      width: token width ``W``, the output feature size.
      depth: number of encoder blocks. num_heads: attention heads (divide ``width``).
      mlp_dim: hidden width of each block's MLP.
      pool: ``'gap'`` (mean of the tokens) | ``'cls'`` (a class token) | ``'map'`` (multihead
        attention pooling).
      posemb: ``'learn'`` | ``'sincos2d'`` (fixed, no parameter).
      stem: ``'patch'`` (linear p x p) | ``'conv'`` (3x3 stride-2 convolutions).
      act: ``'gelu'`` (tanh approximation) | ``'gelu_exact'`` | ``'quick_gelu'`` (OpenAI CLIP) |
        ``'relu'`` (:data:`~contrastive_jax.models.layers.ACTIVATIONS`).
      patch_bias: bias in the patch projection (OpenAI CLIP: False).
      norm_pre: a LayerNorm before the encoder (OpenAI CLIP's ``ln_pre``: True).
      cls_posemb: with ``pool='cls'``, the class token gets a learned position (OpenAI CLIP).
      patch_dropout: FLIP: fraction in [0, 1) of the patch tokens dropped at train time.
      crop_to_patches: image sides need not be multiples of ``patch_size``: the last ``H % p``
        rows and ``W % p`` columns are ignored, as PyTorch's strided patch convolution does
        (SigLIP So400m/14 at 384 px: a 27 x 27 grid). False: such sizes are an error.
      remat: ``'none'`` | ``'full'`` | ``'dots_saveable'``: what the backward pass recomputes.
      scan: ``nn.scan`` over the blocks (params stacked on a leading ``layers`` axis, one
        compiled block).
      norm_eps: LayerNorm epsilon (big_vision 1e-6; PyTorch / OpenAI CLIP 1e-5).
      attention_impl: ``'auto'`` (cuDNN flash attention on a GPU in bf16/fp16, else XLA) |
        ``'xla'`` | ``'cudnn'`` | ``'einsum'`` (the hand-written reference): how attention is
        computed (:func:`~contrastive_jax.models.layers.resolve_attention_impl`); all give the same
        function, and the params do not depend on it.
      dtype: compute dtype (params stay float32); set from ``model.dtype``.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "gap"
    posemb: str = "learn"
    stem: str = "patch"
    act: str = "gelu"
    patch_bias: bool = True
    norm_pre: bool = False
    cls_posemb: bool = False
    patch_dropout: float = 0.0
    crop_to_patches: bool = False
    remat: str = "none"
    scan: bool = False
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False, return_tokens: bool = False,
                 patch_mask: jax.Array | None = None):
        """images ``[B, H, W, C]`` float -> features ``[B, width]`` in ``dtype``.

        ``patch_mask``: optional bool ``[B, num_patches]`` (row-major over the patch grid; True =
        masked): those patches enter the encoder as the learned mask token (class docstring).
        Not with ``patch_dropout`` at train time (masked prediction needs every token's output).

        ``return_tokens=True`` (FILIP's token-wise loss): ``(features, tokens [B, N, width],
        token_mask [B, N] bool)``, the encoder's output for the N patch tokens (after its final
        LayerNorm; the class token left out; at train time with ``patch_dropout`` the kept ones);
        the mask is all True. The parameters are the same either way.
        """

        if self.pool not in POOL_TYPES:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOL_TYPES}")
        if images.ndim != 4:
            raise ValueError(f"VisionTransformer expects images [B, H, W, C], got shape {images.shape}")
        _, h, w, _ = images.shape
        p = self.patch_size
        if (h % p or w % p) and not self.crop_to_patches:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
        if self.posemb not in POSEMB_TYPES:
            raise ValueError(f"unknown posemb {self.posemb!r}; expected one of {POSEMB_TYPES}")
        if self.stem not in STEM_TYPES:
            raise ValueError(f"unknown stem {self.stem!r}; expected one of {STEM_TYPES}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        use_cls = self.pool == "cls"
        if h % p or w % p:  # crop_to_patches
            images = images[:, : h - h % p, : w - w % p]
        x = images.astype(self.dtype)
        if self.stem == "conv":
            if p & (p - 1):
                raise ValueError(f"stem='conv' needs a power-of-two patch_size, got {p}")
            n = p.bit_length() - 1
            for i in range(n):
                # Channels grow to the width at the last stride-2 layer.
                channels = max(self.width >> (n - 1 - i), 8)
                x = nn.gelu(self._conv(channels, (3, 3), (2, 2), "SAME", f"stem_{i}", True)(x))
            x = self._conv(self.width, (1, 1), (1, 1), "VALID", "patch_embed", self.patch_bias)(x)
        else:
            # Conv with kernel = stride = patch size is exactly a linear map of each flattened patch.
            x = self._conv(self.width, (p, p), (p, p), "VALID", "patch_embed", self.patch_bias)(x)
        grid_h, grid_w = x.shape[1], x.shape[2]
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)  # [B, num_patches, W]
        num_patches = x.shape[1]
        with_cls_pos = use_cls and self.cls_posemb
        if self.posemb == "learn":
            pos = self.param(
                "pos_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                (num_patches + with_cls_pos, self.width),
                jnp.float32,
            )
        else:
            pos = sincos_2d_posemb(grid_h, grid_w, self.width)
            if with_cls_pos:
                pos = jnp.concatenate([jnp.zeros((1, self.width), jnp.float32), pos], axis=0)
        pos = pos.astype(self.dtype)
        if use_cls:
            cls = self.param(
                "cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (self.width,), jnp.float32,
            )
        if patch_mask is not None:
            # After the other params, so their init keys (the module's rng counter) do not depend
            # on whether a mask was ever passed; before the positions are added (BEiT / iBOT).
            x = self._mask_patches(x, patch_mask, train)
        x = x + pos[with_cls_pos:][None]
        if train and self.patch_dropout > 0.0:
            x = patch_dropout(x, self.patch_dropout, self.make_rng("dropout"))
        if use_cls:
            cls = cls.astype(self.dtype)
            if with_cls_pos:
                cls = cls + pos[0]
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
        x = constrain(x, ("batch", "act_length", "act_embed"))
        if self.norm_pre:
            x = LayerNorm(dtype=self.dtype, epsilon=self.norm_eps, name="norm_pre")(x)
        x = Encoder(
            self.depth, self.num_heads, self.mlp_dim, act=self.act, remat=self.remat, scan=self.scan,
            dtype=self.dtype, norm_eps=self.norm_eps, attention_impl=self.attention_impl,
            name="encoder",
        )(x)
        if use_cls:
            pooled, patches = x[:, 0], x[:, 1:]
        elif self.pool == "map":
            pooled, patches = MAPHead(self.num_heads, self.mlp_dim, self.act, dtype=self.dtype, norm_eps=self.norm_eps,
                                      attention_impl=self.attention_impl, name="map")(x), x
        else:
            # Mean in float32: summing many bf16 tokens loses precision.
            pooled, patches = jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype), x
        if return_tokens:
            return pooled, patches, jnp.ones(patches.shape[:2], bool)
        return pooled

    def _mask_patches(self, x: jax.Array, patch_mask: jax.Array, train: bool) -> jax.Array:
        """Patch embeddings ``x [B, N, W]`` with the masked ones (``patch_mask [B, N]`` bool)
        replaced by the learned ``mask_token`` [W] (created here on first use)."""
        if patch_mask.shape != x.shape[:2]:
            raise ValueError(f"patch_mask must be [B, num_patches] = {x.shape[:2]}, got {patch_mask.shape}")
        if train and self.patch_dropout > 0.0:
            raise ValueError("patch_mask cannot be combined with patch_dropout > 0 at train time: masked "
                             "prediction needs the output of every patch token")
        token = self.param("mask_token", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                           (self.width,), jnp.float32)
        return jnp.where(patch_mask[:, :, None], token.astype(self.dtype)[None, None], x)

    def _conv(self, features: int, kernel, strides, padding: str, name: str, use_bias: bool) -> nn.Conv:
        return nn.Conv(
            features,
            kernel,
            strides=strides,
            padding=padding,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("patch_height", "patch_width", "channels", "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name=name,
        )
