"""Multi-view image models for SimCLR (image only) and SLIP (image-text plus image views).

``model.name = 'multiview'`` (SimCLR, Chen et al. 2020): one image encoder and an MLP head embed
every augmented view; ``modalities = ('image_views',)`` (the batch's ``image_views`` ``[B, V, H,
W, 3]``, from ``config.data.num_views >= 2``). Outputs ``image_views`` ``[B, V, D]`` and
``image`` (view 0) ``[B, D]``, float32 unit vectors, plus ``scale`` / ``bias``.

``model.name = 'slip'`` (SLIP, Mu et al. 2022, "SLIP: Self-supervision meets Language-Image
Pre-training"): the two-tower CLIP model plus a separate MLP head on the same image encoder for
the views; ``modalities = ('image_views', 'text')``; the CLIP image embedding is view 0 through
the CLIP head. Outputs ``image``, ``text`` ``[B, D]`` and ``image_views`` ``[B, V, D]``.

SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments") adds to ``'multiview'``: ``model.prototypes = K`` learnable prototypes ``[K, D]``
(param ``prototypes``), L2-normalized in every forward pass (the paper renormalizes them after
each update; normalizing in the forward gives the same scores and keeps them unit norm for any
optimizer), and the outputs ``image_views_scores`` ``[B, V, K]`` (cosine of each view's
embedding with each prototype); ``model.multicrop = True`` adds a second input, the batch's
``image_local_views`` ``[B, N, h, w, 3]`` (``config.data.local_views``), embedded by the same
encoder and head into ``image_local_views`` ``[B, N, D]`` and ``image_local_views_scores``
``[B, N, K]``. The local crops are smaller than the global ones: a ResNet pools globally and
takes any size; a ViT needs ``model.image.posemb = 'sincos2d'`` (its fixed 2-D sin-cos positions
are computed for the actual patch grid) -- a learned position table has one size, and the build
rejects ``posemb='learn'`` with multi-crop (``models.build``). The scores are per-example rows
(not the ``[K, D]`` matrix) so that GradCache micro-batching splits them like the embeddings.

Both follow the model contract of :mod:`contrastive_jax.models.towers` (``encode(name, x)``:
``'image'`` embeds plain images ``[B, H, W, 3]`` through the head used for evaluation). Both are
built from config by ``models.build`` (``build_multiview`` / ``build_slip`` in
:mod:`contrastive_jax.models.build`).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import l2_normalize
from contrastive_jax.models.towers import MlpHead, _ScaleBias, make_head


class MultiView(_ScaleBias):
    """Image encoder (+ optional text encoder) with a view head; see the module docstring.

    Attributes:
      image: image encoder ``[N, H, W, 3] -> [N, width]``. text: text encoder or None (SimCLR).
      embed_dim: ``D``. view_hidden: hidden width of the views' MLP head (0: the encoder width).
      head / head_hidden / head_act / head_bias: the CLIP heads (SLIP only).
      prototypes: ``K`` SwAV prototypes (0: none); float32 param ``prototypes`` ``[K, D]``.
      multicrop: the model also takes ``image_local_views`` ``[B, N, h, w, 3]`` (SimCLR/SwAV
        multi-crop; not with a text tower).
    """

    image: nn.Module
    text: Any = None
    embed_dim: int = 128
    view_hidden: int = 0
    scale_init: float = math.log(10.0)
    bias_init: float = 0.0
    max_scale: float = 100.0
    head: str = "linear"
    head_hidden: int = 0
    head_act: str = "gelu"
    head_bias: bool = False
    prototypes: int = 0
    multicrop: bool = False
    dtype: Any = jnp.float32

    @property
    def modalities(self) -> tuple[str, ...]:
        if self.text is not None:
            return ("image_views", "text")
        return ("image_views", "image_local_views") if self.multicrop else ("image_views",)

    def setup(self):
        self.view_proj = MlpHead(self.embed_dim, self.view_hidden, "relu", True, dtype=self.dtype)
        if self.text is not None:
            kw = dict(hidden=self.head_hidden, act=self.head_act, use_bias=self.head_bias, dtype=self.dtype)
            self.image_proj = make_head(self.head, self.embed_dim, **kw)
            self.text_proj = make_head(self.head, self.embed_dim, **kw)
        self.log_scale, self.logit_bias = self._scale_bias_params()
        if self.prototypes < 0:
            raise ValueError(f"model.prototypes={self.prototypes} is invalid: must be >= 0 (0 = none)")
        if self.multicrop and self.text is not None:
            raise ValueError("model.multicrop=True is invalid for model.name='slip': multi-crop views are for the "
                             "image-only 'multiview' model")
        if self.prototypes:
            # Unit rows like SwAV's init-then-normalize; only the direction matters in the forward.
            self.prototype_matrix = self.param(
                "prototypes", lambda key, shape: l2_normalize(jax.random.normal(key, shape, jnp.float32)),
                (self.prototypes, self.embed_dim))

    def _views(self, views, train, name="image_views"):
        if views.ndim != 5:
            raise ValueError(f"{name} must be [B, V, H, W, C]; got shape {views.shape}")
        b, v = views.shape[:2]
        feats = self.image(views.reshape((b * v,) + views.shape[2:]), train=train)
        return feats.reshape((b, v) + feats.shape[1:])

    def encode(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
        """``'image'``: ``[B, H, W, 3]`` -> ``[B, D]`` (CLIP head for SLIP, view head for SimCLR);
        ``'text'`` (SLIP): ``[B, L]`` -> ``[B, D]``. float32, unit norm."""
        if name == "image":
            f = self.image(x, train=train)
            return l2_normalize(self.view_proj(f) if self.text is None else self.image_proj(f))
        if name == "text" and self.text is not None:
            return l2_normalize(self.text_proj(self.text(x, train=train)))
        raise ValueError(f"model has modalities {self.modalities} (encode: 'image'{', text' if self.text else ''}), "
                         f"not {name!r}")

    def prototype_scores(self, z: jax.Array) -> jax.Array:
        """Unit embeddings ``[..., D]`` -> float32 cosines ``[..., K]`` with the unit prototypes."""
        protos = l2_normalize(self.prototype_matrix.astype(jnp.float32))
        return jnp.einsum("...d,kd->...k", z.astype(jnp.float32), protos)

    def __call__(self, views: jax.Array, second: jax.Array | None = None, *, train: bool = False) -> dict:
        """``views`` ``[B, V, H, W, 3]``; ``second``: ``text`` ``[B, L]`` (slip) or
        ``image_local_views`` ``[B, N, h, w, 3]`` (multicrop). Outputs in the module docstring."""
        feats = self._views(views, train)
        out = {"image_views": l2_normalize(self.view_proj(feats))}
        if self.text is None:
            out["image"] = out["image_views"][:, 0]
            if self.multicrop:
                if second is None:
                    raise ValueError("model.multicrop=True: the model expects inputs (image_views, image_local_views)")
                local = self._views(second, train, "image_local_views")
                out["image_local_views"] = l2_normalize(self.view_proj(local))
        else:
            text = second
            if text is None:
                raise ValueError("the slip model expects inputs (image_views, text)")
            out["image"] = l2_normalize(self.image_proj(feats[:, 0]))
            out["text"] = l2_normalize(self.text_proj(self.text(text, train=train)))
        if self.prototypes:
            out["image_views_scores"] = self.prototype_scores(out["image_views"])
            if "image_local_views" in out:
                out["image_local_views_scores"] = self.prototype_scores(out["image_local_views"])
        out["scale"], out["bias"] = self.scale_and_bias()
        return out
