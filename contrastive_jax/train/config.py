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
import contextlib
import importlib.util
import json
import logging
import math
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
    c.optim.name = "adamw"  # 'adamw' | 'lamb' | 'lars' | 'adafactor' | 'sgd' (with momentum) | 'muon'
    c.optim.lr = 1e-3  # peak learning rate
    c.optim.weight_decay = 0.1  # decoupled (AdamW-style), times the LR schedule
    c.optim.b1 = 0.9  # adamw/lamb first moment decay
    c.optim.b2 = 0.98  # adamw/lamb second moment decay
    c.optim.eps = 1e-6
    # adamw: dtype of the first moment, 'float32' | 'bfloat16' (halves that state; as big_vision's
    # momentum dtype). Params and the second moment stay float32.
    c.optim.mu_dtype = "float32"
    c.optim.momentum = 0.9  # sgd / lars
    c.optim.nesterov = False  # sgd / lars
    c.optim.lars_trust_coefficient = 0.001
    # muon: Newton-Schulz-orthogonalized momentum on the weight matrices (train/optim.py,
    # muon_dimension_numbers), AdamW with b1/b2/eps above on embeddings, norms and biases. Updates
    # are scaled to RMS muon_rms (Liu et al. 2025), so AdamW's lr and weight_decay carry over.
    c.optim.muon_beta = 0.95  # momentum
    c.optim.muon_nesterov = True
    c.optim.muon_ns_steps = 5  # Newton-Schulz iterations
    c.optim.muon_rms = 0.2
    c.optim.muon_exclude = ()  # regexes of matrix params left to AdamW (e.g. r'.*_proj/kernel')
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
    # - freeze_until: [(regex, steps)], first match wins: no change to the matching params during
    #   updates 0..steps-1, normal training after (SwAV's prototypes: [('prototypes', steps of
    #   one epoch)]). Unlike freeze, they keep optimizer state and get gradients.
    c.optim.freeze_until = []
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
    # helper C (issue 17): under 'skip', a run that skipped more than this fraction of its steps
    # ends with exit code 3 (its checkpoint and summary are still written).
    c.train.max_nonfinite_fraction = 0.5
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
    # helper C (issue 17): when the workdir's earlier run cannot continue with this config (its
    # model/dataset/tokenizer differ: WORKDIR/fingerprint.json, or no checkpoint is readable):
    # 'error' stops with a message naming why; 'restart' moves that run to WORKDIR/previous/<time>/
    # (nothing is deleted) and starts at step 0. A resumable workdir is resumed either way.
    c.checkpoint.on_mismatch = "error"

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
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error in the config file: {e.msg}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg=None)")
    try:
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # e.g. an unknown variant ('configs/quickstart.py:huge'): the file's own message names the
        # valid ones; a traceback through the config file would only hide it.
        detail = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ConfigError(f"{path}{':' + arg if arg is not None else ''}: {detail}") from None
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
        try:
            merge(cfg, config_file(path, arg or None), source=path)
        except TypeError as e:  # ml_collections refuses a value of another type than the field's
            raise ConfigError(f"{path}: {_one_line(e)}") from None
    for item in overrides:
        apply_override(cfg, item, source=f"command line (config from {source})")
    check_config(cfg, overridden=[item.partition("=")[0].strip() for item in overrides])
    return cfg


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _parse_value(text: str, current: Any, path: str = "") -> Any:
    """``text`` parsed as the type of ``current`` (the field's value at ``config.{path}``)."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"config.{path}: expected a bool (true/false), got {text!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)  # e.g. 1e4 for an int field; int() below keeps the type
        except ValueError:
            raise ConfigError(f"config.{path}: expected an integer (e.g. {current}), got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config.{path}: expected a number (e.g. {current}), got {text!r}") from None
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
                    node[part] = _parse_value(text, None, path) if last else ConfigDict()
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
            value = _parse_value(text, current, path)
            if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
                if not value.is_integer():
                    raise ConfigError(f"'{path}' is an integer field, got {text!r}")
                value = int(value)
            try:
                with node.unlocked():
                    node[part] = value
            except TypeError:  # ml_collections' type safety: another type than the field's
                raise ConfigError(f"config.{path}: expected a {type(current).__name__} like "
                                  f"{_literal(current)}, got {text!r}") from None
        else:
            node = node[part]


def _literal(value: Any) -> str:
    """A field's current value written as the Python literal an override would use."""
    return repr(value.to_dict() if isinstance(value, ConfigDict) else value)


# ----------------------------------------------------------------------------------------------
# Range and choice checks (cheap: no devices, no data; run by load_config and builder.validate)
# ----------------------------------------------------------------------------------------------

_MISSING = object()

# (field, test, what is valid). The test sees the field's value; a missing field is not checked
# (partial configs built by hand in notebooks).
_RANGES = (
    ("train.batch_size", lambda v: _is_int(v) and v > 0, "a positive integer (global batch)"),
    ("eval.batch_size", lambda v: _is_int(v) and v > 0, "a positive integer (global eval batch)"),
    ("train.microbatch_size", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    ("optim.lr", lambda v: v > 0, "a peak learning rate > 0, e.g. 1e-3"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v: v >= 0, ">= 0"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.muon_beta", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.muon_ns_steps", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("optim.muon_rms", lambda v: v > 0, "> 0 (the RMS of each matrix update, before the LR; 0.2 ~ AdamW's)"),
    ("optim.end_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.decay_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.rsqrt_timescale", lambda v: v > 0, "> 0 (steps)"),
    ("loss.block_size", lambda v: _is_int(v) and v > 0, "a positive integer"),
    ("data.image_size", lambda v: _is_int(v) and v > 0, "a positive integer (pixels)"),
    ("data.max_text_len", lambda v: _is_int(v) and v >= 2, "an integer >= 2 (tokens, EOS included)"),
    ("data.num_views", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("data.worker_count", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = main process)"),
    ("data.read_threads", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("data.max_bad_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.text_mask_prob", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.std", lambda v: len(v) == 3 and all(x > 0 for x in v), "three positive numbers (R, G, B)"),
    ("data.mean", lambda v: len(v) == 3, "three numbers (R, G, B)"),
    ("checkpoint.on_mismatch", lambda v: v in ("error", "restart"), "'error' or 'restart'"),  # helper C
    ("train.max_nonfinite_fraction", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),  # helper C
    ("checkpoint.keep", lambda v: _is_int(v) and v >= 1, "an integer >= 1 (checkpoints kept)"),
    ("eval.max_examples", lambda v: _is_int(v) and (v == -1 or v > 0), "-1 (the whole split) or > 0"),
    ("eval.recall_ks", lambda v: all(_is_int(k) and k > 0 for k in v), "positive integers"),
    ("eval.zero_shot_ks", lambda v: all(_is_int(k) and k > 0 for k in v), "positive integers"),
)

# Durations: -1 (any negative before) means "not set"; the schema's sentinel is -1 exactly.
_DURATIONS = (("train", "total"), ("train", "log_every"), ("optim", "warmup"), ("eval", "every"),
              ("checkpoint", "every"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choices() -> tuple:
    """(field, known values) of the enumerated fields, imported here: the tables live with the
    code that uses them (importing them loads jax, which a train run does anyway; not the data
    pipeline, which would pull in grain: it checks config.data.caption_policy itself)."""
    from contrastive_jax.data.tokenizer import CLEAN_MODES, TOKENIZER_KINDS
    from contrastive_jax.data.transforms import CROPS
    from contrastive_jax.losses import IMPLS, OBJECTIVES
    from contrastive_jax.models.build import DTYPES
    from contrastive_jax.models.layers import ATTENTION_IMPLS
    from contrastive_jax.train.optim import OPTIMIZERS, SCHEDULES

    return (("loss.name", tuple(sorted([*OBJECTIVES, "multi"]))), ("loss.impl", IMPLS), ("optim.name", OPTIMIZERS),
            ("optim.schedule", SCHEDULES), ("optim.decay_shape", ("linear", "cosine", "sqrt")),
            ("data.tokenizer.kind", TOKENIZER_KINDS), ("data.tokenizer.clean", CLEAN_MODES),
            ("data.augment.crop", CROPS),
            ("model.dtype", tuple(DTYPES)), ("optim.mu_dtype", ("float32", "bfloat16")),
            # helper G (issue 19): checked here too so that a typo is a one-line exit-2 error.
            ("model.image.attention_impl", ATTENTION_IMPLS), ("model.text.attention_impl", ATTENTION_IMPLS))


def _field(cfg: Any, path: str) -> Any:
    node = cfg
    for part in path.split("."):
        if not hasattr(node, "get") or part not in node:
            return _MISSING
        node = node[part]
    return node


def _range_problems(cfg: Any) -> list[str]:
    problems = []
    for path, ok, valid in _RANGES:
        value = _field(cfg, path)
        if value is _MISSING:
            continue
        try:
            good = bool(ok(value))
        except TypeError:  # e.g. a string where a number belongs
            good = False
        if not good:
            problems.append(f"config.{path}={_literal(value)} is invalid: must be {valid}")
    for path, known in _choices():
        value = _field(cfg, path)
        if value is not _MISSING and value not in known:
            problems.append(f"config.{path}={value!r} is unknown; valid: {', '.join(map(str, known))}")
    eval_group, data_group = _field(cfg, "eval"), _field(cfg, "data")
    if eval_group is not _MISSING and data_group is not _MISSING:
        from contrastive_jax.evaluate.runner import parse_evaluators  # pure: names and keys only

        try:
            parse_evaluators(eval_group, data_group)
        except (ValueError, TypeError, KeyError) as e:
            problems.append(" ".join(str(e).split()))
    augment = _field(cfg, "data.augment")
    if augment is not _MISSING:
        for key in sorted(k for k in augment.keys() if k.endswith("_prob")):
            if not isinstance(augment[key], (int, float)) or not 0 <= augment[key] <= 1:
                problems.append(f"config.data.augment.{key}={augment[key]!r} is invalid: must be a "
                                "probability in [0, 1]")
    return problems


def _mesh_problems(cfg: Any) -> list[str]:
    mesh = _field(cfg, "mesh")
    if mesh is _MISSING:
        return []
    example = "e.g. [('data', -1)] or [('data', 2), ('fsdp', 4)]"
    pairs_ok = isinstance(mesh, (list, tuple)) and len(mesh) > 0 and all(
        isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str) and _is_int(a[1])
        and (a[1] > 0 or a[1] == -1) for a in mesh)
    if not pairs_ok:
        return [f"config.mesh={_literal(mesh)} is invalid: must be a list of (axis_name, size) pairs, "
                f"size > 0 or -1 (= the remaining devices), {example}"]
    names = [a[0] for a in mesh]
    sizes = [a[1] for a in mesh]
    if len(set(names)) != len(names) or sizes.count(-1) > 1:
        return [f"config.mesh={_literal(mesh)} is invalid: axis names must be unique and at most one "
                f"size may be -1, {example}"]
    batch_axes = _field(cfg, "sharding.batch_axes")
    batch = _field(cfg, "train.batch_size")
    if batch_axes is _MISSING or not _is_int(batch) or batch <= 0:
        return []
    dp_sizes = [size for name, size in mesh if name in tuple(batch_axes)]
    if -1 not in dp_sizes:  # the data-parallel size is known without asking for the devices
        dp = math.prod(dp_sizes)
        for field in ("train.batch_size", "eval.batch_size"):
            value = _field(cfg, field)
            if _is_int(value) and value > 0 and value % dp:
                return [f"config.{field}={value} is not a multiple of the data-parallel size {dp} "
                        f"(config.mesh={_literal(mesh)}, batch axes {tuple(batch_axes)})"]
    return []


def _steps_of(group: Any, prefix: str, batch: int) -> tuple[str, float] | None:
    """``(unit, amount)`` of a duration in steps when it is computable without the dataset size
    (``('epochs', n)`` for epochs), None when not set."""
    for unit in ("steps", "examples", "epochs"):
        value = group.get(f"{prefix}_{unit}", -1)
        if value is not None and value >= 0:
            if unit == "examples":
                return "steps", math.ceil(value / batch)
            return unit, value
    return None


def _duration_problems(cfg: Any, overridden: Sequence[str], warn: bool, warnings: list[str]) -> list[str]:
    problems = []
    for group_name, prefix in _DURATIONS:
        group = _field(cfg, group_name)
        if group is _MISSING:
            continue
        for unit in ("steps", "epochs", "examples"):
            key = f"{prefix}_{unit}"
            value = group.get(key, -1)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or (value < 0 and value != -1):
                problems.append(f"config.{group_name}.{key}={value!r} is invalid: must be >= 0 "
                                "(or -1: not set)")
            elif prefix == "total" and value == 0:
                problems.append(f"config.{group_name}.{key}=0 is invalid: the run length must be > 0")
    batch = _field(cfg, "train.batch_size")
    train, optim = _field(cfg, "train"), _field(cfg, "optim")
    if problems or not _is_int(batch) or batch <= 0 or train is _MISSING or optim is _MISSING:
        return problems
    total, warmup = _steps_of(train, "total", batch), _steps_of(optim, "warmup", batch)
    if total and warmup and total[0] == warmup[0] and warmup[1] > total[1]:
        message = (f"the warmup (config.optim.warmup_{warmup[0]}: {warmup[1]:g} {warmup[0]}) is longer than the "
                   f"run (config.train.total_*: {total[1]:g} {total[0]})")
        if any(k.startswith("optim.warmup_") for k in overridden):
            problems.append(f"{message}: make it at most the run length")
        elif warn and not problems:
            # A warmup that comes from the config file while the run was shortened (a smoke run of
            # a few steps) is what tests and quick checks do; say so rather than refuse.
            warnings.append(f"{message}: the learning rate never reaches config.optim.lr")
    return problems


def _model_build_problems(cfg: Any) -> list[str]:
    """What the tower builders reject (``model.image.pool='bogus'; known: ...``), found by
    constructing the Flax modules: cheap, no parameters, no devices (the dtype is pinned to float32
    so ``'auto'`` does not query the backend before ``jax.distributed`` starts)."""
    if _field(cfg, "model") is _MISSING:
        return []
    from contrastive_jax import models
    from contrastive_jax.train.builder import model_config_for

    placeholder = type("_Vocab", (), {"vocab_size": 8})()  # vocab_size=-1 is resolved from the data later
    mcfg = model_config_for(cfg, placeholder)
    try:
        with mcfg.unlocked() if hasattr(mcfg, "unlocked") else contextlib.nullcontext():
            if "dtype" in mcfg:
                mcfg["dtype"] = "float32"
        models.build(mcfg)
    except ValueError as e:
        return [" ".join(str(e).split())]
    except Exception:  # anything else is the full builder's to report, with its context
        return []
    return []


def _objective_problems(cfg: Any) -> list[str]:
    """What the objective builder rejects (``config.loss.filip.token_fraction=2.0 is invalid``,
    ``loss.name='filip'`` without ``model.return_tokens``): building the objective is a closure
    over its options, no devices."""
    if _field(cfg, "loss") is _MISSING or _field(cfg, "model") is _MISSING:
        return []
    from contrastive_jax import losses

    try:
        # Any run length resolves 'multi' start fractions; the real one is the builder's.
        losses.make_objective(cfg.loss, None, None, model_config=cfg.model, train_steps=1000)
    except ValueError as e:
        return [" ".join(str(e).split())]
    except Exception:  # anything else is the full builder's to report, with its context
        return []
    return []


def _model_data_problems(cfg: Any) -> list[str]:
    problems = []
    size = _field(cfg, "data.image_size")
    image = _field(cfg, "model.image")
    model_name = _field(cfg, "model.name")
    if (_is_int(size) and size > 0 and image is not _MISSING and model_name != "n_tower"
            and image.get("name") == "vit" and _is_int(image.get("patch_size"))):
        p = int(image.patch_size)
        if p <= 0:
            problems.append(f"config.model.image.patch_size={p} is invalid: must be a positive integer")
        elif size % p:
            lower, upper = size // p * p, (size // p + 1) * p
            valid = f"{lower} or {upper}" if lower else f"{upper}"
            problems.append(f"config.data.image_size={size} is not a multiple of config.model.image.patch_size="
                            f"{p}: use a multiple of {p} (e.g. {valid})")
        elif image.get("stem") == "conv" and p & (p - 1):
            problems.append(f"config.model.image.patch_size={p} must be a power of two with "
                            "config.model.image.stem='conv'")
    tok = _field(cfg, "data.tokenizer")
    if tok is not _MISSING:
        path = str(tok.get("path") or "")
        what = {"sentencepiece": "a SentencePiece .model file", "clip_bpe": "CLIP's BPE merges file"}.get(
            tok.get("kind"), "a file")
        # An empty path is left to the tokenizer builder: benchmarks build such models untokenized.
        if path and "://" not in path and not os.path.isfile(os.path.expanduser(path)):
            problems.append(f"config.data.tokenizer.path={path!r}: no such file (kind {tok.kind!r} needs "
                            f"{what} or a saved tokenizer .json)")
    data, batch = _field(cfg, "data"), _field(cfg, "train.batch_size")
    if data is not _MISSING and data.get("name") == "shapes" and _is_int(batch) and batch > 0:
        split = data.get("train_split", "train")
        size = data.get(f"num_{split}", None)
        if _is_int(size) and size < batch:
            problems.append(f"config.train.batch_size={batch} is larger than the {split} split of 'shapes' "
                            f"(config.data.num_{split}={size}): use a batch size <= {size} or more examples")
    return problems


def check_config(cfg: Any, overridden: Sequence[str] = (), *, warn: bool = True) -> None:
    """Rejects a config whose fields are out of range or unknown, before anything is built.

    Checks what needs neither devices nor data: numeric ranges, enumerated fields, the mesh's
    shape, durations (``-5`` is an error, ``-1`` "not set"), a warmup longer than the run, the
    image size against the ViT patch size, the tokenizer file, batch size against a fixed mesh.
    Device- and data-dependent checks are :func:`contrastive_jax.train.builder.validate` and the
    data pipeline's.

    Args:
      overridden: the dotted keys set on the command line; a warmup longer than the run is an
        error when the warmup was set there, a warning when it comes from the file (a run
        shortened for a smoke test).
      warn: log that warning (False: a second check of a config already loaded).

    Raises:
      ConfigError: one line naming every bad field, its value and what would be valid.
    """
    warnings: list[str] = []
    problems = (_mesh_problems(cfg) + _range_problems(cfg) + _duration_problems(cfg, overridden, warn, warnings)
                + _model_data_problems(cfg))
    problems = problems or _model_build_problems(cfg) or _objective_problems(cfg)  # only once otherwise in range
    if problems:
        raise ConfigError("; ".join(problems))
    for message in warnings:  # only for a config that is otherwise fine: an error stays one line
        logging.getLogger(__name__).warning("%s", message)
