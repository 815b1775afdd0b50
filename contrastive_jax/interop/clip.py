"""OpenAI CLIP / open_clip ViT checkpoints <-> our two-tower model (params and config).

Architecture (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): a ViT with a bias-free patch convolution, a class token with its own position,
a LayerNorm before the encoder (``ln_pre``) and after it (``ln_post``, on the class token), and a
bias-free projection; a causal text transformer pooled at the end-of-text token after
``ln_final``; QuickGELU; LayerNorm epsilon 1e-5; a learned ``logit_scale``. Our ViT with
``pool='cls', cls_posemb=True, norm_pre=True, patch_bias=False`` and our text tower with
``eos_id=<end-of-text id>`` compute the same function; this module maps every tensor between the
two layouts, so conversion and export are exact (permutations and reshapes only).

Key layouts understood (``layout``):

- ``'openai'``: OpenAI's ``clip`` package and open_clip's ``CLIP`` class — ``visual.*`` and the
  text tower at the top level (``token_embedding.weight``, ``transformer.resblocks.N.*``,
  ``ln_final.*``, ``text_projection``, ``positional_embedding``), ``logit_scale``.
- ``'open_clip'``: open_clip's ``CustomTextCLIP`` — the same, with the text tower under
  ``text.`` (``text.token_embedding.weight``, ..., ``text.text_projection``); ``logit_bias`` when
  trained with the sigmoid loss.

Also accepted on import: a ``module.`` prefix on every key (DDP), a ``state_dict`` wrapper
(open_clip training checkpoints), fp16/bf16 tensors (converted to float32), TorchScript archives,
and OpenAI's extra ``input_resolution`` / ``context_length`` / ``vocab_size`` entries.

What the weights do not say, and how it is decided:

- Attention heads: ``image_heads`` / ``text_heads`` arguments, else an open_clip model config
  (``vision_cfg.head_width``, ``text_cfg.heads``), else width / 64 — except widths 1280, 1408 and
  1664 of open_clip's ViT-H/14, g/14 and bigG/14 image towers, which have 16 heads.
- The activation (:func:`infer_activation`): the ``act`` argument; else an open_clip model config
  (``open_clip_config.json``, flat or under ``model_cfg``): its ``quick_gelu`` flag, absent meaning
  False as in open_clip, i.e. exact (erf) GELU, PyTorch's ``nn.GELU``; else a file or folder name
  containing ``quickgelu``: QuickGELU; else OpenAI's release format (a TorchScript archive, or its
  ``input_resolution`` entry): QuickGELU; else open_clip's default, exact GELU, with a warning
  (OpenAI's weights saved as a plain state dict need ``act='quick_gelu'``).

An open_clip hub folder (``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors`` beside
``open_clip_config.json``) is read as its weights file (:func:`find_open_clip_weights`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np

LAYOUTS = ("openai", "open_clip")
# OpenAI's image normalization (applied to [0, 1] RGB).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Buffers some exports carry that are not parameters (OpenAI's TorchScript files; a causal mask).
_IGNORED_KEYS = re.compile(r"^(input_resolution|context_length|vocab_size|(text\.)?attn_mask)$")
_VISION_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}
# byte symbols (256) + the same with </w> (256) + <|startoftext|> + <|endoftext|>
_BPE_NON_MERGE_IDS = 514
# open_clip's hub file names (open_clip.constants), safetensors first: it needs no PyTorch.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
ACTIVATIONS = ("quick_gelu", "gelu_exact")


class ConversionError(ValueError):
    """The state dict does not match the architecture: lists every unmapped, missing or
    wrongly-shaped key."""


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One PyTorch tensor <-> one or more of our parameters (paths '/'-joined)."""

    key: str
    paths: tuple[str, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_torch: Callable[..., np.ndarray]
    shape: tuple[int, ...]


def _same(key, path, shape):
    return _Rule(key, (path,), lambda a: (a,), lambda a: a, tuple(shape))


def _linear(key, path, out_features, in_features):
    """torch Linear weight ``[out, in]`` <-> our kernel ``[in, out]``."""
    return _Rule(key, (path,), lambda w: (w.T,), lambda k: k.T, (out_features, in_features))


def _block_rules(tkey: str, ours: str, width: int, heads: int, mlp: int) -> list[_Rule]:
    """One residual attention block: ``ln_1``, ``attn`` (fused in_proj), ``ln_2``, ``mlp``."""
    dh = width // heads

    def split_w(w):  # [3W, W] -> three [W, H, Dh] kernels (q, k, v)
        return tuple(part.T.reshape(width, heads, dh) for part in np.split(w, 3, axis=0))

    def join_w(q, k, v):
        return np.concatenate([x.reshape(width, width).T for x in (q, k, v)], axis=0)

    def split_b(b):
        return tuple(part.reshape(heads, dh) for part in np.split(b, 3))

    def join_b(q, k, v):
        return np.concatenate([x.reshape(width) for x in (q, k, v)])

    qkv = [f"{ours}/attn/{n}" for n in ("query", "key", "value")]
    return [
        _same(f"{tkey}.ln_1.weight", f"{ours}/norm_attn/scale", (width,)),
        _same(f"{tkey}.ln_1.bias", f"{ours}/norm_attn/bias", (width,)),
        _Rule(f"{tkey}.attn.in_proj_weight", tuple(p + "/kernel" for p in qkv), split_w, join_w, (3 * width, width)),
        _Rule(f"{tkey}.attn.in_proj_bias", tuple(p + "/bias" for p in qkv), split_b, join_b, (3 * width,)),
        _Rule(f"{tkey}.attn.out_proj.weight", (f"{ours}/attn/out/kernel",),
              lambda w: (w.T.reshape(heads, dh, width),), lambda k: k.reshape(width, width).T, (width, width)),
        _same(f"{tkey}.attn.out_proj.bias", f"{ours}/attn/out/bias", (width,)),
        _same(f"{tkey}.ln_2.weight", f"{ours}/norm_mlp/scale", (width,)),
        _same(f"{tkey}.ln_2.bias", f"{ours}/norm_mlp/bias", (width,)),
        _linear(f"{tkey}.mlp.c_fc.weight", f"{ours}/mlp/fc1/kernel", mlp, width),
        _same(f"{tkey}.mlp.c_fc.bias", f"{ours}/mlp/fc1/bias", (mlp,)),
        _linear(f"{tkey}.mlp.c_proj.weight", f"{ours}/mlp/fc2/kernel", width, mlp),
        _same(f"{tkey}.mlp.c_proj.bias", f"{ours}/mlp/fc2/bias", (width,)),
    ]


def _text_prefix(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; known: {', '.join(LAYOUTS)}")
    return "text." if layout == "open_clip" else ""


def _rules(model: Mapping[str, Any], layout: str, *, logit_bias: bool) -> list[_Rule]:
    """Every tensor of a CLIP ViT state dict of this architecture, in PyTorch's key order."""
    im, tx = model["image"], model["text"]
    w, p, d = im["width"], im["patch_size"], model["embed_dim"]
    grid = model["image_size"] // p
    tp = _text_prefix(layout)
    rules = [
        _Rule("visual.conv1.weight", ("image/patch_embed/kernel",),
              lambda a: (a.transpose(2, 3, 1, 0),), lambda k: k.transpose(3, 2, 0, 1), (w, 3, p, p)),
        _same("visual.class_embedding", "image/cls", (w,)),
        _same("visual.positional_embedding", "image/pos_embedding", (grid * grid + 1, w)),
        _same("visual.ln_pre.weight", "image/norm_pre/scale", (w,)),
        _same("visual.ln_pre.bias", "image/norm_pre/bias", (w,)),
    ]
    for i in range(im["depth"]):
        rules += _block_rules(f"visual.transformer.resblocks.{i}", f"image/encoder/block_{i}", w, im["num_heads"],
                              im["mlp_dim"])
    rules += [
        # ln_post normalizes the class token; our encoder's final LayerNorm normalizes every token
        # before pooling the class token -- the same function.
        _same("visual.ln_post.weight", "image/encoder/norm/scale", (w,)),
        _same("visual.ln_post.bias", "image/encoder/norm/bias", (w,)),
        _same("visual.proj", "image_proj/kernel", (w, d)),
    ]
    tw = tx["width"]
    rules += [
        _same(f"{tp}token_embedding.weight", "text/token_embedding", (tx["vocab_size"], tw)),
        _same(f"{tp}positional_embedding", "text/pos_embedding", (tx["context_length"], tw)),
    ]
    for i in range(tx["depth"]):
        rules += _block_rules(f"{tp}transformer.resblocks.{i}", f"text/encoder/block_{i}", tw, tx["num_heads"],
                              tx["mlp_dim"])
    rules += [
        _same(f"{tp}ln_final.weight", "text/encoder/norm/scale", (tw,)),
        _same(f"{tp}ln_final.bias", "text/encoder/norm/bias", (tw,)),
        _same(f"{tp}text_projection", "text_proj/kernel", (tw, d)),
        _Rule("logit_scale", ("log_scale",), lambda a: (a.reshape(()),), lambda a: a, ()),
    ]
    if logit_bias:
        rules.append(_Rule("logit_bias", ("bias",), lambda a: (a.reshape(()),), lambda a: a, ()))
    return rules


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """``'open_clip'`` if the text tower is under ``text.``, ``'openai'`` if at the top level."""
    if "text.token_embedding.weight" in state_dict:
        return "open_clip"
    if "token_embedding.weight" in state_dict:
        return "openai"
    sample = ", ".join(sorted(state_dict)[:8])
    raise ConversionError(
        "not a CLIP ViT state dict: no 'token_embedding.weight' (OpenAI layout) or "
        f"'text.token_embedding.weight' (open_clip layout); its keys begin: {sample}")


def _count_blocks(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _shape(sd, key) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"missing key {key!r}, needed to read the architecture")
    return tuple(np.shape(sd[key]))


def read_open_clip_config(spec: str | os.PathLike | Mapping | None) -> dict | None:
    """An open_clip model config: a dict, or a JSON file — either a model config
    (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``) or a hub-style
    ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        cfg = dict(spec)
    else:
        with open(os.fspath(spec), encoding="utf-8") as fh:
            cfg = json.load(fh)
    if "model_cfg" in cfg:
        model_cfg = dict(cfg["model_cfg"])
        model_cfg.setdefault("preprocess_cfg", cfg.get("preprocess_cfg", {}))
        return model_cfg
    return cfg


def find_open_clip_weights(directory: str | os.PathLike) -> str | None:
    """The weights file of an open_clip hub folder (``open_clip_model.safetensors`` preferred over
    ``open_clip_pytorch_model.bin``), or None when ``directory`` is not such a folder."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    for name in OPEN_CLIP_WEIGHTS:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (OpenAI's released ``.pt`` files) holds compiled ``code/``; a pickled
    state dict (``torch.save``, what open_clip writes) does not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def infer_activation(state_dict: Mapping[str, Any], *, act: str | None = None, open_clip_config: Mapping | None = None,
                     source: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """``(act, note)``: which GELU the checkpoint's MLPs use, and a note when it was assumed.

    Weights cannot say it: open_clip's models use exact GELU (``nn.GELU``) unless their name ends
    in ``-quickgelu`` (their config then has ``quick_gelu: true``); OpenAI's use QuickGELU. The
    evidence, strongest first: ``act``; an open_clip config (``quick_gelu`` absent = False); a
    file or folder name containing ``quickgelu``; OpenAI's release format (TorchScript, or an
    ``input_resolution`` entry). Without any: exact GELU (open_clip's default), with a note.
    """
    if act is not None:
        if act not in ACTIVATIONS:
            raise ValueError(f"act={act!r}; a CLIP checkpoint uses one of {', '.join(ACTIVATIONS)}")
        return act, None
    if open_clip_config and any(k in open_clip_config for k in ("vision_cfg", "text_cfg", "embed_dim", "quick_gelu")):
        return ("quick_gelu" if open_clip_config.get("quick_gelu", False) else "gelu_exact"), None
    path = os.path.abspath(os.fspath(source)) if source is not None else ""
    names = [os.path.basename(path), os.path.basename(os.path.dirname(path))] if path else []
    if any("quickgelu" in n.lower() for n in names):
        return "quick_gelu", None
    if "input_resolution" in state_dict or (path and os.path.isfile(path) and _is_torchscript(path)):
        return "quick_gelu", None
    return "gelu_exact", ("activation: nothing says which GELU the model used (no open_clip_config.json, no "
                          "'quickgelu' in its name, not OpenAI's TorchScript format); assumed open_clip's default, "
                          "exact GELU. OpenAI's CLIP weights and open_clip '-quickgelu' models use QuickGELU: "
                          "pass act='quick_gelu'")


def infer_model_config(state_dict: Mapping[str, Any], layout: str, *, act: str | None = None,
                       image_heads: int | None = None, text_heads: int | None = None,
                       open_clip_config: Mapping | None = None, source: str | os.PathLike | None = None
                       ) -> tuple[dict, list[str]]:
    """The architecture of a CLIP ViT state dict, as our ``config.model`` fields.

    ``source``: the file (or open_clip hub folder) the weights came from; its name and format are
    evidence for the activation (:func:`infer_activation`).

    Returns ``(model, notes)``: ``model`` is a plain dict (``embed_dim``, ``image_size``,
    ``image``, ``text``, ...), ``notes`` lists the choices the weights could not make (see the
    module docstring).
    """
    tp = _text_prefix(layout)
    notes: list[str] = []
    oc = open_clip_config or {}
    vision_cfg, text_cfg = dict(oc.get("vision_cfg", {})), dict(oc.get("text_cfg", {}))
    w, c, p, p2 = _shape(state_dict, "visual.conv1.weight")
    if c != 3 or p != p2:
        raise ConversionError(f"visual.conv1.weight has shape {(w, c, p, p2)}; expected [width, 3, patch, patch]")
    tokens = _shape(state_dict, "visual.positional_embedding")[0] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ConversionError(f"visual.positional_embedding has {tokens + 1} rows: not a square patch grid + class token")
    vocab, tw = _shape(state_dict, f"{tp}token_embedding.weight")
    if image_heads is None:
        if "head_width" in vision_cfg:
            image_heads = w // int(vision_cfg["head_width"])
        else:
            image_heads = _VISION_HEADS_BY_WIDTH.get(w, max(w // 64, 1))
    if text_heads is None:
        text_heads = int(text_cfg.get("heads", max(tw // 64, 1)))
    for name, width, heads in (("image", w, image_heads), ("text", tw, text_heads)):
        if width % heads:
            raise ConversionError(f"{name} width {width} is not divisible by {heads} heads; pass {name}_heads=")
    act, why = infer_activation(state_dict, act=act, open_clip_config=oc, source=source)
    if why:
        notes.append(why)
    common = dict(act=act, norm_eps=1e-5)
    model = dict(
        embed_dim=_shape(state_dict, "visual.proj")[1],
        image_size=grid * p,
        logit_bias="logit_bias" in state_dict,
        image=dict(
            name="vit", patch_size=p, width=w, depth=_count_blocks(state_dict, "visual.transformer.resblocks."),
            num_heads=image_heads, mlp_dim=_shape(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
            pool="cls", cls_posemb=True, norm_pre=True, patch_bias=False, posemb="learn", stem="patch", **common),
        text=dict(
            name="transformer", vocab_size=vocab, context_length=_shape(state_dict, f"{tp}positional_embedding")[0],
            width=tw, depth=_count_blocks(state_dict, f"{tp}transformer.resblocks."), num_heads=text_heads,
            mlp_dim=_shape(state_dict, f"{tp}transformer.resblocks.0.mlp.c_fc.weight")[0], causal=True,
            pool="eos", eos_id=vocab - 1, **common),
    )
    return model, notes


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _get(tree: Mapping, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def rule_problems(rules, state_dict: Mapping[str, Any]) -> list[str]:
    """Every key of ``state_dict`` no rule maps, every rule's key it lacks, and every shape that
    differs from the rule's: one line each (for a :class:`ConversionError` listing them all)."""
    expected = {r.key for r in rules}
    problems = [f"unmapped key {k!r} {tuple(np.shape(state_dict[k]))}" for k in state_dict if k not in expected]
    problems += [f"missing key {r.key!r} (expected shape {r.shape})" for r in rules if r.key not in state_dict]
    problems += [f"key {r.key!r} has shape {tuple(np.shape(state_dict[r.key]))}, expected {r.shape}"
                 for r in rules if r.key in state_dict and tuple(np.shape(state_dict[r.key])) != r.shape]
    return problems


def convert_state_dict(state_dict: Mapping[str, Any], *, layout: str = "auto", act: str | None = None,
                       image_heads: int | None = None, text_heads: int | None = None,
                       open_clip_config: str | os.PathLike | Mapping | None = None,
                       source: str | os.PathLike | None = None) -> tuple[dict, dict, list[str]]:
    """A CLIP ViT state dict -> ``(model, params, notes)``.

    Args:
      state_dict: ``{name: array}`` (numpy, or anything ``np.asarray`` takes), e.g. from
        :func:`contrastive_jax.interop.read_state_dict`.
      layout: ``'auto'`` | ``'openai'`` | ``'open_clip'`` (see the module docstring).
      act / image_heads / text_heads / open_clip_config: what the weights cannot say.
      source: the file the weights were read from (evidence for the activation, see
        :func:`infer_activation`).

    Returns:
      ``model``: our ``config.model`` fields plus ``image_size`` and ``logit_bias`` (plain dict);
      ``params``: nested dict of float32 numpy arrays in our layout (unscanned layers);
      ``notes``: assumptions made.

    Raises:
      ConversionError: listing every key of the file that maps to nothing, every expected key
      that is missing and every tensor of an unexpected shape.
    """
    sd = {k: v for k, v in state_dict.items() if not _IGNORED_KEYS.match(k)}
    layout = detect_layout(sd) if layout == "auto" else layout
    _text_prefix(layout)  # validates the name
    model, notes = infer_model_config(sd, layout, act=act, image_heads=image_heads, text_heads=text_heads,
                                      open_clip_config=read_open_clip_config(open_clip_config), source=source)
    rules = _rules(model, layout, logit_bias=model["logit_bias"])
    problems = rule_problems(rules, sd)
    if problems:
        raise ConversionError(
            f"{len(problems)} problem(s) converting a CLIP ViT state dict ({layout} layout; image ViT width "
            f"{model['image']['width']} x {model['image']['depth']} layers, text width {model['text']['width']} x "
            f"{model['text']['depth']} layers):\n  " + "\n  ".join(problems))
    params: dict = {}
    for rule in rules:
        values = rule.to_ours(np.asarray(sd[rule.key]).astype(np.float32, copy=False))  # fp16/bf16 -> fp32
        for path, value in zip(rule.paths, values):
            _set(params, path, np.asarray(value, order="C"))
    if not model["logit_bias"]:
        _set(params, "bias", np.zeros((), np.float32))
    return model, params, notes


def run_config(model: Mapping[str, Any], *, vocab_path: str | None = None,
               open_clip_config: Mapping | None = None) -> ml_collections.ConfigDict:
    """The config groups a converted model needs: ``model`` and ``data`` (image size, text length,
    CLIP normalization, the CLIP BPE tokenizer rules). Merge onto ``default_config()``."""
    model = dict(model)
    image_size, logit_bias = model.pop("image_size"), model.pop("logit_bias")
    pre = dict((open_clip_config or {}).get("preprocess_cfg", {}) or {})
    c = ml_collections.ConfigDict()
    # float32 compute: a converted model gives the original's embeddings on any platform (the
    # default 'auto' would compute in bf16 on a GPU); fine-tuning may override model.dtype.
    c.model = dict(
        model, name="two_tower", head="linear", head_bias=False, max_scale=100.0,
        scale_init=math.log(1 / 0.07), bias_init=-10.0 if logit_bias else 0.0, dtype="float32")
    vocab = int(model["text"]["vocab_size"])
    c.data = dict(
        image_size=int(image_size), max_text_len=int(model["text"]["context_length"]),
        mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)),
        tokenizer=dict(kind="clip_bpe", path=os.path.abspath(vocab_path) if vocab_path else "", lowercase=True,
                       clean="clip", add_eos=True, bpe_merges=vocab - _BPE_NON_MERGE_IDS),
    )
    return c


def clip_tokenizer(vocab_path: str | os.PathLike, vocab_size: int, context_length: int):
    """CLIP's BPE tokenizer from a local merges file (e.g. ``bpe_simple_vocab_16e6.txt.gz``), with
    the first ``vocab_size - 514`` merges, so its ids are the checkpoint's (OpenAI: 48,894)."""
    from contrastive_jax.data.tokenizer import ClipBpeTokenizer, TextRules

    tok = ClipBpeTokenizer.from_file(vocab_path, max_len=int(context_length),
                                     rules=TextRules(lowercase=True, clean="clip", add_eos=True),
                                     num_merges=int(vocab_size) - _BPE_NON_MERGE_IDS)
    if tok.vocab_size != vocab_size:
        raise ValueError(f"{vocab_path}: gives a vocabulary of {tok.vocab_size} ids but the checkpoint's text "
                         f"tower has {vocab_size}: is it CLIP's merges file?")
    return tok


# -------------------------------------------------------------------------------------------------
# Export
# -------------------------------------------------------------------------------------------------

# (field, required value) of our model config that the CLIP layout can express.
_EXPORTABLE = [
    ("name", "two_tower"), ("head", "linear"), ("head_bias", False),
    ("image.name", "vit"), ("image.pool", "cls"), ("image.cls_posemb", True), ("image.norm_pre", True),
    ("image.patch_bias", False), ("image.posemb", "learn"), ("image.stem", "patch"),
    ("text.name", "transformer"), ("text.pool", "eos"), ("text.causal", True),
]


def _field(cfg, dotted: str, default=None):
    for name in dotted.split("."):
        if cfg is None or name not in cfg:
            return default
        cfg = cfg[name]
    return cfg


def unstack_layers(params: Mapping) -> dict:
    """Params with scanned encoders (``encoder/blocks/block`` leaves ``[depth, ...]``) ->
    ``encoder/block_i``; others are returned as they are (as plain nested dicts)."""
    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {k: walk(v) for k, v in tree.items() if k != "blocks"}
        if "blocks" in tree:
            stacked = tree["blocks"]["block"]
            depth = np.shape(jax.tree.leaves(stacked)[0])[0]
            for i in range(depth):
                out[f"block_{i}"] = jax.tree.map(lambda a, i=i: np.asarray(a)[i], stacked)
        return out
    return walk(params)


def stack_layers(params: Mapping) -> dict:
    """Inverse of :func:`unstack_layers`: ``encoder/block_i`` -> ``encoder/blocks/block`` ``[depth, ...]``."""
    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        blocks = sorted((int(k.split("_")[1]), k) for k in tree if re.fullmatch(r"block_\d+", k))
        out = {k: walk(v) for k, v in tree.items() if not re.fullmatch(r"block_\d+", k)}
        if blocks:
            layers = [tree[k] for _, k in blocks]
            out["blocks"] = {"block": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)}
        return out
    return walk(params)


def export_state_dict(params: Mapping, model_config: Mapping, image_size: int, *, layout: str = "openai",
                      dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Our two-tower CLIP params -> a PyTorch state dict of OpenAI's (or open_clip's) layout.

    Args:
      params: the model's params (nested dict / FrozenDict of arrays; scanned layers allowed).
      model_config: ``config.model`` of the model (must be the CLIP architecture, see ``_EXPORTABLE``).
      image_size: input resolution (``config.data.image_size``); sets the position table's size.
      layout: ``'openai'`` or ``'open_clip'``.
      dtype: of the written tensors (float32: exact; float16 as OpenAI's released files).

    Returns ``{key: numpy array}``, e.g. for :func:`contrastive_jax.interop.write_state_dict`;
    ``logit_bias`` is written only when the model's bias is not 0 (a sigmoid-loss model).
    """
    from contrastive_jax.models.config import defaults

    base = defaults()
    bad = [f"model.{f}={_field(model_config, f, _field(base, f))!r} (needs {v!r})" for f, v in _EXPORTABLE
           if _field(model_config, f, _field(base, f)) != v]
    if bad:
        raise ConversionError("this model has no OpenAI-CLIP layout equivalent: " + "; ".join(bad))
    params = unstack_layers(jax_to_numpy(params))
    image, text = model_config["image"], model_config["text"]
    model = dict(
        embed_dim=int(np.shape(params["image_proj"]["kernel"])[1]), image_size=int(image_size),
        image={k: image[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size")},
        text=dict({k: text[k] for k in ("width", "depth", "num_heads", "mlp_dim", "vocab_size")},
                  context_length=int(np.shape(params["text"]["pos_embedding"])[0])),
    )
    logit_bias = float(np.asarray(params["bias"])) != 0.0
    out = {}
    for rule in _rules(model, layout, logit_bias=logit_bias):
        values = [np.asarray(_get(params, p)) for p in rule.paths]
        out[rule.key] = np.asarray(rule.to_torch(*values), dtype=dtype, order="C")
    return out


def jax_to_numpy(tree: Any) -> dict:
    """Nested mapping of (jax or numpy) arrays -> nested dict of numpy arrays (flax boxes removed)."""
    return jax.tree.map(np.asarray, nn.meta.unbox(flax.core.unfreeze(tree)))
