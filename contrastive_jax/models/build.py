"""``build(config.model) -> TwoTower``: tower construction through explicit name registries.

Towers are looked up by exact name in small dicts (never by substrings of a model name); a new
tower registers a builder ``fn(tower_config, dtype) -> nn.Module`` with
:func:`register_image_tower` / :func:`register_text_tower`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.towers import TwoTower
from contrastive_jax.models.vit import VisionTransformer

TowerBuilder = Callable[[Any, Any], nn.Module]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _build_vit(cfg, dtype) -> nn.Module:
    return VisionTransformer(
        patch_size=cfg.patch_size,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        pool=cfg.get("pool", "gap"),
        posemb=cfg.get("posemb", "learn"),
        stem=cfg.get("stem", "patch"),
        dtype=dtype,
    )


def _build_text_transformer(cfg, dtype) -> nn.Module:
    if cfg.vocab_size is None or cfg.vocab_size <= 0:
        raise ValueError(
            f"model.text.vocab_size is {cfg.vocab_size}; set it (or resolve -1 from the tokenizer's "
            "vocabulary size) before building the model"
        )
    return TextTransformer(
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        causal=cfg.get("causal", True),
        # Optional: not in the schema yet; None means "the text length seen at init".
        context_length=cfg.get("context_length", None),
        dtype=dtype,
    )


IMAGE_TOWERS: dict[str, TowerBuilder] = {"vit": _build_vit}
TEXT_TOWERS: dict[str, TowerBuilder] = {"transformer": _build_text_transformer}
MODELS = ("two_tower",)


def register_image_tower(name: str, builder: TowerBuilder) -> None:
    """Makes ``model.image.name = name`` build ``builder(config.model.image, dtype)``."""
    IMAGE_TOWERS[name] = builder


def register_text_tower(name: str, builder: TowerBuilder) -> None:
    """Makes ``model.text.name = name`` build ``builder(config.model.text, dtype)``."""
    TEXT_TOWERS[name] = builder


def _lookup(registry: dict[str, TowerBuilder], name: str, field: str) -> TowerBuilder:
    if name not in registry:
        raise ValueError(f"unknown {field} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def build(model_config) -> TwoTower:
    """Builds the (unbound) model described by ``config.model``.

    Reads ``name, embed_dim, scale_init, bias_init, max_scale, dtype`` and the ``image``/``text``
    groups (see ``train/config.py``).

    Raises:
      ValueError: an unknown model/tower name or dtype (the message lists the known ones), or an
        unresolved text ``vocab_size``.
    """
    name = model_config.get("name", "two_tower")
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}; known: {', '.join(MODELS)}")
    if model_config.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {model_config.dtype!r}; known: {', '.join(DTYPES)}")
    dtype = DTYPES[model_config.dtype]
    image = _lookup(IMAGE_TOWERS, model_config.image.name, "model.image.name")(model_config.image, dtype)
    text = _lookup(TEXT_TOWERS, model_config.text.name, "model.text.name")(model_config.text, dtype)
    return TwoTower(
        image=image,
        text=text,
        embed_dim=model_config.embed_dim,
        scale_init=float(model_config.scale_init),
        bias_init=float(model_config.bias_init),
        max_scale=float(model_config.max_scale),
        dtype=dtype,
    )
