"""CoCa: a contrastive two-tower model with a captioning decoder on the image tokens.

CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models"), CapPa
(Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners Too") and SigLIP 2
(Tschannen et al. 2025) train the image tower for two tasks at once: the contrastive pair loss on
the pooled embeddings, and next-token prediction of the caption by a text decoder that
cross-attends to the image tower's token sequence.

``model.name = 'coca'``: the two-tower model (``config.model`` fields as ``two_tower``) plus
``model.decoder`` (a :class:`contrastive_jax.models.decoder.TextDecoder`) and ``model.caption``
(how the decoder's loss is computed). One pass of the image tower gives both the pooled
embedding and the tokens; the decoder is teacher-forced on the batch's ``text`` (pad 0; the
decoder shifts right itself, after a learned BOS) and its token cross-entropy is computed INSIDE
the model with the fused, logits-free loss (:func:`contrastive_jax.losses.captioning.
caption_loss`), so the outputs stay per example and the ``[B, L, V]`` logits never exist:

``caption_loss`` float32 [B] (each example's summed token loss), ``caption_tokens`` float32 [B]
(its number of target tokens), ``caption_correct`` float32 [B] (its tokens whose argmax is the
target), besides ``image``, ``text``, ``scale``, ``bias``. The ``captioning`` objective (alone or
as a term of ``loss.name='multi'``) turns them into the mean per-token loss of the global batch;
GradCache micro-batching splits them like any per-example output.

:meth:`CoCa.caption` decodes (greedy or beam search, :mod:`contrastive_jax.models.decoding`).

Self-distillation and masked prediction (SigLIP 2's late-training terms, after SILC, Naeem et
al. 2023, and TIPS, Maninis et al. 2024; heads and losses as in DINO, Caron et al. 2021, and
iBOT, Zhou et al. 2022): ``model.self_distill.dim = K > 0`` adds two projection heads
(:class:`DistillHead`: MLP -> L2-normalized bottleneck -> K logits), ``distill_head`` on pooled
image features and ``patch_head`` on patch tokens, and the student outputs

``distill_local`` float32 [B, N, K]
    ``distill_head`` logits of each of the N local crops (``model.multicrop=True``: the model
    takes a third input, the batch's ``image_local_views`` [B, N, s, s, 3]; a ViT needs
    ``model.image.posemb='sincos2d'`` for the smaller crops);
``distill_patches`` float32 [B, T, K], ``distill_mask`` float32 [B, T]
    ``patch_head`` logits of every patch token of a second pass of the global view in which
    ``round(mask_ratio * T)`` patches per example (uniformly at random, from the ``'dropout'``
    rng at train time, a fixed key otherwise) are replaced by the ViT's learned mask token, and
    that mask (1 = masked).

The contrastive and captioning outputs come from the unmasked pass, unchanged. The EMA teacher
runs :meth:`CoCa.distill_teacher` (the objective's ``teacher_method``): one unmasked pass of the
image tower (no text tower, no decoder) giving ``distill_global`` [B, K] and
``distill_patches`` [B, T, K]. :mod:`contrastive_jax.losses.self_distill` is the loss.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.losses.captioning import caption_loss
from contrastive_jax.models.layers import DenseGeneral, Dtype, activation, l2_normalize
from contrastive_jax.models.towers import TwoTower

CAPTION_IMPLS = ("chunked", "dense")


class DistillHead(nn.Module):
    """DINO's projection head (Caron et al. 2021): ``fc1`` -> GELU -> ``fc2`` to a bottleneck,
    L2-normalized, then a weight-normalized linear map ``prototypes`` to K logits (each column
    of its kernel is normalized in the forward pass, DINO's weight norm with the gain fixed at
    1), so every logit is a cosine in [-1, 1] and the loss's temperatures set the sharpness.

    Shapes: ``x [..., W]`` (any float dtype) -> float32 ``[..., dim]``. Params: ``fc1/kernel
    [W, hidden]``, ``fc1/bias``, ``fc2/kernel [hidden, bottleneck]``, ``fc2/bias``,
    ``prototypes [bottleneck, dim]`` (all float32).
    """

    dim: int
    hidden: int = 2048
    bottleneck: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = DenseGeneral((self.hidden,), ("embed", "mlp"), ("mlp",), dtype=self.dtype, name="fc1")(x)
        h = activation("gelu")(h)
        z = DenseGeneral((self.bottleneck,), ("mlp", "joint"), ("joint",), dtype=self.dtype, name="fc2")(h)
        z = l2_normalize(z)  # float32
        v = self.param("prototypes", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("joint", "vocab")),
                       (self.bottleneck, self.dim), jnp.float32)
        v = v * jax.lax.rsqrt(jnp.sum(v * v, axis=0, keepdims=True) + 1e-12)
        return jnp.einsum("...c,ck->...k", z, v)


def random_patch_mask(rng: jax.Array, batch: int, num_patches: int, ratio: float) -> jax.Array:
    """bool ``[batch, num_patches]``: exactly ``round(ratio * num_patches)`` True per row (at
    least 1), at uniformly random positions drawn independently per row from ``rng``."""
    count = min(num_patches, max(1, int(round(ratio * num_patches))))
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=1), axis=1)
    return rank < count


class CoCa(TwoTower):
    """:class:`TwoTower` + a captioning decoder (see the module docstring).

    Attributes (besides :class:`TwoTower`'s):
      decoder: the :class:`~contrastive_jax.models.decoder.TextDecoder` (its ``vocab_size`` is
        the tokenizer's).
      caption_label_smoothing: label smoothing of the captioning loss (``model.caption.
        label_smoothing``), in [0, 1).
      caption_impl: ``'chunked'`` (fused, logits-free) | ``'dense'`` (materializes the logits;
        the reference).
      caption_vocab_block, caption_token_block: tile sizes of the fused loss.
      multicrop: the model takes a third input ``image_local_views`` [B, N, s, s, 3] (needs
        ``distill_dim > 0``; ``model.multicrop``).
      distill_dim: K of the self-distillation heads (0: no self-distillation;
        ``model.self_distill.dim``). distill_hidden, distill_bottleneck: the heads' MLP widths.
      distill_mask_ratio: fraction in (0, 1) of the patches masked in the student's pass for
        masked prediction.
    """

    decoder: nn.Module | None = None
    caption_label_smoothing: float = 0.0
    caption_impl: str = "chunked"
    caption_vocab_block: int = 4096
    caption_token_block: int = 4096
    multicrop: bool = False
    distill_dim: int = 0
    distill_hidden: int = 2048
    distill_bottleneck: int = 256
    distill_mask_ratio: float = 0.5

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "text", "image_local_views") if self.multicrop else ("image", "text")

    def setup(self):
        super().setup()
        if self.distill_dim:
            kw = dict(dim=self.distill_dim, hidden=self.distill_hidden, bottleneck=self.distill_bottleneck,
                      dtype=self.dtype)
            self.distill_head = DistillHead(**kw)
            self.patch_head = DistillHead(**kw)

    def image_tokens(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """``(pooled [B, D] unit embedding, tokens [B, T, width])`` from one image-tower pass."""
        pooled, tokens, _ = self.image(images, train=train, return_tokens=True)
        return l2_normalize(self.image_proj(pooled)), tokens

    def __call__(self, images: jax.Array, texts: jax.Array, local_views: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        """``images [B, H, W, 3]`` float32, ``texts [B, L]`` int32 (pad 0), with ``multicrop``
        ``local_views [B, N, s, s, 3]`` float32 -> the two-tower outputs plus ``caption_loss`` /
        ``caption_tokens`` / ``caption_correct`` float32 [B] (and, with ``distill_dim``, the
        self-distillation outputs of the module docstring)."""
        if self.return_tokens:
            raise ValueError("model.name='coca' does not support model.return_tokens (FILIP); use two_tower")
        scale, bias = self.scale_and_bias()
        image, tokens = self.image_tokens(images, train=train)
        hidden = self.decoder(tokens, texts, train=train)
        w, b = self.decoder.output_projection()
        mask = (texts != 0).astype(jnp.float32)
        res = caption_loss(hidden, w, texts, mask, b, label_smoothing=self.caption_label_smoothing,
                           impl=self.caption_impl, vocab_block=self.caption_vocab_block,
                           token_block=self.caption_token_block)
        out = dict(
            image=image,
            text=self.encode_text(texts, train=train),
            scale=scale,
            bias=bias,
            caption_loss=jnp.sum(res.per_token * mask, axis=1),
            caption_tokens=jnp.sum(mask, axis=1),
            caption_correct=jnp.sum(res.correct * mask, axis=1),
        )
        if self.multicrop and local_views is None:
            raise ValueError("model.multicrop=True: the model expects inputs (image, text, image_local_views)")
        if self.distill_dim:
            out.update(self._student_distill(images, tokens.shape[1], local_views if self.multicrop else None, train))
        return out

    def _student_distill(self, images, num_patches, local_views, train) -> dict[str, jax.Array]:
        """The student side of self-distillation: local crops' head logits, masked-view patch
        logits and the mask (module docstring)."""
        out = {}
        if local_views is not None:
            if local_views.ndim != 5:
                raise ValueError(f"image_local_views must be [B, N, s, s, 3]; got shape {local_views.shape}")
            b, n = local_views.shape[:2]
            pooled = self.image(local_views.reshape((b * n,) + local_views.shape[2:]), train=train)
            out["distill_local"] = self.distill_head(pooled).reshape(b, n, self.distill_dim)
        # The mask is drawn from the dropout stream in training; eval/init use a fixed key so the
        # outputs stay a deterministic function of the inputs there.
        rng = self.make_rng("dropout") if train else jax.random.key(0)
        mask = random_patch_mask(rng, images.shape[0], num_patches, self.distill_mask_ratio)
        _, tokens, _ = self.image(images, train=train, return_tokens=True, patch_mask=mask)
        out["distill_patches"] = self.patch_head(tokens)
        out["distill_mask"] = mask.astype(jnp.float32)
        return out

    def distill_teacher(self, images: jax.Array, texts: jax.Array | None = None, local_views: jax.Array | None = None,
                        *, train: bool = False) -> dict[str, jax.Array]:
        """The EMA teacher's side of self-distillation (the model's inputs, only ``images`` read):
        one unmasked image-tower pass -> ``distill_patches`` float32 [B, T, K] and, with
        ``multicrop``, ``distill_global`` float32 [B, K] (the global view's head logits)."""
        del texts, local_views  # the teacher sees the global view only
        if not self.distill_dim:
            raise ValueError("CoCa.distill_teacher needs model.self_distill.dim > 0")
        pooled, tokens, _ = self.image(images, train=train, return_tokens=True)
        out = {"distill_patches": self.patch_head(tokens)}
        if self.multicrop:
            out["distill_global"] = self.distill_head(pooled)
        return out

    def caption(self, images: jax.Array, *, max_len: int, eos_id: int, beam_size: int = 1,
                alpha: float = 0.0) -> Any:
        """Captions ``images [B, H, W, 3]`` (float32, normalized): a
        :class:`contrastive_jax.models.decoding.Decoded` with ``tokens [B, max_len]`` int32 (pad 0
        after EOS) and ``scores [B]`` (log-probabilities, length-penalized with ``alpha``).
        Greedy for ``beam_size == 1``, else beam search. Call through ``model.apply(variables,
        images, method='caption', max_len=..., eos_id=...)`` under ``jit`` with those static."""
        from contrastive_jax.models import decoding

        _, tokens = self.image_tokens(images)
        decoder = self.decoder
        # Decoding re-applies the decoder on its own; hand it this module's decoder parameters.
        variables = {"params": decoder.variables["params"]}
        standalone = decoder.clone(parent=None)
        return decoding.generate(standalone, variables, tokens, max_len, eos_id=eos_id, beam_size=beam_size,
                                 alpha=alpha)
