"""Run configuration: the schema of every field, config-file loading and command-line overrides.

A run is described by one ``ml_collections.ConfigDict``. Experiment files under ``configs/`` define
``get_config(arg=None)`` and return a ConfigDict holding only the fields they change or add; it is
merged onto :func:`default_config`, which is the schema: a key that is not in the schema is an
error that names the key and the file (the classic silent typo ``config.optim.lrr = 1e-3`` would
otherwise train with the default learning rate).

Command-line overrides use the dotted form ``--config.optim.lr=3e-4``; the value is parsed with
the type of the field it replaces (``True``/``False`` for bools, Python literals for lists and
tuples).
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Any, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Sub-dicts whose keys are free-form (the schema cannot enumerate them): nothing is rejected below
# these paths.
_FREE_FORM = ("model.image.extra", "model.text.extra")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names key and source."""


def default_config() -> ConfigDict:
    """Every field a run understands, with its default.

    Groups: ``model``, ``loss``, ``data``, ``optim``, ``mesh``, ``sharding``, ``train``, ``eval``,
    ``checkpoint``, ``log``. Durations are in steps here (the training-system issue adds epochs and
    examples, converted in one place).
    """
    c = ConfigDict()
    c.seed = 0

    # --- Parallelism -----------------------------------------------------------------------
    # Mesh axes as (name, size); one size may be -1 (= all remaining devices).
    c.mesh = [("data", -1)]
    c.sharding = ConfigDict()
    # Mesh axes the global batch is split over (all of them that exist in the mesh).
    c.sharding.batch_axes = ("data", "fsdp")
    # (regex over '/'-joined param path, placement), first match wins. Placement: 'replicate',
    # 'fsdp' (largest dim divisible by the 'fsdp' axis size is sharded over it), or a tuple of
    # mesh-axis names / None, one per array dim.
    c.sharding.rules = [(".*", "fsdp")]

    # --- Data ------------------------------------------------------------------------------
    c.data = ConfigDict()
    c.data.name = "shapes"  # built-in procedurally rendered dataset
    c.data.data_dir = os.path.join("~", ".cache", "contrastive_jax", "tfds")
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_size = 64
    c.data.num_train = 20000  # shapes: examples in the train split
    c.data.num_validation = 1000
    c.data.num_test = 2000
    c.data.dataset_seed = 0  # shapes: seed of the procedural generator
    c.data.shuffle_seed = 0
    c.data.worker_count = 0  # grain worker processes (0 = in the main process)
    c.data.max_text_len = 16  # tokens, including EOS
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.5, 0.5, 0.5)

    # --- Model -----------------------------------------------------------------------------
    c.model = ConfigDict()
    c.model.name = "two_tower"
    c.model.embed_dim = 128  # shared embedding dimension
    c.model.scale_init = math.log(1 / 0.07)  # CLIP: log(1/0.07); SigLIP: log(10)
    c.model.bias_init = 0.0  # SigLIP: -10
    c.model.max_scale = 100.0  # exp(log_scale) is clamped here, as CLIP clamps at 100
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.image = ConfigDict()
    c.model.image.name = "vit"
    c.model.image.patch_size = 8
    c.model.image.width = 128
    c.model.image.depth = 4
    c.model.image.num_heads = 4
    c.model.image.mlp_dim = 512
    c.model.image.pool = "gap"  # 'gap' | 'cls'
    c.model.image.posemb = "learn"  # 'learn' | 'sincos2d' (fixed)
    c.model.image.stem = "patch"  # 'patch' (linear p x p) | 'conv' (3x3 stride-2 convs)
    c.model.image.extra = ConfigDict()
    c.model.text = ConfigDict()
    c.model.text.name = "transformer"
    c.model.text.vocab_size = -1  # -1: taken from the tokenizer
    c.model.text.width = 128
    c.model.text.depth = 2
    c.model.text.num_heads = 4
    c.model.text.mlp_dim = 512
    c.model.text.causal = True  # CLIP-style causal, pooled at the EOS token
    c.model.text.extra = ConfigDict()

    # --- Loss ------------------------------------------------------------------------------
    c.loss = ConfigDict()
    c.loss.name = "softmax"  # 'softmax' (CLIP InfoNCE) | 'sigmoid' (SigLIP)
    c.loss.impl = "dense"  # 'dense' | 'chunked' | 'ring'
    c.loss.block_size = 1024

    # --- Optimizer -------------------------------------------------------------------------
    c.optim = ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
    c.optim.end_lr_fraction = 0.0
    c.optim.grad_clip_norm = 1.0  # <= 0 disables
    # Params matching any regex get no weight decay (norms, biases, the loss's scale/bias).
    c.optim.no_decay = (r".*(bias|scale)$", r".*norm.*", r".*(pos_embedding|cls)$")

    # --- Training --------------------------------------------------------------------------
    c.train = ConfigDict()
    c.train.batch_size = 256  # global batch, across all processes
    c.train.total_steps = 1000
    c.train.log_every_steps = 50
    # Stop this invocation after this many steps (with a checkpoint) even if total_steps is not
    # reached; re-running resumes. For fixed-length job slots. -1: no limit.
    c.train.max_steps_per_run = -1

    # --- Evaluation ------------------------------------------------------------------------
    c.eval = ConfigDict()
    c.eval.every_steps = 500  # <= 0: only at the end
    c.eval.batch_size = 512
    c.eval.max_examples = -1  # -1: the whole split
    c.eval.recall_ks = (1, 5)

    # --- Checkpointing ---------------------------------------------------------------------
    c.checkpoint = ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 2

    # --- Logging ---------------------------------------------------------------------------
    c.log = ConfigDict()
    c.log.progress = True  # tqdm progress bar on stderr
    c.log.tensorboard = True
    return c


# ----------------------------------------------------------------------------------------------
# Merging and overrides
# ----------------------------------------------------------------------------------------------


def _is_free_form(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in _FREE_FORM)


def merge(base: ConfigDict, update: ConfigDict | dict, *, source: str, prefix: str = "") -> ConfigDict:
    """Recursively copies ``update`` onto ``base`` (in place); unknown keys raise ConfigError."""
    items = update.items() if isinstance(update, (dict, ConfigDict)) else []
    for key, value in items:
        path = f"{prefix}{key}"
        if key not in base:
            if _is_free_form(prefix.rstrip(".")):
                with base.unlocked():
                    base[key] = value
                continue
            raise ConfigError(
                f"unknown config key '{path}' in {source}; known keys at this level: "
                f"{', '.join(sorted(base.keys()))}"
            )
        if isinstance(base[key], ConfigDict) and isinstance(value, (dict, ConfigDict)):
            merge(base[key], value, source=source, prefix=path + ".")
        else:
            with base.unlocked():
                base[key] = value
    return base


def _load_module_config(path: str, arg: str | None) -> ConfigDict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_cj_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg=None)")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(cfg, (ConfigDict, dict)):
        raise ConfigError(f"{path}: get_config must return a ConfigDict, got {type(cfg).__name__}")
    return cfg


def load_config(spec: str | None, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads ``path[:arg]``, merges it onto the defaults, then applies ``key=value`` overrides.

    Args:
      spec: ``configs/quickstart.py`` or ``configs/quickstart.py:tiny``; None means defaults only.
      overrides: strings ``'optim.lr=3e-4'`` (the ``--config.`` prefix already removed).

    Raises:
      ConfigError: naming the unknown key and the file (or ``command line``) it came from.
    """
    cfg = default_config()
    source = "the defaults"
    if spec:
        path, _, arg = spec.partition(":")
        source = path
        merge(cfg, _load_module_config(path, arg or None), source=path)
    for item in overrides:
        apply_override(cfg, item, source=f"command line (config from {source})")
    return cfg


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a bool, got {text!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            return int(text)
        except ValueError:
            return float(text)  # e.g. 1e4 for an int field; int() below keeps the type
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(cfg: ConfigDict, item: str, *, source: str = "command line") -> None:
    """Applies one ``a.b.c=value`` override; unknown keys raise ConfigError naming them."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} from {source} must look like key=value")
    key, _, text = item.partition("=")
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if part not in node:
            if _is_free_form(".".join(parts[:i])):
                with node.unlocked():
                    node[part] = _parse_value(text, None) if last else ConfigDict()
                node = node[part]
                continue
            raise ConfigError(
                f"unknown config key '{path}' (from {source}); known keys at this level: "
                f"{', '.join(sorted(node.keys()))}"
            )
        if last:
            current = node[part]
            if isinstance(current, ConfigDict):
                raise ConfigError(f"'{path}' is a group, not a value; set one of its fields")
            value = _parse_value(text, current)
            if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
                if not value.is_integer():
                    raise ConfigError(f"'{path}' is an integer field, got {text!r}")
                value = int(value)
            with node.unlocked():
                node[part] = value
        else:
            node = node[part]
