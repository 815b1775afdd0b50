"""Transformer text decoder with cross-attention to image tokens (captioning: CoCa, CapPa, SigLIP 2).

Teacher forcing. The decoder takes the caption ``tokens [B, L]`` themselves (pad id 0, as
everywhere in this package) and shifts them right internally: its input at position 0 is a
learned begin-of-sequence vector ``bos``, at position ``i > 0`` the embedding of ``tokens[:, i-1]``.
So the hidden state at position ``i`` predicts ``tokens[:, i]``, the loss's targets are the
tokens and its mask is ``tokens != 0``, and no tokenizer-specific BOS id is needed. Decoding
fills a ``[B, L]`` buffer left to right with the same convention (:mod:`.decoding`).

Blocks are pre-LN: ``x + SelfAttn(LN(x))``, ``x + CrossAttn(LN(x), image)``, ``x + MLP(LN(x))``,
then a final LayerNorm (as the decoders of CoCa, Yu et al. 2022, and CapPa, Tschannen et al.
2023). The image tokens ``[B, T, d_img]`` are projected to the decoder's width once
(``image_proj``) and shared by every block's cross-attention.

Parallel prediction (CapPa: Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners
Too"): for a fraction ``parallel_fraction`` of the examples (at ``train=True``, drawn per example
from the ``'dropout'`` rng stream; or chosen explicitly with ``parallel=[B] bool``) every input
token is replaced by a learned ``mask_token`` and self-attention is bidirectional, so the decoder
must predict all tokens from the image alone. Those examples get a dense ``[B, 1, L, L]`` mask,
which cuDNN's fused kernel does not take; ``attention_impl='auto'`` then runs XLA's attention.

Output embeddings: tied (``W = token_embedding.T``) or untied (``head_kernel [width, V]``), an
optional ``head_bias [V]``. ``__call__`` returns hidden states only; :meth:`output_projection`
gives ``(W, bias)`` for the logits-free loss; :meth:`logits` computes ``[B, L, V]`` logits for
decoding. The training loss of a caption batch (targets = the tokens, mask = ``tokens != 0``)::

    hidden = decoder.apply(variables, image_tokens, tokens, train=True, rngs={'dropout': rng})
    w, b = decoder.apply(variables, method='output_projection')
    out = losses.captioning.caption_loss(hidden, w, tokens, tokens != 0, b, label_smoothing=0.1)

Decoding re-runs the whole prefix at every step (no KV cache): exact, simple and sharding-neutral,
O(L^2) decoder passes — fine for caption lengths and evaluation-size models.

Param logical axes follow :mod:`.layers`: ``token_embedding ('vocab', 'embed')``,
``pos_embedding ('length', 'embed')``, ``bos`` / ``mask_token ('embed',)``, ``image_proj/kernel
(None, 'embed')`` (the image width is left unsharded so it never collides with ``embed``),
``head_kernel ('embed', 'vocab')``, ``head_bias ('vocab',)``; blocks as the encoder's, plus
``cross_attn`` and ``norm_cross``; scanned blocks stack on ``layers``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import (
    DenseGeneral,
    Dtype,
    LayerNorm,
    MlpBlock,
    MultiHeadAttention,
    _maybe_remat,
    constrain,
    resolve_attention_impl,
)

PAD_ID = 0


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: causal (or masked) self-attention, cross-attention, MLP.

    x ``[B, L, W]``, image ``[B, T, W]`` (already at the decoder's width), self_mask None (then
    causal) or bool ``[B, 1, L, L]`` (True = may attend) -> ``[B, L, W]`` in ``dtype``.
    """

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-6
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, image, self_mask=None):
        x = constrain(x, ("batch", "act_length", "act_embed"))
        impl = self.attention_impl
        if self_mask is not None and impl == "auto":
            # A dense [L, L] mask is not something cuDNN's kernel takes; XLA's attention does.
            impl = "xla"
        h = LayerNorm(dtype=self.dtype, epsilon=self.norm_eps, name="norm_attn")(x)
        x = x + MultiHeadAttention(self.num_heads, causal=self_mask is None, attention_impl=impl,
                                   dtype=self.dtype, name="attn")(h, self_mask)
        h = LayerNorm(dtype=self.dtype, epsilon=self.norm_eps, name="norm_cross")(x)
        x = x + MultiHeadAttention(self.num_heads, attention_impl=self.attention_impl, dtype=self.dtype,
                                   name="cross_attn")(h, None, kv=image)
        h = LayerNorm(dtype=self.dtype, epsilon=self.norm_eps, name="norm_mlp")(x)
        x = x + MlpBlock(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(h)
        return constrain(x, ("batch", "act_length", "act_embed"))


class _ScanDecoderBlock(nn.Module):
    """DecoderBlock in the ``(carry, x) -> (carry, y)`` form ``nn.scan`` needs."""

    num_heads: int
    mlp_dim: int
    act: str
    dtype: Dtype
    remat: str
    norm_eps: float
    attention_impl: str

    @nn.compact
    def __call__(self, x, image, self_mask):
        block = _maybe_remat(DecoderBlock, self.remat, scanned=True)
        return block(self.num_heads, self.mlp_dim, self.act, dtype=self.dtype, norm_eps=self.norm_eps,
                     attention_impl=self.attention_impl, name="block")(x, image, self_mask), None


class TextDecoder(nn.Module):
    """Autoregressive text decoder conditioned on image tokens (see the module docstring).

    Attributes:
      vocab_size: ``V``, rows of the token embedding and columns of the output projection.
      width: residual width ``W``. depth: number of decoder blocks. num_heads: attention heads
        (divide ``width``). mlp_dim: hidden width of each block's MLP.
      context_length: maximum caption length (rows of ``pos_embedding``); inputs may be shorter.
      tie_embeddings: output projection = ``token_embedding.T`` (True) or its own ``head_kernel``.
      output_bias: a ``head_bias [V]`` added to the logits.
      parallel_fraction: CapPa: fraction in ``[0, 1]`` of the examples trained with parallel
        prediction (0: plain autoregressive; the ``mask_token`` param exists only when > 0).
      act / remat / scan / norm_eps / attention_impl / dtype: as
        :class:`~contrastive_jax.models.text.TextTransformer`.
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    context_length: int = 64
    tie_embeddings: bool = True
    output_bias: bool = False
    parallel_fraction: float = 0.0
    act: str = "gelu"
    remat: str = "none"
    scan: bool = False
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    def setup(self):
        if not 0.0 <= self.parallel_fraction <= 1.0:
            raise ValueError(f"parallel_fraction must be in [0, 1], got {self.parallel_fraction}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        resolve_attention_impl(self.attention_impl, self.dtype, self.width // self.num_heads)  # early error
        part = nn.with_logical_partitioning
        self.token_embedding = self.param("token_embedding", part(nn.initializers.normal(0.02), ("vocab", "embed")),
                                          (self.vocab_size, self.width), jnp.float32)
        self.pos_embedding = self.param("pos_embedding", part(nn.initializers.normal(0.01), ("length", "embed")),
                                        (self.context_length, self.width), jnp.float32)
        self.bos = self.param("bos", part(nn.initializers.normal(0.02), ("embed",)), (self.width,), jnp.float32)
        if self.parallel_fraction > 0:
            self.mask_token = self.param("mask_token", part(nn.initializers.normal(0.02), ("embed",)),
                                         (self.width,), jnp.float32)
        self.image_proj = DenseGeneral((self.width,), (None, "embed"), ("embed",), dtype=self.dtype,
                                       name="image_proj")
        if self.scan and self.depth > 0:
            self.blocks = nn.scan(
                _ScanDecoderBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(self.num_heads, self.mlp_dim, self.act, self.dtype, self.remat, self.norm_eps,
              self.attention_impl, name="blocks")
        else:
            block = _maybe_remat(DecoderBlock, self.remat)
            self.block_list = [
                block(self.num_heads, self.mlp_dim, self.act, dtype=self.dtype, norm_eps=self.norm_eps,
                      attention_impl=self.attention_impl, name=f"block_{i}")
                for i in range(self.depth)
            ]
        self.norm = LayerNorm(dtype=self.dtype, epsilon=self.norm_eps, name="norm")
        if not self.tie_embeddings:
            self.head_kernel = self.param(
                "head_kernel", part(nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                                    ("embed", "vocab")),
                (self.width, self.vocab_size), jnp.float32)
        if self.output_bias:
            self.head_bias = self.param("head_bias", part(nn.initializers.zeros, ("vocab",)), (self.vocab_size,),
                                        jnp.float32)

    def __call__(self, image_tokens: jax.Array, tokens: jax.Array, *, train: bool = False,
                 parallel: jax.Array | None = None) -> jax.Array:
        """Teacher-forced hidden states.

        Args:
          image_tokens: ``[B, T, d_img]`` float, the image tower's token sequence.
          tokens: ``[B, L]`` int caption ids (pad 0), ``L <= context_length``; position ``i``'s
            output predicts ``tokens[:, i]`` from ``tokens[:, :i]`` (shifted internally).
          train: draw the CapPa parallel examples (``parallel_fraction`` > 0; rng ``'dropout'``).
          parallel: ``[B]`` bool, explicit choice of the parallel-prediction examples (overrides
            the draw; needs ``parallel_fraction`` > 0 for the ``mask_token`` param).

        Returns:
          ``[B, L, width]`` in ``dtype``: the final-LayerNorm hidden states (logits =
          ``hidden @ W + bias`` with ``(W, bias) = output_projection()``).
        """
        if tokens.ndim != 2 or image_tokens.ndim != 3:
            raise ValueError(f"TextDecoder expects image_tokens [B, T, d] and tokens [B, L], got "
                             f"{image_tokens.shape} and {tokens.shape}")
        b, length = tokens.shape
        if length > self.context_length:
            raise ValueError(f"caption length {length} exceeds the decoder's context_length {self.context_length}")
        emb = jnp.take(self.token_embedding, tokens[:, :-1].astype(jnp.int32), axis=0)  # [B, L-1, W]
        bos = jnp.broadcast_to(self.bos, (b, 1, self.width))
        x = jnp.concatenate([bos, emb], axis=1).astype(self.dtype)
        if parallel is None and train and self.parallel_fraction > 0:
            parallel = jax.random.bernoulli(self.make_rng("dropout"), self.parallel_fraction, (b,))
        self_mask = None
        if parallel is not None:
            if self.parallel_fraction <= 0:
                raise ValueError("parallel prediction needs parallel_fraction > 0 (the mask_token param)")
            parallel = parallel.astype(bool)
            x = jnp.where(parallel[:, None, None], self.mask_token.astype(self.dtype), x)
            causal = jnp.tril(jnp.ones((length, length), bool))
            self_mask = causal[None, None] | parallel[:, None, None, None]  # [B, 1, L, L]
        x = x + self.pos_embedding[:length].astype(self.dtype)[None]
        x = constrain(x, ("batch", "act_length", "act_embed"))
        image = self.image_proj(image_tokens.astype(self.dtype))
        image = constrain(image, ("batch", "act_length", "act_embed"))
        if self.scan and self.depth > 0:
            x, _ = self.blocks(x, image, self_mask)
        else:
            for block in self.block_list:
                x = block(x, image, self_mask)
        return self.norm(x)

    def output_projection(self) -> tuple[jax.Array, jax.Array | None]:
        """``(W [width, V] float32, bias [V] float32 or None)``: logits = ``hidden @ W + bias``.

        Tied: ``W`` is ``token_embedding.T`` (gradients from the loss flow into the embedding).
        """
        w = self.token_embedding.T if self.tie_embeddings else self.head_kernel
        return w, (self.head_bias if self.output_bias else None)

    def logits(self, image_tokens: jax.Array, tokens: jax.Array, **kwargs) -> jax.Array:
        """``[B, L, V]`` float32 logits (decoding and small-vocabulary evaluation only: training
        should use the logits-free loss). Arguments as :meth:`__call__`."""
        h = self(image_tokens, tokens, **kwargs)
        w, b = self.output_projection()
        out = jnp.einsum("blw,wv->blv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return out if b is None else out + b
