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
import json
import os
from typing import Any, Sequence

import ml_collections

from contrastive_jax.config_tree import merge_onto
from contrastive_jax.data import config as data_config
from contrastive_jax.evaluate import config as eval_config
from contrastive_jax.losses import config as loss_config
from contrastive_jax.models import config as model_config

ConfigDict = ml_collections.ConfigDict

# Sub-dicts whose keys are free-form (the schema cannot enumerate them): nothing is rejected below
# these paths.
_FREE_FORM = ("model.image.extra", "model.text.extra", "model.towers", "model.teacher")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names key and source."""


def default_config() -> ConfigDict:
    """Every field a run understands, with its default.

    Groups: ``model``, ``loss``, ``data``, ``optim``, ``mesh``, ``sharding``, ``train``, ``eval``,
    ``checkpoint``, ``log``. Durations are in steps here (the training-system issue adds epochs and
    examples, converted in one place).
    """
    # long function: the schema itself, one field and its comment per line; splitting it would
    # only scatter the fields a reader looks up together.
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
    # Logical-axis placement (contrastive_jax/parallel/logical.py): None = use the regex rules above;
    # a preset 'data' | 'fsdp' | 'tensor' | 'fsdp_tensor', or [(logical_name, mesh_axes), ...].
    # When set it places the parameters (the regex rules are then unused) and shards activations.
    c.sharding.logical_rules = None

    # --- Data, model, loss: each package owns its group's schema -----------------------------
    c.data = data_config.defaults()
    c.model = model_config.defaults()
    c.loss = loss_config.defaults()

    # --- Optimizer -------------------------------------------------------------------------
    c.optim = ConfigDict()
    c.optim.name = "adamw"  # 'adamw' | 'lamb' | 'lars' | 'adafactor' | 'sgd' (with momentum)
    c.optim.lr = 1e-3  # peak learning rate
    c.optim.weight_decay = 0.1  # decoupled (AdamW-style), times the LR schedule
    c.optim.b1 = 0.9  # adamw/lamb first moment decay
    c.optim.b2 = 0.98  # adamw/lamb second moment decay
    c.optim.eps = 1e-6
    c.optim.momentum = 0.9  # sgd / lars
    c.optim.nesterov = False  # sgd / lars
    c.optim.lars_trust_coefficient = 0.001
    c.optim.adafactor_factored = True  # factored second moments (memory ~ rows + cols)
    c.optim.schedule = "warmup_cosine"  # see train/optim.py: warmup_cosine | warmup_linear | rsqrt | constant | wsd
    # Warmup length: set at most one of the three (none set: no warmup).
    c.optim.warmup_steps = -1
    c.optim.warmup_epochs = -1.0
    c.optim.warmup_examples = -1
    c.optim.end_lr_fraction = 0.0  # final LR of the decaying schedules, as a fraction of lr
    c.optim.rsqrt_timescale = 10000  # rsqrt: lr * sqrt(timescale / max(step, timescale)) after warmup
    # wsd (warmup-stable-decay): the last decay_fraction of the run decays with decay_shape
    # ('linear' | 'cosine' | 'sqrt', i.e. 1 - sqrt(progress)); the stable phase is at lr.
    c.optim.decay_fraction = 0.2
    c.optim.decay_shape = "sqrt"
    c.optim.grad_clip_norm = 1.0  # global-norm clipping of the gradient; <= 0 disables
    # Regex masks over '/'-joined parameter paths (re.fullmatch):
    # - no_decay: no weight decay (norms, biases, the loss's scale/bias, position embeddings).
    c.optim.no_decay = (r".*(bias|scale)$", r".*norm.*", r".*(pos_embedding|cls)$")
    # - freeze: no update, no optimizer state and no gradient computed (LiT: ('image/.*',)).
    c.optim.freeze = ()
    # - lr_multipliers: [(regex, multiplier)], first match wins; unmatched params use 1.0.
    c.optim.lr_multipliers = []
    # EMA of the parameters (0 = off); evaluated and checkpointed alongside the params.
    c.optim.ema_decay = 0.0

    # --- Training --------------------------------------------------------------------------
    c.train = ConfigDict()
    c.train.batch_size = 256  # global batch, across all processes
    # Run length: set exactly one (converted to steps in train/durations.py).
    c.train.total_steps = -1
    c.train.total_epochs = -1.0
    c.train.total_examples = -1
    # Logging interval (none set: every 50 steps).
    c.train.log_every_steps = -1
    c.train.log_every_epochs = -1.0
    c.train.log_every_examples = -1
    # Exact large-batch training (GradCache, Gao et al. 2021): the global batch is processed in
    # micro-batches of this many examples (global, across devices); 0 = off. See
    # train/gradcache.py for 'gradcache' (exact contrastive gradient over the WHOLE batch) vs
    # 'average' (mean of per-micro-batch losses; changes a contrastive objective).
    c.train.microbatch_size = 0
    c.train.accumulation = "gradcache"  # 'gradcache' | 'average'
    # A step whose loss or gradient is NaN/inf is never applied. 'stop': raise naming the step
    # and the metric; 'skip': count it (train/nonfinite_steps) and continue.
    c.train.nonfinite = "stop"
    # Stop this invocation after this many steps (with a checkpoint) even if total_steps is not
    # reached; re-running resumes. For fixed-length job slots. -1: no limit.
    c.train.max_steps_per_run = -1
    # Wall-clock budget of this invocation in minutes (<= 0: none). When reached, like SIGTERM:
    # save a checkpoint and exit with code 75 (the CLI), so a scheduler requeues the job.
    c.train.deadline_minutes = -1.0

    c.eval = eval_config.defaults()

    # --- Checkpointing ---------------------------------------------------------------------
    c.checkpoint = ConfigDict()
    # Interval (none set: every 1000 steps); the last step and preemption always save.
    c.checkpoint.every_steps = -1
    c.checkpoint.every_epochs = -1.0
    c.checkpoint.every_examples = -1
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True  # orbax writes in the background while training continues
    # Start from other weights when the workdir has no checkpoint: 'PATH[:SUBTREE[,SUBTREE...]]'.
    # PATH is a workdir, its checkpoints/ dir or one step dir; SUBTREE a '/'-joined param path
    # prefix (e.g. 'image,image_proj' for LiT). '' = from scratch.
    c.checkpoint.init_from = ""
    # Where the loaded parameters go in the new model: '' = the same paths; 'teacher' = under
    # 'teacher/' (model.name='distill' loads its frozen teacher this way).
    c.checkpoint.init_into = ""

    # --- Logging ---------------------------------------------------------------------------
    c.log = ConfigDict()
    c.log.progress = True  # tqdm progress bar on stderr
    c.log.tensorboard = True
    # (first, last) steps to trace with the JAX profiler into WORKDIR/profile; () = off.
    c.log.profile_steps = ()
    # Peak FLOP/s of ONE device for MFU; <= 0: a known accelerator's datasheet value, else (CPU)
    # measured with a matmul at start-up.
    c.log.peak_flops_per_device = -1.0
    return c


# ----------------------------------------------------------------------------------------------
# Merging and overrides
# ----------------------------------------------------------------------------------------------


def _is_free_form(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in _FREE_FORM)


def merge(base: ConfigDict, update: ConfigDict | dict, *, source: str, prefix: str = "") -> ConfigDict:
    """Recursively copies ``update`` onto ``base`` (in place); unknown keys raise ConfigError
    naming the key and ``source``."""
    def unknown(path, group):
        return ConfigError(f"unknown config key '{path}' in {source}; known keys at this level: "
                           f"{', '.join(sorted(group.keys()))}")

    return merge_onto(base, update, path=prefix.rstrip("."), is_free_form=_is_free_form, unknown=unknown)


def config_file(path: str, arg: str | None = None) -> ConfigDict:
    """``get_config(arg)`` of the config file at ``path``, as the file returns it (NOT merged onto
    the defaults). Config files that build on another one call it, e.g.
    ``config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'quickstart.py'), arg)``.

    A ``.json`` path (a run's ``config.json``, e.g. of a converted checkpoint) is read as the
    config itself.

    Raises:
      ConfigError: the file is missing, defines no ``get_config`` or returns something else.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if path.endswith(".json"):
        # A run's (or converted model's) resolved config.json, reused as a config file.
        if arg is not None:
            raise ConfigError(f"{path}: a .json config takes no ':arg'")
        try:
            with open(path, encoding="utf-8") as fh:
                return ConfigDict(json.load(fh))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
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
        merge(cfg, config_file(path, arg or None), source=path)
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
