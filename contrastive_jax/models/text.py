"""Transformer text tower: CLIP-style causal (pooled at EOS) or SigLIP-style bidirectional (pooled
at the last token or by multihead attention pooling).

Token conventions (no tokenizer dependency): pad id is 0 and the EOS token is the last non-pad
token of every sequence, so the EOS position is ``sum(tokens != 0) - 1``. Pad keys are masked
in attention, and with ``causal=True`` each token sees only itself and earlier tokens; together
these make the EOS output independent of anything at or after the first pad (for causal, of
anything after EOS).

With ``eos_id >= 0`` the EOS position is instead the first occurrence of that id, and the keys
up to it are valid whatever their ids. OpenAI CLIP's vocabulary needs this: its id 0 is a real
byte token (``!``) that is also the padding, and CLIP pools at the end-of-text token.

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

    ``eos_id``: -1 (pad id 0 marks padding, EOS is the last non-pad token) or the EOS token's id
    (see the module docstring). ``norm_eps``: every LayerNorm's epsilon (PyTorch uses 1e-5).

    These fields are the config group ``model.text`` (``models/config.py``: their defaults here
    are the run's defaults; the required ones get theirs there; ``context_length=None`` is ``0``
    in a config).

    Attributes:
      vocab_size: rows of the token embedding (config ``-1``: the tokenizer's size, filled in by
        the trainer before the model is built).
      width: token width ``W``, the output feature size. depth: number of encoder blocks.
      num_heads: attention heads (divide ``width``). mlp_dim: hidden width of each block's MLP.
      causal: causal attention (CLIP, pooled at EOS) or bidirectional (SigLIP, pool
        ``'last'`` / ``'map'``).
      context_length: rows of the position embedding in tokens; None: the text length at init.
      pool: ``'eos'`` | ``'last'`` | ``'map'`` (see the module docstring).
      act / remat / scan / norm_eps: as :class:`~contrastive_jax.models.vit.VisionTransformer`.
      eos_id: -1 (pad id 0 marks padding, EOS is the last non-pad token) or the id of the EOS
        token, pooled at its first occurrence (OpenAI CLIP: 49407, since its id 0 is ``!``).
      mask_pad: mask padding keys in attention (see the module docstring). False: every position
        attends to every position, pads included, as SigLIP was trained (big_vision; Hugging Face's
        ``SiglipTextModel`` called without ``attention_mask``).
      attention_impl: ``'auto'`` (cuDNN flash attention on a GPU in bf16/fp16, else XLA) |
        ``'xla'`` | ``'cudnn'`` | ``'einsum'`` (the hand-written reference): how attention is
        computed (:func:`~contrastive_jax.models.layers.resolve_attention_impl`); all give the same
        function, and the params do not depend on it.
      dtype: compute dtype (params stay float32); set from ``model.dtype``.
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
    eos_id: int = -1
    mask_pad: bool = True
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False, return_tokens: bool = False):
        """tokens ``[B, L]`` int (0 = pad) -> features ``[B, width]`` in ``dtype``.

        ``return_tokens=True`` (FILIP's token-wise loss): ``(features, token_features [B, L,
        width], token_mask [B, L] bool)``, the encoder's output at every position and True for the
        real tokens (non-pad; with ``eos_id >= 0`` the positions up to the first EOS), whatever
        ``mask_pad``. The parameters are the same either way.
        """
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

        if self.eos_id >= 0:
            is_eos = tokens == self.eos_id
            # First EOS; a row without one pools its last position (argmax of all-False is 0).
            eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), length - 1)
            valid = jnp.arange(length)[None, :] <= eos[:, None]
        else:
            valid = tokens != PAD_ID  # [B, L]
            # EOS = last non-pad token; an all-pad row pools position 0 rather than wrapping to -1.
            eos = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
        token_mask = valid
        if not self.mask_pad:
            valid = jnp.ones_like(valid)
        # Keys: [B, 1, 1, L]. The causal part is the encoder's `causal` flag rather than a dense
        # [L, L] mask, so that fused kernels (cuDNN) can skip the masked half instead of reading it.
        key_mask = valid[:, None, None, :]
        x = Encoder(
            self.depth, self.num_heads, self.mlp_dim, act=self.act, remat=self.remat, scan=self.scan,
            dtype=self.dtype, norm_eps=self.norm_eps, attention_impl=self.attention_impl,
            causal=self.causal, name="encoder",
        )(x, key_mask)

        if self.pool == "last":
            pooled = x[:, -1]
        elif self.pool == "map":
            pooled = MAPHead(self.num_heads, self.mlp_dim, self.act, dtype=self.dtype, norm_eps=self.norm_eps,
                             attention_impl=self.attention_impl, name="map")(x, key_mask)
        else:
            pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        if return_tokens:
            return pooled, x, token_mask
        return pooled
