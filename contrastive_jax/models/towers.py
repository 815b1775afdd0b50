"""Tower models: :class:`TwoTower` (CLIP/SigLIP image + text) and :class:`NTower` (one encoder per
named modality, e.g. three for Symile), with linear or MLP projection heads and the learnable
scale/bias of the contrastive loss.

Contract shared by both (the train step and evaluation rely on it):

- ``model.modalities``: the batch keys the model consumes, in order.
- ``model.apply(vars, *inputs, train=...)`` takes the inputs positionally in that order and
  returns ``{name: [B, D] float32 L2-normalized for each modality, 'scale': [] float32 (exp of
  the clamped log-scale), 'bias': [] float32}``.
- ``TwoTower(return_tokens=True)`` (``config.model.return_tokens``, for FILIP's token-wise loss)
  adds ``image_tokens [B, Li, D]`` / ``text_tokens [B, Lt, D]`` (float32, each token projected by
  its tower's head and L2-normalized) and ``image_token_mask [B, Li]`` / ``text_token_mask [B, Lt]``
  (float32 1/0, 1 for real tokens; float so that the outputs dict stays differentiable for
  GradCache). Default False: outputs, params and memory as without the flag.
- ``model.apply(vars, name, x, method='encode')`` embeds one modality (``[B, D]`` float32,
  unit norm). Randomness at train time (patch dropout) comes from the rng stream ``'dropout'``.

Param tree (top level)::

    <name>/       the encoder of modality <name> (TwoTower: image/, text/)
    <name>_proj/  its head: linear kernel [width, D] ('embed', 'joint') (+ bias with head_bias),
                  or MLP fc1 [width, hidden] / fc2 [hidden, D]
    log_scale     []  float32, init scale_init
    bias          []  float32, init bias_init
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import DenseGeneral, Dtype, activation, l2_normalize

HEAD_TYPES = ("linear", "mlp")
# A tower's own head (TwoTower.image_head / text_head) may also be the identity.
TOWER_HEAD_TYPES = HEAD_TYPES + ("none",)


class Identity(nn.Module):
    """The ``'none'`` head: ``[B, W] -> [B, W]`` unchanged, no params (SigLIP's image tower, whose
    attention-pooling head already ends at the joint width). ``W`` must equal ``embed_dim``."""

    embed_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"head 'none' needs the tower's width {x.shape[-1]} to equal embed_dim {self.embed_dim}")
        return x


class MlpHead(nn.Module):
    """Two-layer projection head ``fc2(act(fc1(x)))`` (SimCLR, Chen et al. 2020): ``[B, W]`` ->
    ``[B, embed_dim]``. ``hidden=0`` uses the input width."""

    embed_dim: int
    hidden: int = 0
    act: str = "gelu"
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.hidden or x.shape[-1]
        h = DenseGeneral((hidden,), ("embed", "mlp"), ("mlp",) if self.use_bias else None, dtype=self.dtype, name="fc1")(x)
        h = activation(self.act)(h)
        return DenseGeneral((self.embed_dim,), ("mlp", "joint"), ("joint",) if self.use_bias else None,
                            dtype=self.dtype, name="fc2")(h)


def make_head(kind: str, embed_dim: int, *, hidden: int = 0, act: str = "gelu", use_bias: bool = False,
              dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Module:
    """A projection head module: ``'linear'`` (CLIP), ``'mlp'`` (SimCLR-style) or ``'none'``."""
    if kind == "none":
        return Identity(embed_dim, name=name)
    if kind == "linear":
        return DenseGeneral((embed_dim,), ("embed", "joint"), ("joint",) if use_bias else None, dtype=dtype, name=name)
    if kind == "mlp":
        return MlpHead(embed_dim, hidden, act, use_bias, dtype=dtype, name=name)
    raise ValueError(f"unknown head {kind!r}; known: {', '.join(HEAD_TYPES)}")


class _ScaleBias(nn.Module):
    """Mixin: the learnable log-scale and bias scalars and their clamped read-out."""

    def _scale_bias_params(self):
        log_scale = self.param(
            "log_scale", nn.with_logical_partitioning(nn.initializers.constant(self.scale_init), ()),
            (), jnp.float32,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.constant(self.bias_init), ()),
            (), jnp.float32,
        )
        return log_scale, bias

    def scale_and_bias(self) -> tuple[jax.Array, jax.Array]:
        """Returns ``(scale, bias)``, scalars float32; scale clamped at ``max_scale``.

        The clamp is on log_scale, so its gradient is zero above the cap (as CLIP's in-place clamp
        stops the parameter from growing).
        """
        scale = jnp.exp(jnp.minimum(self.log_scale, math.log(self.max_scale)))
        return scale, self.logit_bias


class TwoTower(_ScaleBias):
    """CLIP-style two-tower model; ``modalities = ('image', 'text')``.

    The fields other than the towers and ``dtype`` are the model-level fields of ``config.model``
    (``models/config.py``); their defaults here are the run's defaults.

    Attributes:
      image: image tower module, ``[B, H, W, 3] -> [B, image_width]``.
      text: text tower module, ``[B, L] int32 -> [B, text_width]``.
      embed_dim: shared embedding dimension ``D``.
      scale_init: initial ``log_scale``, the log of the logit scale (CLIP: log(1/0.07); SigLIP:
        log(10)).
      bias_init: initial ``bias`` added to the logits (CLIP: 0, unused by its loss; SigLIP: -10).
      max_scale: the output scale is ``exp(min(log_scale, log(max_scale)))`` (CLIP clamps at 100).
      head: projection heads ``'linear'`` (CLIP) | ``'mlp'`` (two layers, SimCLR-style), see
        :func:`make_head`. head_hidden: the MLP head's hidden width (0: the tower's width).
        head_act: its activation. head_bias: whether head layers have biases (CLIP: none).
      image_head / text_head: that tower's head kind when it differs from ``head`` (``''``: ``head``);
        SigLIP: ``image_head='none'`` (its MAP head ends at the joint width), a linear text head.
      return_tokens: also return the per-token embeddings and masks (see the module docstring):
        each token goes through the same head as the pooled feature and is L2-normalized, as in
        FILIP (Yao et al. 2022). Needs towers whose ``__call__`` takes ``return_tokens`` (ViT,
        the transformer text tower). No parameter depends on it.
      dtype: compute dtype of the heads (the towers carry their own); from ``model.dtype``.
    """

    image: nn.Module
    text: nn.Module
    embed_dim: int
    scale_init: float = math.log(1 / 0.07)
    bias_init: float = 0.0
    max_scale: float = 100.0
    head: str = "linear"
    head_hidden: int = 0
    head_act: str = "gelu"
    head_bias: bool = False
    image_head: str = ""
    text_head: str = ""
    return_tokens: bool = False
    dtype: Dtype = jnp.float32

    modalities = ("image", "text")

    def setup(self):
        kw = dict(hidden=self.head_hidden, act=self.head_act, use_bias=self.head_bias, dtype=self.dtype)
        self.image_proj = make_head(self.image_head or self.head, self.embed_dim, **kw)
        self.text_proj = make_head(self.text_head or self.head, self.embed_dim, **kw)
        self.log_scale, self.logit_bias = self._scale_bias_params()

    def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """images ``[B, H, W, 3]`` float32 -> ``[B, D]`` float32, unit L2 norm."""
        return l2_normalize(self.image_proj(self.image(images, train=train)))

    def encode_text(self, texts: jax.Array, *, train: bool = False) -> jax.Array:
        """texts ``[B, L]`` int32 (0 = pad, last non-pad = EOS) -> ``[B, D]`` float32, unit norm."""
        return l2_normalize(self.text_proj(self.text(texts, train=train)))

    def encode(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
        """Embeds modality ``name`` ('image' | 'text'): ``[B, D]`` float32, unit norm."""
        if name == "image":
            return self.encode_image(x, train=train)
        if name == "text":
            return self.encode_text(x, train=train)
        raise ValueError(f"TwoTower has modalities {self.modalities}, not {name!r}")

    def _with_tokens(self, images: jax.Array, texts: jax.Array, train: bool) -> dict[str, jax.Array]:
        """Pooled and per-token embeddings from one pass of each tower."""
        out = {}
        for name, tower, head, x in (("image", self.image, self.image_proj, images),
                                     ("text", self.text, self.text_proj, texts)):
            if "return_tokens" not in inspect.signature(type(tower).__call__).parameters:
                raise ValueError(f"model.return_tokens=True needs a {name} tower that returns token features "
                                 f"(vit / transformer); {type(tower).__name__} does not")
            pooled, tokens, mask = tower(x, train=train, return_tokens=True)
            out[name] = l2_normalize(head(pooled))
            out[f"{name}_tokens"] = l2_normalize(head(tokens))
            out[f"{name}_token_mask"] = mask.astype(jnp.float32)
        return out

    def __call__(self, images: jax.Array, texts: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """Returns ``dict(image=[B, D] f32, text=[B, D] f32, scale=[] f32, bias=[] f32)`` (plus
        the token outputs with ``return_tokens``, see the module docstring)."""
        scale, bias = self.scale_and_bias()
        if self.return_tokens:
            return dict(self._with_tokens(images, texts, train), scale=scale, bias=bias)
        return dict(
            image=self.encode_image(images, train=train),
            text=self.encode_text(texts, train=train),
            scale=scale,
            bias=bias,
        )


class NTower(_ScaleBias):
    """One encoder + head per named modality; ``modalities`` in the order of ``towers``.

    Attributes:
      towers: ``((name, encoder_module, head_module), ...)``; the encoder maps that modality's
        input ``[B, ...]`` to ``[B, width]``, the head ``[B, width]`` to ``[B, D]``. Built from
        config by ``models.build`` (``model.name = 'n_tower'``, see ``models/build.py``).
      scale_init / bias_init / max_scale: as :class:`TwoTower`.
    """

    towers: tuple
    scale_init: float = math.log(1 / 0.07)
    bias_init: float = 0.0
    max_scale: float = 100.0

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.towers)

    def setup(self):
        names = self.modalities
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"NTower needs distinct, non-empty modality names, got {names}")
        # clone(parent=self, name=...) keeps the param subtree named after the modality
        # (assigning a dict of modules would prefix the attribute name).
        self._encoders = {n: enc.clone(parent=self, name=n) for n, enc, _ in self.towers}
        self._heads = {n: head.clone(parent=self, name=f"{n}_proj") for n, _, head in self.towers}
        self.log_scale, self.logit_bias = self._scale_bias_params()

    def encode(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
        """Embeds modality ``name``: its input ``[B, ...]`` -> ``[B, D]`` float32, unit norm."""
        if name not in self._encoders:
            raise ValueError(f"model has modalities {self.modalities}, not {name!r}")
        return l2_normalize(self._heads[name](self._encoders[name](x, train=train)))

    def __call__(self, *inputs: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """``inputs`` in ``modalities`` order -> ``{name: [B, D] f32, 'scale': [], 'bias': []}``."""
        if len(inputs) != len(self.towers):
            raise ValueError(f"model expects {len(self.towers)} inputs {self.modalities}, got {len(inputs)}")
        out = {name: self.encode(name, x, train=train) for name, x in zip(self.modalities, inputs)}
        out["scale"], out["bias"] = self.scale_and_bias()
        return out


def logical_param_axes(model: nn.Module, *sample_inputs: Any, method: str | Callable | None = None) -> Any:
    """Logical axis names of every parameter, without allocating any.

    Args:
      model: e.g. ``build(config.model)``.
      sample_inputs: arrays or ``jax.ShapeDtypeStruct`` of the call's inputs, e.g.
        ``(images [B, H, W, 3] float32, texts [B, L] int32)``.
      method: optional method to init through (e.g. ``'encode_image'``).

    Returns:
      The ``params`` tree with a ``jax.sharding.PartitionSpec`` of logical names per leaf (e.g.
      ``PartitionSpec('embed', 'mlp')``); map them to mesh axes with
      :func:`contrastive_jax.parallel.param_shardings`.
    """
    kwargs = {} if method is None else {"method": method}
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *sample_inputs, **kwargs))
    return nn.get_partition_spec(abstract["params"])
