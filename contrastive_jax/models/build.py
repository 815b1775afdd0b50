"""``build(config.model) -> nn.Module``: every model kind, tower and encoder in explicit registries.

Four registries, all looked up by exact name (never by substrings of a model name). The built-in
entries are written out in the literals below; nothing registers itself at import time. The
``register_*`` functions are for users' own kinds (they add to these dicts when called).

- :data:`MODELS` — ``model.name`` -> :class:`ModelKind` (``builder(model_config, dtype) ->
  nn.Module`` plus the names of the model's inputs). Every built model has ``modalities`` (the
  batch keys it consumes, in order) and the call/``encode`` contract of
  :mod:`contrastive_jax.models.towers`.
- :data:`IMAGE_TOWERS` / :data:`TEXT_TOWERS` — ``model.image.name`` / ``model.text.name`` ->
  ``builder(group_config, dtype)``, used by every kind with those groups.
- :data:`ENCODERS` — the encoder kinds of the N-tower model (``model.towers.<m>.encoder``) ->
  ``(builder(tower_config, dtype), defaults)``, ``defaults`` being the encoder's fields with
  their default values (used to fill and to validate a tower entry).

Built-in towers and models are built by :func:`~contrastive_jax.models.schema.build_module` from
their config group and the module's dataclass fields (schemas in :mod:`.config`), so a field is
named, typed and defaulted in one place: the module class.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from contrastive_jax.models import config as model_config_lib
from contrastive_jax.models.coca import CAPTION_IMPLS, CoCa
from contrastive_jax.models.config import (COCA, DECODER, GROUP_KEYS, HEAD_CHOICES, MLP, RESNET, SIGNAL, TEXT,
                                           TWO_TOWER, VIT)
from contrastive_jax.models.distill import Distill, teacher_config
from contrastive_jax.models.multiview import MultiView
from contrastive_jax.models.schema import build_module
from contrastive_jax.models.towers import NTower, TwoTower, make_head

TowerBuilder = Callable[[Any, Any], nn.Module]
ModelBuilder = Callable[[Any, Any], nn.Module]

# model.dtype names -> compute dtypes; 'auto' (None here) is resolved per backend by resolve_dtype.
DTYPES = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Backends on which 'auto' computes in bfloat16: their matrix units run bf16 at several times
# the float32 rate. CPUs do not (and XLA:CPU emulates bf16 matmuls), so they stay in float32.
_BF16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")

# Keys of a tower entry that are not encoder fields.
_TOWER_KEYS = ("encoder", "head", "head_hidden", "head_act", "head_bias", "input_shape", "input_dtype")


@functools.cache
def _schema_keys() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every ``config.model`` key, every ``config.model.image`` key) of the run schema."""
    d = model_config_lib.defaults()
    return tuple(d.keys()), tuple(d.image.keys())


def _model_keys() -> tuple[str, ...]:
    return _schema_keys()[0]


def _resnet_image_tower(cfg, dtype) -> nn.Module:
    # model.image holds the ViT's fields too; a ResNet reads only its own (depth, width).
    return RESNET.build(cfg, dtype, known=_schema_keys()[1])


IMAGE_TOWERS: dict[str, TowerBuilder] = {
    "vit": functools.partial(VIT.build, known=GROUP_KEYS),
    "resnet": _resnet_image_tower,
}
TEXT_TOWERS: dict[str, TowerBuilder] = {
    "transformer": functools.partial(TEXT.build, known=GROUP_KEYS),
}
ENCODERS: dict[str, tuple[TowerBuilder, dict]] = {
    "vit": (VIT.build, VIT.defaults()),
    "resnet": (RESNET.build, RESNET.defaults()),
    "transformer": (TEXT.build, TEXT.defaults()),
    "signal": (SIGNAL.build, SIGNAL.defaults()),
    "mlp": (MLP.build, MLP.defaults()),
}


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """An entry of :data:`MODELS`: how to build a model kind and what its inputs are.

    Calling it builds the model (``kind(model_config, dtype)``), as a bare builder would.

    Attributes:
      builder: ``builder(model_config, dtype) -> nn.Module``.
      modalities: the model's inputs in call order (the batch keys it consumes), or a function
        ``model_config -> names`` for kinds whose inputs the config decides (``n_tower``).
    """

    builder: ModelBuilder
    modalities: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ("image", "text")

    def __call__(self, model_config, dtype) -> nn.Module:
        return self.builder(model_config, dtype)

    def input_names(self, model_config) -> tuple[str, ...]:
        """The names of the inputs a model of this kind built from ``model_config`` takes."""
        names = self.modalities(model_config) if callable(self.modalities) else self.modalities
        return tuple(names)


def register_image_tower(name: str, builder: TowerBuilder) -> None:
    """Makes ``model.image.name = name`` build ``builder(config.model.image, dtype)``.

    The builder's own settings belong in ``model.image.extra`` (the other keys of ``model.image``
    are the built-in towers' fields; the run schema rejects any other key).
    """
    IMAGE_TOWERS[name] = builder


def register_text_tower(name: str, builder: TowerBuilder) -> None:
    """Makes ``model.text.name = name`` build ``builder(config.model.text, dtype)`` (settings in
    ``model.text.extra``, as for :func:`register_image_tower`)."""
    TEXT_TOWERS[name] = builder


def register_encoder(name: str, builder: TowerBuilder, defaults: dict) -> None:
    """Makes ``model.towers.<m>.encoder = name`` build ``builder(tower_config, dtype)``.

    ``defaults``: every field the encoder reads, with its default; the tower config handed to
    the builder is these defaults overlaid with the tower entry (unknown fields are an error).
    For a Flax module class ``M``, ``schema = ModuleSchema(M, required=...)`` gives both:
    ``register_encoder(name, schema.build, schema.defaults())``.
    """
    ENCODERS[name] = (builder, dict(defaults))


def encoder_defaults(kind: str) -> dict:
    """The fields (and defaults) of encoder ``kind`` for an N-tower entry."""
    return dict(_lookup(ENCODERS, kind, "encoder kind")[1])


def _lookup(registry: dict, name: str, field: str):
    if name not in registry:
        raise ValueError(f"unknown {field} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def resolve_dtype(name: str, platform: str | None = None, field: str = "model.dtype"):
    """The compute dtype named by ``model.dtype``: ``'float32'`` / ``'bfloat16'`` as named;
    ``'auto'``: bfloat16 on GPU/TPU, float32 on CPU (``platform``: default ``jax.default_backend()``).

    This is the mixed-precision policy: only activations and matmul inputs take this dtype;
    params (and so the optimizer state) stay float32 (see models/layers.py).
    """
    if name not in DTYPES:
        raise ValueError(f"unknown {field} {name!r}; known: {', '.join(DTYPES)}")
    if name != "auto":
        return DTYPES[name]
    platform = platform or jax.default_backend()
    return jnp.bfloat16 if platform in _BF16_BACKENDS else jnp.float32


def _dtype(model_config, field: str = "model.dtype"):
    return resolve_dtype(model_config.dtype, field=field)


def _with_prefix(prefix: str, builder, cfg, dtype):
    """Calls a tower builder; its ValueErrors name the config group (``model.image.pool=...``)."""
    try:
        return builder(cfg, dtype)
    except ValueError as e:
        if str(e).startswith("model."):
            raise
        raise ValueError(f"{prefix}.{e}") from None


def build_image_tower(model_config, dtype) -> nn.Module:
    """The image tower ``model.image.name`` built from ``model.image``: images ``[N, H, W, 3]``
    float -> features ``[N, width]`` in ``dtype``. For :func:`register_model` builders."""
    builder = _lookup(IMAGE_TOWERS, model_config.image.name, "model.image.name")
    return _with_prefix("model.image", builder, model_config.image, dtype)


def build_text_tower(model_config, dtype) -> nn.Module:
    """The text tower ``model.text.name`` built from ``model.text``: tokens ``[N, L]`` int32 ->
    features ``[N, width]`` in ``dtype``. For :func:`register_model` builders."""
    builder = _lookup(TEXT_TOWERS, model_config.text.name, "model.text.name")
    return _with_prefix("model.text", builder, model_config.text, dtype)


def build_two_tower(model_config, dtype) -> TwoTower:
    """``model.name = 'two_tower'``: the image and text towers with the model-level fields."""
    return TWO_TOWER.build(
        model_config, dtype, group="model", known=_model_keys(),
        image=build_image_tower(model_config, dtype), text=build_text_tower(model_config, dtype),
    )


def _caption_options(caption) -> dict:
    """``model.caption`` -> CoCa's ``caption_*`` fields (ValueError naming the field)."""
    eps, impl = caption.get("label_smoothing", 0.0), caption.get("impl", "chunked")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < 1.0:
        raise ValueError(f"model.caption.label_smoothing={eps!r} is invalid: must be in [0, 1)")
    if impl not in CAPTION_IMPLS:
        raise ValueError(f"model.caption.impl={impl!r}; known: {', '.join(CAPTION_IMPLS)}")
    blocks = {}
    for key in ("vocab_block", "token_block"):
        v = caption.get(key, 4096)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"model.caption.{key}={v!r} is invalid: must be a positive integer")
        blocks[key] = v
    unknown = sorted(set(caption.keys()) - {"label_smoothing", "impl", "vocab_block", "token_block"})
    if unknown:
        raise ValueError(f"unknown key model.caption.{unknown[0]}; known: impl, label_smoothing, token_block, vocab_block")
    return dict(caption_label_smoothing=float(eps), caption_impl=impl, caption_vocab_block=blocks["vocab_block"],
                caption_token_block=blocks["token_block"])


_SELF_DISTILL_KEYS = ("bottleneck", "dim", "hidden", "mask_ratio")


def _self_distill_options(model_config) -> dict:
    """``model.self_distill`` (+ ``model.multicrop``, ``model.image``) -> CoCa's ``distill_*``
    fields (ValueError naming the field)."""
    sd = model_config.get("self_distill", None) or {}
    unknown = sorted(set(sd.keys()) - set(_SELF_DISTILL_KEYS))
    if unknown:
        raise ValueError(f"unknown key model.self_distill.{unknown[0]}; known: {', '.join(_SELF_DISTILL_KEYS)}")
    out = {}
    for key, default, lo in (("dim", 0, 0), ("hidden", 2048, 1), ("bottleneck", 256, 1)):
        v = sd.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"model.self_distill.{key}={v!r} is invalid: must be an integer >= {lo}")
        out[f"distill_{key}"] = v
    ratio = sd.get("mask_ratio", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"model.self_distill.mask_ratio={ratio!r} is invalid: must be in (0, 1)")
    out["distill_mask_ratio"] = float(ratio)
    multicrop = bool(model_config.get("multicrop", False))
    if multicrop and not out["distill_dim"]:
        raise ValueError("model.multicrop=True is invalid for model.name='coca' without model.self_distill.dim > 0: "
                         "the local crops feed only the self-distillation heads")
    if out["distill_dim"]:
        image = model_config.image
        if image.name != "vit":
            raise ValueError(f"model.self_distill.dim > 0 needs model.image.name='vit' (masked patches); got "
                             f"{image.name!r}")
        if float(image.get("patch_dropout", 0.0)) > 0.0:
            raise ValueError("model.image.patch_dropout must be 0 with model.self_distill.dim > 0: masked prediction "
                             "needs every patch token")
        if multicrop and image.get("posemb", "learn") == "learn":
            # A learned position table fits one patch grid; the smaller local crops have another.
            raise ValueError("model.image.posemb='learn' is invalid with model.multicrop=True: the local crops' "
                             "patch grid differs from the global view's; use model.image.posemb='sincos2d'")
    return out


def build_coca(model_config, dtype) -> CoCa:
    """``model.name = 'coca'``: the two towers, the captioning decoder ``model.decoder`` on the
    image tokens, its loss options ``model.caption`` and the optional self-distillation heads
    ``model.self_distill`` (+ ``model.multicrop``) (see :mod:`contrastive_jax.models.coca`)."""
    decoder = DECODER.build(model_config.decoder, dtype, group="model.decoder")
    return COCA.build(
        model_config, dtype, group="model", known=_model_keys(),
        image=build_image_tower(model_config, dtype), text=build_text_tower(model_config, dtype),
        decoder=decoder, **_caption_options(model_config.get("caption", {})), **_self_distill_options(model_config),
    )


def _coca_inputs(model_config) -> tuple[str, ...]:
    return ("image", "text", "image_local_views") if model_config.get("multicrop", False) else ("image", "text")


def tower_order(model_config) -> tuple[str, ...]:
    """The N-tower model's modality names in input order (``model.modalities`` or sorted)."""
    towers = model_config.get("towers", None)
    names = tuple(towers.keys()) if towers is not None else ()
    if not names:
        raise ValueError("model.name='n_tower' needs at least one entry in model.towers")
    order = tuple(model_config.get("modalities", ()) or sorted(names))
    if sorted(order) != sorted(names):
        raise ValueError(f"model.modalities {order} must list exactly the towers {sorted(names)}")
    return order


def tower_config(model_config, name: str) -> ml_collections.ConfigDict:
    """Tower ``name``'s encoder config: its encoder's defaults overlaid with the entry."""
    entry = model_config.towers[name]
    if "encoder" not in entry:
        raise ValueError(f"model.towers.{name} needs an 'encoder' (known: {', '.join(sorted(ENCODERS))})")
    _, fields = _lookup(ENCODERS, entry["encoder"], f"model.towers.{name}.encoder")
    cfg = dict(fields)
    for key, value in entry.items():
        if key in _TOWER_KEYS:
            continue
        if key not in fields:
            raise ValueError(
                f"unknown field model.towers.{name}.{key} for encoder {entry['encoder']!r}; "
                f"known: {', '.join(sorted(fields) + list(_TOWER_KEYS))}"
            )
        cfg[key] = value
    return ml_collections.ConfigDict(cfg)


def build_n_tower(model_config, dtype) -> NTower:
    """``model.name = 'n_tower'``: one encoder + head per ``model.towers`` entry."""
    towers = []
    for name in tower_order(model_config):
        entry = model_config.towers[name]
        cfg = tower_config(model_config, name)  # validates the entry first
        encoder = _with_prefix(f"model.towers.{name}", ENCODERS[entry["encoder"]][0], cfg, dtype)
        head = make_head(
            entry.get("head", model_config.head), model_config.embed_dim, dtype=dtype,
            hidden=int(entry.get("head_hidden", model_config.head_hidden)),
            act=entry.get("head_act", model_config.head_act),
            use_bias=bool(entry.get("head_bias", model_config.head_bias)),
        )
        towers.append((name, encoder, head))
    return build_module(NTower, model_config, group="model", known=_model_keys(), towers=tuple(towers))


def build_distill(model_config, dtype) -> Distill:
    """``model.name = 'distill'``: a two-tower student (``config.model``) and a teacher of any
    kind (``model.teacher`` merged onto the defaults), see :mod:`contrastive_jax.models.distill`."""
    student = build_two_tower(model_config, dtype)
    tcfg = teacher_config(model_config)
    kind = _lookup(MODELS, tcfg.name, "model.teacher.name")
    return Distill(student=student, teacher=kind(tcfg, _dtype(tcfg, "model.teacher.dtype")))


def _build_multiview(model_config, dtype, with_text: bool) -> MultiView:
    if bool(model_config.get("multicrop", False)) and model_config.image.name == "vit" \
            and model_config.image.get("posemb", "learn") == "learn":
        # A learned position table fits one patch grid; the smaller local crops have another.
        raise ValueError("model.image.posemb='learn' is invalid with model.multicrop=True: the local crops' patch "
                         "grid differs from the global crops'; use model.image.posemb='sincos2d' or "
                         "model.image.name='resnet'")
    return build_module(
        MultiView, model_config, group="model", known=_model_keys(), choices=HEAD_CHOICES,
        image=build_image_tower(model_config, dtype),
        text=build_text_tower(model_config, dtype) if with_text else None,
        # The views' MLP head takes the model-level hidden width.
        view_hidden=int(model_config.head_hidden), dtype=dtype,
    )


def build_multiview(model_config, dtype) -> MultiView:
    """``model.name = 'multiview'``: SimCLR's image-only model (``model.image`` group)."""
    return _build_multiview(model_config, dtype, with_text=False)


def build_slip(model_config, dtype) -> MultiView:
    """``model.name = 'slip'``: CLIP towers (``model.image``, ``model.text``) plus a view head."""
    return _build_multiview(model_config, dtype, with_text=True)


# Every built-in model kind, with the inputs its models take (see sample_inputs).
MODELS: dict[str, ModelKind] = {
    "two_tower": ModelKind(build_two_tower, ("image", "text")),
    "coca": ModelKind(build_coca, _coca_inputs),
    "n_tower": ModelKind(build_n_tower, tower_order),
    "distill": ModelKind(build_distill, ("image", "text")),  # the student's inputs
    "multiview": ModelKind(build_multiview, lambda cfg: ("image_views", "image_local_views")
                           if cfg.get("multicrop", False) else ("image_views",)),
    "slip": ModelKind(build_slip, ("image_views", "text")),
}


def register_model(name: str, builder: ModelBuilder,
                   modalities: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ("image", "text")) -> None:
    """Makes ``model.name = name`` build ``builder(config.model, dtype)``.

    The module it returns must follow the model contract (``modalities`` attribute, ``__call__(
    *inputs, train)`` -> dict of ``[B, D]`` embeddings + ``scale``/``bias``, ``encode(name, x,
    train=False)``; see :mod:`contrastive_jax.models.towers`). ``modalities``: its inputs in call
    order (or a function of the model config), which :func:`sample_inputs` gives shapes to.
    ``builder`` may also be a :class:`ModelKind`.
    """
    MODELS[name] = builder if isinstance(builder, ModelKind) else ModelKind(builder, modalities)


def build(model_config) -> nn.Module:
    """Builds the (unbound) model described by ``config.model``.

    Raises:
      ValueError: an unknown model/tower/encoder name, field or dtype (the message names the
        field and lists the known values), or an unresolved text ``vocab_size``.
    """
    kind = _lookup(MODELS, model_config.name, "model.name")
    return kind(model_config, _dtype(model_config))


def sample_inputs(model_config, data_config=None, batch: int = 1,
                  modalities: tuple[str, ...] | None = None) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract inputs (``ShapeDtypeStruct``, batch ``batch``) in the model's input order.

    ``modalities``: the input names (default: those of the model kind, :attr:`ModelKind.modalities`
    — ``('image', 'text')`` for two_tower and distill, ``('image_views',)`` for multiview,
    ``('image_views', 'text')`` for slip, the tower order for n_tower). A name of a
    ``model.towers`` entry takes that entry's ``input_shape`` / ``input_dtype`` (default
    float32); the others come from ``data_config``: ``image`` ``[b, S, S, 3]`` float32,
    ``image_views`` ``[b, V, S, S, 3]`` float32, ``image_local_views`` ``[b, N, s, s, 3]`` float32
    (``N = data.local_views``, ``s = data.local_view_size``; multicrop), ``text`` ``[b, L]`` int32, with ``S =
    data.image_size`` (pixels), ``V = data.num_views``, ``L = model.text.context_length`` or
    ``data.max_text_len`` (tokens).

    Raises:
      ValueError: an unknown model kind, a tower without ``input_shape``, a data modality
        without ``data_config``, or a name of unknown shape.
    """
    if modalities is None:
        kind = _lookup(MODELS, model_config.name, "model.name")
        # A builder stored into MODELS directly (not through register_model) is image-text.
        modalities = kind.input_names(model_config) if isinstance(kind, ModelKind) else ("image", "text")
    towers = model_config.get("towers", None) or {}
    out = []
    for m in modalities:
        if m in towers:
            entry = towers[m]
            if "input_shape" not in entry:
                raise ValueError(f"model.towers.{m}.input_shape is needed to build sample inputs")
            out.append(jax.ShapeDtypeStruct((batch,) + tuple(entry["input_shape"]),
                                            jnp.dtype(entry.get("input_dtype", "float32"))))
        else:
            out.append(_data_input(model_config, data_config, batch, m))
    return tuple(out)


def _data_input(model_config, data_config, batch: int, modality: str) -> jax.ShapeDtypeStruct:
    """The shape of a batch key the data pipeline produces (``image``, ``image_views``, ``text``)."""
    name = model_config.name
    if data_config is None:
        raise ValueError(f"sample_inputs of a {name!r} model needs config.data (image_size, max_text_len)")
    size = int(data_config.image_size)
    if modality == "image":
        return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    if modality == "image_views":
        views = int(data_config.get("num_views", 2))
        return jax.ShapeDtypeStruct((batch, max(views, 1), size, size, 3), jnp.float32)
    if modality == "image_local_views":
        n, local = int(data_config.get("local_views", 0)), int(data_config.get("local_view_size", 0))
        if n < 1:
            raise ValueError(f"config.data.local_views={n} is invalid: model.multicrop=True needs >= 1 local crop")
        return jax.ShapeDtypeStruct((batch, n, local, local, 3), jnp.float32)
    if modality == "text":
        text_cfg = model_config.get("text", None)
        ctx = int(text_cfg.get("context_length", 0) or 0) if text_cfg is not None else 0
        return jax.ShapeDtypeStruct((batch, ctx or int(data_config.max_text_len)), jnp.int32)
    raise ValueError(f"sample_inputs does not know the input shape of modality {modality!r} "
                     f"(model.name {name!r})")
