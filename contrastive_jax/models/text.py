"""Transformer text tower, pooled at the EOS token (CLIP-style).

Token conventions (no tokenizer dependency): pad id is 0 and the EOS token is the last non-pad
token of every sequence, so the pooled position is ``sum(tokens != 0) - 1``. Pad keys are masked
in attention, and with ``causal=True`` each token sees only itself and earlier tokens; together
these make the output independent of anything at or after the first pad (for causal, of anything
after EOS).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import Dtype, Encoder

PAD_ID = 0


class TextTransformer(nn.Module):
    """Text transformer returning one feature vector per sequence.

    Params: ``token_embedding [vocab_size, W]``, ``pos_embedding [context_length, W]``,
    ``encoder/...``.

    ``context_length``: rows of the position embedding. ``None`` takes the input length at init.
    At apply time the stored length is used and inputs may be *shorter* (the first ``L`` rows are
    used), so a model initialized with ``L=77`` also encodes ``L=16`` inputs identically to their
    pad-extended versions.
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    causal: bool = True
    context_length: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """tokens ``[B, L]`` int (0 = pad) -> features ``[B, width]`` in ``dtype``."""
        del train
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

        valid = tokens != PAD_ID  # [B, L]
        mask = valid[:, None, None, :]  # keys: [B, 1, 1, L]
        if self.causal:
            mask = mask & jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        x = Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, name="encoder")(x, mask)

        # EOS = last non-pad token; an all-pad row pools position 0 rather than wrapping to -1.
        eos = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
        return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
