"""Hugging Face ``transformers`` CLIP / SigLIP model folders <-> our two-tower model.

A folder as ``CLIPModel.save_pretrained`` / ``SiglipModel.save_pretrained`` writes it:
``config.json`` (``model_type`` ``'clip'`` or ``'siglip'``; SigLIP 2's fixed-resolution checkpoints
are ``'siglip'`` too), ``model.safetensors`` and the tokenizer's files. Everything the model needs
is read from the folder: the architecture (widths, depths, heads, MLP widths, patch and image
size, ``hidden_act`` and ``layer_norm_eps`` per tower), the normalization
(``preprocessor_config.json``'s ``image_mean`` / ``image_std``, else the family's), the tokenizer
(``tokenizer.json`` through the ``tokenizers`` package, or SigLIP's ``spiece.model``;
:mod:`contrastive_jax.data.hf_tokenizer`). Nothing is downloaded and ``transformers`` is not needed.

The architectures, as ours (every tensor maps by a transpose or reshape, so conversion is exact):

- CLIP (``CLIPModel``): a ViT with a class token that has a position, a bias-free patch
  convolution, ``pre_layrnorm`` before the encoder and ``post_layernorm`` on the class token
  (= our encoder's final norm, read at the class token), a bias-free ``visual_projection``; a
  causal text transformer pooled at the first ``eos_token_id`` (the config's) after
  ``final_layer_norm``, a bias-free ``text_projection``; ``logit_scale``.
- SigLIP (``SiglipModel``): a ViT without class token, with a patch bias, ``post_layernorm``
  on every token, then multihead attention pooling (``head``: a learned probe, one
  ``nn.MultiheadAttention``, a LayerNorm and an MLP with a residual) -- our ``pool='map'`` -- and
  no projection (our ``image_head='none'``); a bidirectional text transformer read at the last
  position after ``final_layer_norm``, then a linear ``head`` with bias; ``logit_scale`` and
  ``logit_bias``. The text model attends to every position, padding included, as SigLIP was
  trained (our ``mask_pad=False``; ``transformers`` computes the same when no ``attention_mask``
  is passed).

``hidden_act``: ``quick_gelu`` -> ``'quick_gelu'``; ``gelu`` (erf) -> ``'gelu_exact'``;
``gelu_pytorch_tanh`` / ``gelu_new`` (tanh approximation) -> ``'gelu'``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from contrastive_jax.interop.clip import (CLIP_MEAN, CLIP_STD, ConversionError, _get, _set, jax_to_numpy,
                                          rule_problems, unstack_layers)

HF_MODEL_TYPES = ("clip", "siglip")
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
# transformers' hidden_act -> ours; and back (the first name of each of ours).
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
_ACTS_BACK = {"quick_gelu": "quick_gelu", "gelu_exact": "gelu", "gelu": "gelu_pytorch_tanh"}
_SIGLIP_MEAN = _SIGLIP_STD = (0.5, 0.5, 0.5)
_WEIGHTS = "model.safetensors"


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` is a ``transformers`` config (it has a
    ``model_type``; our run configs do not)."""
    cfg = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as fh:
            return "model_type" in json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False


def reads_as_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``contrastive_jax.load`` / ``convert`` read ``path`` as a transformers folder: a
    transformers ``config.json`` and either its ``model.safetensors`` or no open_clip weights (a hub
    snapshot of an open_clip model may hold both forms; without ``model.safetensors`` its open_clip
    files are read instead)."""
    if not is_hf_folder(path):
        return False
    from contrastive_jax.interop.clip import find_open_clip_weights

    return os.path.isfile(os.path.join(os.fspath(path), _WEIGHTS)) or find_open_clip_weights(path) is None


def read_hf_config(folder: str) -> dict:
    """``folder/config.json`` of a CLIP or SigLIP model; ValueError naming the file and field."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    kind = cfg.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ValueError(f"{path}: model_type={kind!r}; contrastive_jax reads {', '.join(HF_MODEL_TYPES)} "
                         "(CLIPModel, SiglipModel; SigLIP 2 fixed-resolution checkpoints are 'siglip')")
    for group in ("text_config", "vision_config"):
        if not isinstance(cfg.get(group), dict):
            raise ValueError(f"{path}: no {group} object; a CLIPModel/SiglipModel config has text_config and "
                             "vision_config")
    return cfg


# Defaults of transformers' config classes for fields a saved config.json may leave out.
_TEXT_DEFAULTS = {
    "clip": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 eos_token_id=49407),
    "siglip": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6),
}
_VISION_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   num_channels=3, vision_use_head=True),
}


def _act(value: str, where: str) -> str:
    if value not in _ACTS:
        raise ValueError(f"{where}.hidden_act={value!r}; supported: {', '.join(_ACTS)}")
    return _ACTS[value]


def _tower_fields(c: Mapping, where: str) -> dict:
    width, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    if width % heads:
        raise ValueError(f"{where}: hidden_size {width} is not divisible by num_attention_heads {heads}")
    return dict(width=width, depth=int(c["num_hidden_layers"]), num_heads=heads, mlp_dim=int(c["intermediate_size"]),
                act=_act(c["hidden_act"], where), norm_eps=float(c["layer_norm_eps"]))


def hf_model_config(cfg: Mapping) -> tuple[dict, int, list[str]]:
    """A ``transformers`` CLIP/SigLIP ``config.json`` (dict) -> ``(model, image_size, notes)``:
    ``model`` our ``config.model`` fields (plain dict), ``image_size`` in pixels, ``notes`` the
    assumptions made."""
    kind = cfg["model_type"]
    notes: list[str] = []
    t = {**_TEXT_DEFAULTS[kind], **cfg["text_config"]}
    v = {**_VISION_DEFAULTS[kind], **cfg["vision_config"]}
    if int(v["num_channels"]) != 3:
        raise ValueError(f"vision_config.num_channels={v['num_channels']}; only RGB (3) models are supported")
    size, patch = v["image_size"], v["patch_size"]
    if isinstance(size, (list, tuple)) or isinstance(patch, (list, tuple)):
        raise ValueError("vision_config.image_size / patch_size must be single numbers (square images and patches)")
    image = dict(name="vit", patch_size=int(patch), posemb="learn", stem="patch",
                 crop_to_patches=bool(int(size) % int(patch)), **_tower_fields(v, "vision_config"))
    text = dict(name="transformer", vocab_size=int(t["vocab_size"]), context_length=int(t["max_position_embeddings"]),
                **_tower_fields(t, "text_config"))
    if kind == "clip":
        if not isinstance(t["eos_token_id"], int):
            raise ValueError(f"text_config.eos_token_id={t['eos_token_id']!r}; CLIP pools at one EOS id (an int)")
        eos = int(t["eos_token_id"])
        if eos == 2:  # transformers' legacy rule for such configs: pool at the largest id (CLIP's EOS)
            eos = int(t["vocab_size"]) - 1
            notes.append("text_config.eos_token_id=2 (an old config): pooling at the last vocabulary id, "
                         f"{eos}, as transformers does (argmax of the ids)")
        image.update(pool="cls", cls_posemb=True, norm_pre=True, patch_bias=False)
        text.update(causal=True, pool="eos", eos_id=eos)
        model = dict(embed_dim=int(cfg.get("projection_dim", 512)), head="linear", head_bias=False)
    else:
        if not v.get("vision_use_head", True):
            raise ValueError("vision_config.vision_use_head=false: a SigLIP vision tower without its attention-pooling "
                             "head has no image embedding to convert")
        projection = int(t.get("projection_size") or t["hidden_size"])
        if projection != image["width"]:
            raise ValueError(f"text_config.projection_size={projection} differs from vision_config.hidden_size="
                             f"{image['width']}: SiglipModel compares the two directly")
        image.update(pool="map", cls_posemb=False, norm_pre=False, patch_bias=True)
        text.update(causal=False, pool="last", eos_id=-1, mask_pad=False)
        model = dict(embed_dim=projection, head="linear", image_head="none", head_bias=True)
    model.update(name="two_tower", image=image, text=text)
    return model, int(size), notes


# -------------------------------------------------------------------------------------------------
# Tensor rules
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One ``transformers`` tensor <-> one or more of our parameters (paths '/'-joined)."""

    key: str
    paths: tuple[str, ...]
    shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]] = lambda a: (a,)
    to_hf: Callable[..., np.ndarray] = lambda a: a


def _copy(key: str, path: str, shape) -> _Rule:
    return _Rule(key, (path,), tuple(shape))


def _dense(key: str, path: str, out_f: int, in_f: int, bias: bool = True) -> list[_Rule]:
    """torch Linear ``weight [out, in]`` (+ ``bias``) <-> our ``kernel [in, out]`` (+ ``bias``)."""
    rules = [_Rule(f"{key}.weight", (f"{path}/kernel",), (out_f, in_f), lambda w: (w.T,), lambda k: k.T)]
    return rules + ([_copy(f"{key}.bias", f"{path}/bias", (out_f,))] if bias else [])


def _norm(key: str, path: str, width: int) -> list[_Rule]:
    return [_copy(f"{key}.weight", f"{path}/scale", (width,)), _copy(f"{key}.bias", f"{path}/bias", (width,))]


def _heads_dense(key: str, path: str, width: int, heads: int) -> list[_Rule]:
    """A q/k/v projection ``[W, W]`` <-> our ``[W, H, Dh]`` kernel and ``[H, Dh]`` bias."""
    dh = width // heads
    return [_Rule(f"{key}.weight", (f"{path}/kernel",), (width, width), lambda w: (w.T.reshape(width, heads, dh),),
                  lambda k: k.reshape(width, width).T),
            _Rule(f"{key}.bias", (f"{path}/bias",), (width,), lambda b: (b.reshape(heads, dh),),
                  lambda b: b.reshape(width))]


def _out_proj(key: str, path: str, width: int, heads: int) -> list[_Rule]:
    dh = width // heads
    return [_Rule(f"{key}.weight", (f"{path}/kernel",), (width, width), lambda w: (w.T.reshape(heads, dh, width),),
                  lambda k: k.reshape(width, width).T),
            _copy(f"{key}.bias", f"{path}/bias", (width,))]


def _mlp(key: str, path: str, width: int, mlp: int) -> list[_Rule]:
    """An MLP ``fc1 [mlp, W]`` -> ``fc2 [W, mlp]`` (both with bias)."""
    return _dense(f"{key}.mlp.fc1", f"{path}/mlp/fc1", mlp, width) + _dense(f"{key}.mlp.fc2", f"{path}/mlp/fc2",
                                                                          width, mlp)


def _layer(key: str, path: str, width: int, heads: int, mlp: int) -> list[_Rule]:
    """One ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``."""
    rules = _norm(f"{key}.layer_norm1", f"{path}/norm_attn", width)
    for name, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        rules += _heads_dense(f"{key}.self_attn.{name}", f"{path}/attn/{ours}", width, heads)
    rules += _out_proj(f"{key}.self_attn.out_proj", f"{path}/attn/out", width, heads)
    rules += _norm(f"{key}.layer_norm2", f"{path}/norm_mlp", width)
    return rules + _mlp(key, path, width, mlp)


def _map_head(key: str, path: str, width: int, heads: int, mlp: int) -> list[_Rule]:
    """SigLIP's ``SiglipMultiheadAttentionPoolingHead`` <-> our ``MAPHead`` (fused in_proj split)."""
    dh = width // heads

    def split_w(w):  # [3W, W] -> q, k, v kernels [W, H, Dh]
        return tuple(p.T.reshape(width, heads, dh) for p in np.split(w, 3, axis=0))

    def split_b(b):
        return tuple(p.reshape(heads, dh) for p in np.split(b, 3))

    qkv = tuple(f"{path}/attn/{n}" for n in ("query", "key", "value"))
    rules = [
        _copy(f"{key}.probe", f"{path}/probe", (1, 1, width)),
        _Rule(f"{key}.attention.in_proj_weight", tuple(p + "/kernel" for p in qkv), (3 * width, width), split_w,
              lambda *ks: np.concatenate([k.reshape(width, width).T for k in ks], axis=0)),
        _Rule(f"{key}.attention.in_proj_bias", tuple(p + "/bias" for p in qkv), (3 * width,), split_b,
              lambda *bs: np.concatenate([b.reshape(width) for b in bs])),
    ]
    rules += _out_proj(f"{key}.attention.out_proj", f"{path}/attn/out", width, heads)
    rules += _norm(f"{key}.layernorm", f"{path}/norm", width)
    return rules + _mlp(key, path, width, mlp)


def _rules(kind: str, model: Mapping, image_size: int) -> list[_Rule]:
    """Every tensor of a ``transformers`` CLIPModel / SiglipModel state dict of this architecture."""
    im, tx, d = model["image"], model["text"], int(model["embed_dim"])
    w, p, tw = im["width"], im["patch_size"], tx["width"]
    patches = (image_size // p) ** 2
    v, t = "vision_model", "text_model"
    rules = [_Rule(f"{v}.embeddings.patch_embedding.weight", ("image/patch_embed/kernel",), (w, 3, p, p),
                   lambda a: (a.transpose(2, 3, 1, 0),), lambda k: k.transpose(3, 2, 0, 1))]
    if kind == "clip":
        rules += [_copy(f"{v}.embeddings.class_embedding", "image/cls", (w,)),
                  _copy(f"{v}.embeddings.position_embedding.weight", "image/pos_embedding", (patches + 1, w))]
        rules += _norm(f"{v}.pre_layrnorm", "image/norm_pre", w)  # sic: transformers' spelling
    else:
        rules += [_copy(f"{v}.embeddings.patch_embedding.bias", "image/patch_embed/bias", (w,)),
                  _copy(f"{v}.embeddings.position_embedding.weight", "image/pos_embedding", (patches, w))]
    for i in range(im["depth"]):
        rules += _layer(f"{v}.encoder.layers.{i}", f"image/encoder/block_{i}", w, im["num_heads"], im["mlp_dim"])
    rules += _norm(f"{v}.post_layernorm", "image/encoder/norm", w)
    rules += [_copy(f"{t}.embeddings.token_embedding.weight", "text/token_embedding", (tx["vocab_size"], tw)),
              _copy(f"{t}.embeddings.position_embedding.weight", "text/pos_embedding", (tx["context_length"], tw))]
    for i in range(tx["depth"]):
        rules += _layer(f"{t}.encoder.layers.{i}", f"text/encoder/block_{i}", tw, tx["num_heads"], tx["mlp_dim"])
    rules += _norm(f"{t}.final_layer_norm", "text/encoder/norm", tw)
    scalar = (lambda a: (np.reshape(a, ()),), lambda a: np.reshape(a, () if kind == "clip" else (1,)))
    if kind == "clip":
        rules += _dense("visual_projection", "image_proj", d, w, bias=False)
        rules += _dense("text_projection", "text_proj", d, tw, bias=False)
        rules.append(_Rule("logit_scale", ("log_scale",), (), *scalar))
    else:
        rules += _map_head(f"{v}.head", "image/map", w, im["num_heads"], im["mlp_dim"])
        rules += _dense(f"{t}.head", "text_proj", d, tw)
        rules += [_Rule("logit_scale", ("log_scale",), (1,), *scalar), _Rule("logit_bias", ("bias",), (1,), *scalar)]
    return rules


def convert_hf_state_dict(state_dict: Mapping[str, Any], cfg: Mapping) -> tuple[dict, int, dict, list[str]]:
    """A ``transformers`` CLIPModel / SiglipModel state dict + its config -> ``(model, image_size,
    params, notes)``; params: nested dict of float32 numpy arrays in our layout (unscanned).

    Raises:
      ConversionError: listing every unmapped, missing and wrongly-shaped key.
    """
    kind = cfg["model_type"]
    model, image_size, notes = hf_model_config(cfg)
    # Buffers some versions save (position ids) are not parameters.
    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    rules = _rules(kind, model, image_size)
    problems = rule_problems(rules, sd)
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) converting a transformers {ARCHITECTURES[kind]} state dict "
                              "against its config.json:\n  " + "\n  ".join(problems[:40]))
    params: dict = {}
    for rule in rules:
        for path, value in zip(rule.paths, rule.to_ours(np.asarray(sd[rule.key], dtype=np.float32))):
            _set(params, path, np.array(value, order="C"))  # (ascontiguousarray makes 0-d arrays 1-d)
    if kind == "clip":
        _set(params, "bias", np.zeros((), np.float32))
    return model, image_size, params, notes


# -------------------------------------------------------------------------------------------------
# Folder -> model
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HfCheckpoint:
    """A converted ``transformers`` folder.

    Attributes:
      config: full run config (``default_config()`` with ``model``, ``data`` -- image size, text
        length, normalization -- and ``loss.name``: ``'sigmoid'`` for SigLIP, ``'softmax'`` for CLIP).
      params: nested dict of float32 numpy arrays in our layout.
      tokenizer: from the folder's tokenizer files (None when it has none).
      kind: ``'clip'`` | ``'siglip'``. notes: assumptions made.
    """

    config: ml_collections.ConfigDict
    params: dict
    tokenizer: Any
    kind: str
    notes: list[str]

    def save(self, directory: str) -> str:
        """Writes a model directory (see :func:`contrastive_jax.train.restore.write_model_dir`) whose
        ``config.data.tokenizer.path`` is its own ``tokenizer.json``, so training from that config
        (fine-tuning, LiT) tokenizes captions as the checkpoint does."""
        from contrastive_jax.train.restore import write_model_dir

        config = self.config
        if self.tokenizer is not None:
            config = ml_collections.ConfigDict(self.config.to_dict())
            config.data.tokenizer.path = os.path.join(os.path.abspath(os.path.expanduser(directory)), "tokenizer.json")
        return write_model_dir(directory, config, self.params, self.tokenizer)


def _normalization(folder: str, kind: str) -> tuple[tuple, tuple]:
    path = os.path.join(folder, "preprocessor_config.json")
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (_SIGLIP_MEAN, _SIGLIP_STD)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            pre = json.load(fh)
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def hf_run_config(model: Mapping, image_size: int, kind: str, log_scale: float, mean, std) -> ml_collections.ConfigDict:
    """The config groups of a converted folder (merge onto ``default_config()``)."""
    c = ml_collections.ConfigDict()
    # transformers does not clamp the logit scale: the cap only has to lie above it.
    scale = math.exp(log_scale)
    c.model = dict(model, max_scale=100.0 if scale <= 100.0 else 2.0 * scale, scale_init=math.log(1 / 0.07)
                   if kind == "clip" else math.log(10.0), bias_init=0.0 if kind == "clip" else -10.0,
                   dtype="float32")  # the original's embeddings on any platform (see interop.clip.run_config)
    c.data = dict(image_size=int(image_size), max_text_len=int(model["text"]["context_length"]), mean=tuple(mean),
                  std=tuple(std), tokenizer=dict(kind="auto", path="", lowercase=False, clean="none", add_eos=True))
    c.loss = dict(name="softmax" if kind == "clip" else "sigmoid")
    return c


def _check_folder(folder: str) -> str:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a directory (a transformers save_pretrained folder)")
    weights = os.path.join(folder, _WEIGHTS)
    if not os.path.isfile(weights):
        found = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin", ".index.json")))
        raise FileNotFoundError(f"{weights} not found (found: {', '.join(found) or 'no weight files'}); "
                                "contrastive_jax reads single-file model.safetensors folders")
    return weights


def load_hf_folder(folder: str | os.PathLike, *, scan: bool = False) -> HfCheckpoint:
    """Converts a ``transformers`` CLIPModel / SiglipModel ``save_pretrained`` folder.

    Args:
      folder: holds ``config.json``, ``model.safetensors`` and optionally the tokenizer's files
        (``tokenizer.json`` + ``tokenizer_config.json``, or ``spiece.model``) and
        ``preprocessor_config.json``.
      scan: stack the layers for ``scan=True`` towers.

    Raises:
      ValueError (one line naming the file and field) for an unsupported config, before the
      weights are read; ConversionError listing keys that do not match the config.
    """
    from safetensors.numpy import load_file

    from contrastive_jax.data.hf_tokenizer import hf_folder_tokenizer
    from contrastive_jax.interop.clip import stack_layers
    from contrastive_jax.train.config import default_config, merge

    folder = os.path.abspath(os.fspath(folder))
    cfg = read_hf_config(folder)
    try:
        hf_model_config(cfg)  # config errors before the (large) weights are read
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{os.path.join(folder, 'config.json')}: {e}") from None
    weights = _check_folder(folder)
    model, image_size, params, notes = convert_hf_state_dict(load_file(weights), cfg)
    kind = cfg["model_type"]
    groups = hf_run_config(model, image_size, kind, float(params["log_scale"]), *_normalization(folder, kind))
    if scan:
        groups.model.image.scan = groups.model.text.scan = True
        params = stack_layers(params)
    config = merge(default_config(), groups, source=os.path.join(folder, "config.json"))
    tokenizer = hf_folder_tokenizer(folder, int(model["text"]["context_length"]))
    if tokenizer is None:
        notes.append("no tokenizer files (tokenizer.json or spiece.model) in the folder: encode_texts needs one")
    elif tokenizer.vocab_size > model["text"]["vocab_size"]:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but text_config.vocab_size is "
                         f"{model['text']['vocab_size']}")
    if kind == "clip" and tokenizer is not None and tokenizer.eos_id != model["text"]["eos_id"]:
        notes.append(f"the tokenizer's EOS id {tokenizer.eos_id} differs from text_config.eos_token_id "
                     f"{model['text']['eos_id']}; the model pools at the config's, as transformers does")
    return HfCheckpoint(config=config, params=params, tokenizer=tokenizer, kind=kind, notes=notes)


# -------------------------------------------------------------------------------------------------
# Model -> folder
# -------------------------------------------------------------------------------------------------

# (field, value) of our model config that each transformers architecture needs.
_EXPORTABLE = {
    "clip": [("name", "two_tower"), ("head", "linear"), ("head_bias", False), ("image_head", ""), ("text_head", ""),
             ("image.name", "vit"), ("image.pool", "cls"), ("image.cls_posemb", True), ("image.norm_pre", True),
             ("image.patch_bias", False), ("image.posemb", "learn"), ("image.stem", "patch"),
             ("text.name", "transformer"), ("text.pool", "eos"), ("text.causal", True)],
    "siglip": [("name", "two_tower"), ("head", "linear"), ("head_bias", True), ("image_head", "none"),
               ("text_head", ""), ("image.name", "vit"), ("image.pool", "map"), ("image.norm_pre", False),
               ("image.patch_bias", True), ("image.posemb", "learn"), ("image.stem", "patch"),
               ("text.name", "transformer"), ("text.pool", "last"), ("text.causal", False), ("text.mask_pad", False)],
}


def _field(cfg, dotted: str):
    from contrastive_jax.models.config import defaults

    for source in (cfg, defaults()):
        node = source
        for name in dotted.split("."):
            if node is None or name not in node:
                node = None
                break
            node = node[name]
        if node is not None:
            return node
    return None


def export_kind(model_config) -> str:
    """``'clip'`` or ``'siglip'``: the ``transformers`` architecture this model is; ConversionError
    naming the fields that fit neither."""
    misfits = {}
    for kind, needs in _EXPORTABLE.items():
        misfits[kind] = [f"model.{f}={_field(model_config, f)!r} (needs {v!r})" for f, v in needs
                         if _field(model_config, f) != v]
        if not misfits[kind]:
            return kind
    raise ConversionError("this model is neither transformers' CLIPModel nor SiglipModel: " + "; ".join(
        f"as {ARCHITECTURES[k]}: {', '.join(m)}" for k, m in misfits.items()))


def _tower_config(tower, kind: str, where: str) -> dict:
    act = str(tower["act"])
    if act not in _ACTS_BACK:
        raise ConversionError(f"model.{where}.act={act!r} has no transformers hidden_act (supported: "
                              f"{', '.join(_ACTS_BACK)})")
    return dict(hidden_size=int(tower["width"]), intermediate_size=int(tower["mlp_dim"]),
                num_hidden_layers=int(tower["depth"]), num_attention_heads=int(tower["num_heads"]),
                hidden_act=_ACTS_BACK[act], layer_norm_eps=float(tower["norm_eps"]), attention_dropout=0.0)


def hf_config_dict(model_config, image_size: int, kind: str, params: Mapping, tokenizer=None) -> dict:
    """The ``config.json`` of a ``transformers`` CLIPModel / SiglipModel equal to our model."""
    im, tx = model_config["image"], model_config["text"]
    d = int(np.shape(params["text_proj"]["kernel"])[1])
    vision = dict(_tower_config(im, kind, "image"), image_size=int(image_size), patch_size=int(im["patch_size"]),
                  num_channels=3)
    text = dict(_tower_config(tx, kind, "text"), vocab_size=int(tx["vocab_size"]),
                max_position_embeddings=int(np.shape(params["text"]["pos_embedding"])[0]))
    if tokenizer is not None:
        # bos_token_id null when there is none (transformers' default, 49406, lies outside small vocabularies)
        text.update(pad_token_id=int(tokenizer.pad_id), eos_token_id=int(tokenizer.eos_id),
                    bos_token_id=None if tokenizer.bos_id is None else int(tokenizer.bos_id))
    out = dict(architectures=[ARCHITECTURES[kind]], model_type=kind, dtype="float32", initializer_factor=1.0)
    if kind == "clip":
        if int(tx["eos_id"]) < 0:
            raise ConversionError("model.text.eos_id=-1: transformers' CLIP pools at an EOS id; set the EOS token's id")
        text["eos_token_id"] = int(tx["eos_id"])
        vision["projection_dim"] = text["projection_dim"] = d
        out.update(projection_dim=d, logit_scale_init_value=2.6592)
    else:
        text["projection_size"] = d
        vision["vision_use_head"] = True
    out.update(text_config=text, vision_config=vision)
    return out


def export_hf_state_dict(params: Mapping, model_config, image_size: int, kind: str) -> dict[str, np.ndarray]:
    """Our params -> the ``transformers`` state dict (float32 numpy, C order)."""
    params = unstack_layers(jax_to_numpy(params))
    model = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config,
                 embed_dim=int(np.shape(params["text_proj"]["kernel"])[1]))
    model["text"] = dict(model["text"], context_length=int(np.shape(params["text"]["pos_embedding"])[0]))
    out = {}
    for rule in _rules(kind, model, int(image_size)):
        values = [np.asarray(_get(params, p), np.float32) for p in rule.paths]
        out[rule.key] = np.array(rule.to_hf(*values), dtype=np.float32, order="C")
    return out


def _write_tokenizer(folder: str, tokenizer) -> list[str]:
    """The tokenizer's own files, for tokenizers read from a transformers folder."""
    from contrastive_jax.data.hf_tokenizer import HfTokenizersTokenizer, SiglipSentencePieceTokenizer

    written = []
    if isinstance(tokenizer, HfTokenizersTokenizer):
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as fh:
            fh.write(tokenizer.tokenizer_json)
        written.append("tokenizer.json")
    elif isinstance(tokenizer, SiglipSentencePieceTokenizer):
        with open(os.path.join(folder, "spiece.model"), "wb") as fh:
            fh.write(tokenizer.model_proto)
        written.append("spiece.model")
    else:
        return written
    config = dict(tokenizer.hf_config, model_max_length=int(tokenizer.max_len))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return written + ["tokenizer_config.json"]


def export_hf_folder(folder: str | os.PathLike, params: Mapping, config, tokenizer=None) -> dict:
    """Writes ``config.json`` + ``model.safetensors`` (+ the tokenizer's files when it came from a
    transformers folder, + ``preprocessor_config.json`` with the normalization) that
    ``transformers.AutoModel.from_pretrained(folder)`` loads with no missing or unexpected key.

    Refuses a folder that already holds a config.json or model.safetensors (FileExistsError).
    Returns ``{'folder', 'architecture', 'files'}``.
    """
    from safetensors.numpy import save_file

    folder = os.path.abspath(os.fspath(folder))
    clash = [n for n in ("config.json", _WEIGHTS) if os.path.exists(os.path.join(folder, n))]
    if clash:
        raise FileExistsError(f"{folder} already holds {', '.join(clash)}; choose a new folder")
    kind = export_kind(config.model)
    numpy_params = jax_to_numpy(params)
    hf_cfg = hf_config_dict(config.model, int(config.data.image_size), kind, numpy_params, tokenizer)
    state = export_hf_state_dict(numpy_params, config.model, int(config.data.image_size), kind)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(hf_cfg, fh, indent=2)
    save_file(state, os.path.join(folder, _WEIGHTS), metadata={"format": "pt"})
    files = ["config.json", _WEIGHTS] + _write_tokenizer(folder, tokenizer)
    size = int(config.data.image_size)
    processor = dict(image_mean=list(config.data.mean), image_std=list(config.data.std), do_normalize=True,
                     do_rescale=True, rescale_factor=1 / 255, do_resize=True)
    if kind == "clip":  # shorter side to the size, then a centre crop (as our API's preprocessing)
        processor.update(image_processor_type="CLIPImageProcessor", size={"shortest_edge": size}, do_center_crop=True,
                         crop_size={"height": size, "width": size})
    else:
        processor.update(image_processor_type="SiglipImageProcessor", size={"height": size, "width": size})
    with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as fh:
        json.dump(processor, fh, indent=2)
    return dict(folder=folder, architecture=ARCHITECTURES[kind], files=files + ["preprocessor_config.json"])
