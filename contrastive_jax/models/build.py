"""``build(config.model) -> nn.Module``: models and encoders through explicit name registries.

Three registries, all looked up by exact name (never by substrings of a model name):

- :data:`MODELS` — ``model.name`` -> ``builder(model_config, dtype) -> nn.Module``; add kinds
  (e.g. an image-only SimCLR model) with :func:`register_model`. Every built model has
  ``modalities`` (the batch keys it consumes, in order) and the call/``encode`` contract of
  :mod:`contrastive_jax.models.towers`.
- :data:`IMAGE_TOWERS` / :data:`TEXT_TOWERS` — ``model.image.name`` / ``model.text.name`` of
  the two-tower model -> ``builder(tower_config, dtype)``.
- :data:`ENCODERS` — the encoder kinds of the N-tower model (``model.towers.<m>.encoder``) ->
  ``(builder(tower_config, dtype), defaults)``, ``defaults`` being the encoder's fields with
  their default values (used to fill and to validate a tower entry).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from contrastive_jax.models import config as model_config_lib
from contrastive_jax.models.generic import MlpEncoder, SignalTransformer
from contrastive_jax.models.resnet import ResNet
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.towers import NTower, TwoTower, make_head
from contrastive_jax.models.vit import VisionTransformer

TowerBuilder = Callable[[Any, Any], nn.Module]
ModelBuilder = Callable[[Any, Any], nn.Module]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Keys of a tower entry that are not encoder fields.
_TOWER_KEYS = ("encoder", "head", "head_hidden", "head_act", "head_bias", "input_shape", "input_dtype")


def _choice(cfg, key: str, allowed, default):
    value = cfg.get(key, default)
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; known: {', '.join(map(str, allowed))}")
    return value


def _check_common(cfg, pools, default_pool) -> None:
    """Build-time checks of the enumerated fields, so a typo fails before anything compiles."""
    from contrastive_jax.models.layers import ACTIVATIONS, REMAT_POLICIES

    _choice(cfg, "pool", pools, default_pool)
    _choice(cfg, "act", tuple(ACTIVATIONS), "gelu")
    _choice(cfg, "remat", REMAT_POLICIES, "none")


def _build_vit(cfg, dtype) -> nn.Module:
    from contrastive_jax.models import vit as vit_lib

    _check_common(cfg, vit_lib.POOL_TYPES, "gap")
    _choice(cfg, "posemb", vit_lib.POSEMB_TYPES, "learn")
    _choice(cfg, "stem", vit_lib.STEM_TYPES, "patch")
    return VisionTransformer(
        patch_size=cfg.patch_size,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        pool=cfg.get("pool", "gap"),
        posemb=cfg.get("posemb", "learn"),
        stem=cfg.get("stem", "patch"),
        act=cfg.get("act", "gelu"),
        patch_bias=bool(cfg.get("patch_bias", True)),
        norm_pre=bool(cfg.get("norm_pre", False)),
        cls_posemb=bool(cfg.get("cls_posemb", False)),
        patch_dropout=float(cfg.get("patch_dropout", 0.0)),
        remat=cfg.get("remat", "none"),
        scan=bool(cfg.get("scan", False)),
        norm_eps=float(cfg.get("norm_eps", 1e-6)),
        dtype=dtype,
    )


def _build_resnet(cfg, dtype) -> nn.Module:
    return ResNet(depth=int(cfg.get("depth", 50)), width=int(cfg.get("width", 64)), dtype=dtype)


def _build_text_transformer(cfg, dtype) -> nn.Module:
    if cfg.vocab_size is None or cfg.vocab_size <= 0:
        raise ValueError(
            f"model.text.vocab_size is {cfg.vocab_size}; set it (or resolve -1 from the tokenizer's "
            "vocabulary size) before building the model"
        )
    from contrastive_jax.models import text as text_lib

    _check_common(cfg, text_lib.POOL_TYPES, "eos")
    return TextTransformer(
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        causal=cfg.get("causal", True),
        context_length=cfg.get("context_length", 0) or None,
        pool=cfg.get("pool", "eos"),
        act=cfg.get("act", "gelu"),
        remat=cfg.get("remat", "none"),
        scan=bool(cfg.get("scan", False)),
        eos_id=int(cfg.get("eos_id", -1)),
        norm_eps=float(cfg.get("norm_eps", 1e-6)),
        dtype=dtype,
    )


def _build_signal(cfg, dtype) -> nn.Module:
    from contrastive_jax.models import generic

    _check_common(cfg, generic.POOL_TYPES, "gap")
    return SignalTransformer(
        patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim, pool=cfg.pool, act=cfg.act, remat=cfg.remat, scan=bool(cfg.scan), dtype=dtype,
    )


def _build_mlp(cfg, dtype) -> nn.Module:
    return MlpEncoder(width=cfg.width, depth=cfg.depth, mlp_dim=cfg.mlp_dim, act=cfg.act, dtype=dtype)


def _group_defaults(group: str, drop=("name", "extra")) -> dict:
    d = model_config_lib.defaults()[group].to_dict()
    return {k: v for k, v in d.items() if k not in drop}


IMAGE_TOWERS: dict[str, TowerBuilder] = {"vit": _build_vit, "resnet": _build_resnet}
TEXT_TOWERS: dict[str, TowerBuilder] = {"transformer": _build_text_transformer}
ENCODERS: dict[str, tuple[TowerBuilder, dict]] = {
    "vit": (_build_vit, _group_defaults("image")),
    "resnet": (_build_resnet, dict(depth=50, width=64)),
    "transformer": (_build_text_transformer, _group_defaults("text")),
    "signal": (_build_signal, dict(patch_size=16, width=128, depth=2, num_heads=4, mlp_dim=512, pool="gap",
                                   act="gelu", remat="none", scan=False)),
    "mlp": (_build_mlp, dict(width=128, depth=2, mlp_dim=0, act="gelu")),
}


def register_image_tower(name: str, builder: TowerBuilder) -> None:
    """Makes ``model.image.name = name`` build ``builder(config.model.image, dtype)``."""
    IMAGE_TOWERS[name] = builder


def register_text_tower(name: str, builder: TowerBuilder) -> None:
    """Makes ``model.text.name = name`` build ``builder(config.model.text, dtype)``."""
    TEXT_TOWERS[name] = builder


def register_encoder(name: str, builder: TowerBuilder, defaults: dict) -> None:
    """Makes ``model.towers.<m>.encoder = name`` build ``builder(tower_config, dtype)``.

    ``defaults``: every field the encoder reads, with its default; the tower config handed to
    the builder is these defaults overlaid with the tower entry (unknown fields are an error).
    """
    ENCODERS[name] = (builder, dict(defaults))


def encoder_defaults(kind: str) -> dict:
    """The fields (and defaults) of encoder ``kind`` for an N-tower entry."""
    return dict(_lookup(ENCODERS, kind, "encoder kind")[1])


def _lookup(registry: dict, name: str, field: str):
    if name not in registry:
        raise ValueError(f"unknown {field} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def _dtype(model_config):
    if model_config.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {model_config.dtype!r}; known: {', '.join(DTYPES)}")
    return DTYPES[model_config.dtype]


def _head_kwargs(model_config, entry=None) -> dict:
    entry = entry or {}
    return dict(
        hidden=int(entry.get("head_hidden", model_config.get("head_hidden", 0))),
        act=entry.get("head_act", model_config.get("head_act", "gelu")),
        use_bias=bool(entry.get("head_bias", model_config.get("head_bias", False))),
    )


def _with_prefix(prefix: str, builder, cfg, dtype):
    """Calls a tower builder; its ValueErrors name the config group (``model.image: pool=...``)."""
    try:
        return builder(cfg, dtype)
    except ValueError as e:
        if str(e).startswith("model."):
            raise
        raise ValueError(f"{prefix}.{e}") from None


def build_two_tower(model_config, dtype) -> TwoTower:
    image = _with_prefix("model.image", _lookup(IMAGE_TOWERS, model_config.image.name, "model.image.name"),
                         model_config.image, dtype)
    text = _with_prefix("model.text", _lookup(TEXT_TOWERS, model_config.text.name, "model.text.name"),
                        model_config.text, dtype)
    head = _head_kwargs(model_config)
    return TwoTower(
        image=image,
        text=text,
        embed_dim=model_config.embed_dim,
        scale_init=float(model_config.scale_init),
        bias_init=float(model_config.bias_init),
        max_scale=float(model_config.max_scale),
        head=model_config.get("head", "linear"),
        head_hidden=head["hidden"],
        head_act=head["act"],
        head_bias=head["use_bias"],
        dtype=dtype,
    )


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
    cfg = copy.deepcopy(fields)
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
    towers = []
    for name in tower_order(model_config):
        entry = model_config.towers[name]
        cfg = tower_config(model_config, name)  # validates the entry first
        builder = ENCODERS[entry["encoder"]][0]
        encoder = _with_prefix(f"model.towers.{name}", builder, cfg, dtype)
        head = make_head(entry.get("head", model_config.get("head", "linear")), model_config.embed_dim,
                         dtype=dtype, **_head_kwargs(model_config, entry))
        towers.append((name, encoder, head))
    return NTower(
        towers=tuple(towers),
        scale_init=float(model_config.scale_init),
        bias_init=float(model_config.bias_init),
        max_scale=float(model_config.max_scale),
    )


MODELS: dict[str, ModelBuilder] = {"two_tower": build_two_tower, "n_tower": build_n_tower}


def register_model(name: str, builder: ModelBuilder) -> None:
    """Makes ``model.name = name`` build ``builder(config.model, dtype)``.

    The module it returns must follow the model contract (``modalities`` attribute, ``__call__(
    *inputs, train)`` -> dict of ``[B, D]`` embeddings + ``scale``/``bias``, ``encode(name, x,
    train=False)``; see :mod:`contrastive_jax.models.towers`).
    """
    MODELS[name] = builder


def build(model_config) -> nn.Module:
    """Builds the (unbound) model described by ``config.model``.

    Raises:
      ValueError: an unknown model/tower/encoder name, field or dtype (the message names the
        field and lists the known values), or an unresolved text ``vocab_size``.
    """
    name = model_config.get("name", "two_tower")
    builder = _lookup(MODELS, name, "model.name")
    return builder(model_config, _dtype(model_config))


def sample_inputs(model_config, data_config=None, batch: int = 1,
                  modalities: tuple[str, ...] | None = None) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract inputs (``ShapeDtypeStruct``, batch ``batch``) in the model's input order.

    n_tower: each tower's ``input_shape`` / ``input_dtype`` (default float32). Other models:
    one input per name of ``modalities`` (default ``('image', 'text')``, pass the built model's
    ``modalities`` for registered kinds): ``image`` ``[b, S, S, 3]`` float32, ``image_views``
    ``[b, V, S, S, 3]`` float32, ``text`` ``[b, L]`` int32, with ``S = data.image_size``,
    ``V = data.num_views``, ``L = model.text.context_length`` or ``data.max_text_len``.
    """
    name = model_config.get("name", "two_tower")
    if name == "n_tower":
        out = []
        for m in tower_order(model_config):
            entry = model_config.towers[m]
            if "input_shape" not in entry:
                raise ValueError(f"model.towers.{m}.input_shape is needed to build sample inputs")
            out.append(jax.ShapeDtypeStruct((batch,) + tuple(entry["input_shape"]),
                                            jnp.dtype(entry.get("input_dtype", "float32"))))
        return tuple(out)
    if data_config is None:
        raise ValueError(f"sample_inputs of a {name!r} model needs config.data (image_size, max_text_len)")
    size = int(data_config.image_size)
    out = []
    for m in modalities or ("image", "text"):
        if m == "image":
            out.append(jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))
        elif m == "image_views":
            views = int(data_config.get("num_views", 2))
            out.append(jax.ShapeDtypeStruct((batch, max(views, 1), size, size, 3), jnp.float32))
        elif m == "text":
            text_cfg = model_config.get("text", None)
            ctx = int(text_cfg.get("context_length", 0) or 0) if text_cfg is not None else 0
            out.append(jax.ShapeDtypeStruct((batch, ctx or int(data_config.max_text_len)), jnp.int32))
        else:
            raise ValueError(f"sample_inputs does not know the input shape of modality {m!r} "
                             f"(model.name {name!r})")
    return tuple(out)
