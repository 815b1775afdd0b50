"""Transformer text tower: CLIP-style causal (pooled at EOS) or SigLIP-style bidirectional (pooled
at the last token or by multihead attention pooling).

Token conventions (no tokenizer dependency): pad id is 0 and the EOS token is the last non-pad
token of every sequence, so the EOS position is ``sum(tokens != 0) - 1``. Pad keys are masked
in attention, and with ``causal=True`` each token sees only itself and earlier tokens; together
these make the EOS output independent of anything at or after the first pad (for causal, of
anything after EOS).

Pooling (``pool``): ``'eos'`` (CLIP, Radford et al. 2021), ``'last'`` (the last position of
the padded sequence, as SigLIP's text tower, Zhai et al. 2023 — with pad keys masked that
position reads the real tokens), ``'map'`` (multihead attention pooling over the non-pad tokens).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import Dtype, Encoder, MAPHead, constrain

PAD_ID = 0
POOL_TYPES = ("eos", "last", "map")


class TextTransformer(nn.Module):
    """Text transformer returning one feature vector per sequence.

    Params: ``token_embedding [vocab_size, W]``, ``pos_embedding [context_length, W]``,
    ``encoder/...``, ``map/...`` (pool='map').

    ``context_length``: rows of the position embedding. ``None`` takes the input length at init.
    At apply time the stored length is used and inputs may be *shorter* (the first ``L`` rows are
    used), so a model initialized with ``L=77`` also encodes ``L=16`` inputs identically to their
    pad-extended versions (for pool 'eos' and 'map').
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    causal: bool = True
    context_length: int | None = None
    pool: str = "eos"
    act: str = "gelu"
    remat: str = "none"
    scan: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """tokens ``[B, L]`` int (0 = pad) -> features ``[B, width]`` in ``dtype``."""
        del train
        if self.pool not in POOL_TYPES:
            raise ValueError(f"unknown text pool {self.pool!r}; expected one of {POOL_TYPES}")
        if tokens.ndim != 2:
            raise ValueError(f"TextTransformer expects tokens [B, L], got shape {tokens.shape}")
        _, length = tokens.shape
        tokens = tokens.astype(jnp.int32)
        emb = self.param(
            "token_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.vocab_size, self.width),
            jnp.float32,
        )
        x = jnp.take(emb, tokens, axis=0).astype(self.dtype)  # [B, L, W]

        # Flax checks a stored param against the shape its init would produce now, so read the
        # stored context length back instead of deriving it from this call's input length.
        if self.has_variable("params", "pos_embedding"):
            ctx = nn.meta.unbox(self.get_variable("params", "pos_embedding")).shape[0]
        else:
            ctx = self.context_length or length
        if length > ctx:
            raise ValueError(f"text length {length} exceeds the model's context length {ctx}")
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
            (ctx, self.width),
            jnp.float32,
        )
        x = x + pos[:length].astype(self.dtype)[None]
        x = constrain(x, ("batch", "act_length", "act_embed"))

        valid = tokens != PAD_ID  # [B, L]
        key_mask = valid[:, None, None, :]  # keys: [B, 1, 1, L]
        mask = key_mask
        if self.causal:
            mask = mask & jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        x = Encoder(
            self.depth, self.num_heads, self.mlp_dim, act=self.act, remat=self.remat, scan=self.scan,
            dtype=self.dtype, name="encoder",
        )(x, mask)

        if self.pool == "last":
            return x[:, -1]
        if self.pool == "map":
            return MAPHead(self.num_heads, self.mlp_dim, self.act, dtype=self.dtype, name="map")(x, key_mask)
        # EOS = last non-pad token; an all-pad row pools position 0 rather than wrapping to -1.
        eos = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
        return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
