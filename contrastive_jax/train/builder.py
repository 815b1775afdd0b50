"""One builder from a run config to everything a training step needs.

:func:`build_training` is the single place where a config becomes a mesh, a model, an optimizer,
the state's shardings and the jitted step. The loop (:mod:`contrastive_jax.train.loop`), the
benchmarks (``tools/bench_train.py``, ``tools/bench_batch.py``) and the tests all call it, so a
benchmark measures exactly the step a run executes: logical-axis sharding, freezing, EMA,
micro-batching and on-device normalization included.

:func:`build_model` is its model half (model, input order and input shapes from the config),
shared with reloading a run (:mod:`contrastive_jax.train.restore`, ``contrastive_jax.load``).
The config is the one source of input shapes: ``models.sample_inputs`` reads them from
``config.data`` (image size, text length, views) or from the N-tower entries' ``input_shape``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from contrastive_jax import losses, models
from contrastive_jax.parallel.mesh import batch_axes_of, data_parallel_size, host_batch_to_global, make_mesh
from contrastive_jax.train.config import ConfigError, check_config
from contrastive_jax.train.durations import Durations, resolve_durations
from contrastive_jax.train.gradcache import ACCUMULATIONS
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.state import TrainState, abstract_train_state, init_train_state
from contrastive_jax.train.step import Placement, StepOptions, make_train_step, model_modalities

NONFINITE_POLICIES = ("stop", "skip")


def validate(config: Any, mesh: Mesh) -> None:
    """Rejects configs that cannot run, before anything is compiled, naming the fields.

    Runs :func:`contrastive_jax.train.config.check_config` (ranges and choices) first, then the
    checks that need the mesh.

    Raises:
      ConfigError: (a ValueError) ``invalid config:`` and every problem, on one line.
    """
    check_config(config, warn=False)
    axes = batch_axes_of(mesh, config.sharding.batch_axes)
    dp = data_parallel_size(mesh, config.sharding.batch_axes)
    problems = []
    for field in ("train.batch_size", "eval.batch_size"):
        group, key = field.split(".")
        value = config[group][key]
        if value <= 0 or value % dp:
            problems.append(f"config.{field}={value} is not a positive multiple of the data-parallel size {dp} "
                            f"(mesh axes {axes})")
        if value % jax.process_count():
            problems.append(f"config.{field}={value} is not divisible by the process count {jax.process_count()}")
    mb = int(config.train.microbatch_size)
    batch = int(config.train.batch_size)
    if mb < 0:
        problems.append(f"config.train.microbatch_size={mb} must be >= 0 (0 = off)")
    elif mb:
        if batch % mb:
            problems.append(f"config.train.microbatch_size={mb} does not divide config.train.batch_size={batch}")
        if mb % dp:
            problems.append(f"config.train.microbatch_size={mb} is not a multiple of the data-parallel size {dp} "
                            f"(mesh axes {axes}): every micro-batch is spread over all devices")
    if config.train.accumulation not in ACCUMULATIONS:
        problems.append(f"config.train.accumulation={config.train.accumulation!r}; known: {', '.join(ACCUMULATIONS)}")
    if config.train.nonfinite not in NONFINITE_POLICIES:
        problems.append(f"config.train.nonfinite={config.train.nonfinite!r}; known: {', '.join(NONFINITE_POLICIES)}")
    if not 0.0 <= float(config.optim.ema_decay) < 1.0:
        problems.append(f"config.optim.ema_decay={config.optim.ema_decay} must be in [0, 1)")
    profile = tuple(config.log.profile_steps)
    if profile and (len(profile) != 2 or not 0 < profile[0] <= profile[1]):
        problems.append(f"config.log.profile_steps={profile} must be (first, last) with 0 < first <= last")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def model_config_for(config: Any, tokenizer: Any):
    """The model config with data-dependent fields filled in: every ``vocab_size = -1`` (the
    two-tower ``model.text``, any ``model.towers.<name>``, and the same in a distillation
    ``model.teacher``) becomes the tokenizer's size. ``tokenizer=None`` (a model directory saved
    without one): a copy of ``config.model`` as it is."""
    model_config = copy.deepcopy(config.model)
    if tokenizer is None:
        return model_config
    teacher = model_config.get("teacher") or {}
    # Text groups default to -1 (from the tokenizer) when the field is absent; towers only when set.
    text_groups = [g for g in (model_config.get("text"), model_config.get("decoder"), teacher.get("text"))
                   if g is not None]
    towers = list(model_config.get("towers", {}).values()) + list(teacher.get("towers", {}).values())
    for group, missing in [(g, -1) for g in text_groups] + [(g, 0) for g in towers]:
        if hasattr(group, "get") and group.get("vocab_size", missing) == -1:
            with group.unlocked() if hasattr(group, "unlocked") else contextlib.nullcontext():
                group["vocab_size"] = int(tokenizer.vocab_size)
    return model_config


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    """A model built from a run config.

    Attributes:
      model: the unbound flax module.
      modalities: the batch keys it consumes, in call order (CLIP: ``('image', 'text')``).
      inputs: per modality, a batch-of-1 ``jax.ShapeDtypeStruct`` of what the model is applied
        to (images float32: uint8 batches are normalized before the model sees them).
    """

    model: nn.Module
    modalities: tuple[str, ...]
    inputs: tuple[jax.ShapeDtypeStruct, ...]


def build_model(config: Any, tokenizer: Any = None) -> BuiltModel:
    """``config.model`` (``vocab_size = -1`` resolved from ``tokenizer``) -> :class:`BuiltModel`,
    its input shapes from the config (``models.sample_inputs``)."""
    model_config = model_config_for(config, tokenizer)
    model = models.build(model_config)
    modalities = model_modalities(model)
    sample = models.sample_inputs(model_config, config.data, modalities=modalities)
    inputs = tuple(jax.ShapeDtypeStruct(s.shape, jnp.float32 if s.dtype == jnp.uint8 else s.dtype) for s in sample)
    return BuiltModel(model, modalities, inputs)


@dataclasses.dataclass(frozen=True)
class Training:
    """Everything built from a run config that the loop, the benchmarks and the tests run.

    Attributes:
      config: the run config it was built from.
      mesh, batch_axes: the device mesh and the mesh axes the batch is split over.
      model, modalities, inputs: see :class:`BuiltModel`.
      tx, schedule: the optimizer and its learning-rate schedule.
      durations: the run's lengths and intervals in steps.
      abstract_state: the state's shapes and dtypes (``jax.ShapeDtypeStruct``; nothing allocated).
      shardings: the state's NamedShardings (same structure).
      step: the jitted ``train_step(state, batch) -> (state, metrics)``
        (:func:`contrastive_jax.train.step.make_train_step`).
      objective: the objective the step optimizes (``losses.make_objective(config.loss, ...)``);
        a :class:`contrastive_jax.losses.StatefulObjective` also initializes ``state.loss_state``.
    """

    config: Any
    mesh: Mesh
    batch_axes: tuple[str, ...]
    model: nn.Module
    modalities: tuple[str, ...]
    inputs: tuple[jax.ShapeDtypeStruct, ...]
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    durations: Durations
    abstract_state: TrainState
    shardings: TrainState
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    objective: Any = None

    def init_state(self, seed: int | None = None) -> TrainState:
        """A fresh state created directly in its sharded layout (``seed``: default ``config.seed``)."""
        seed = int(self.config.seed) if seed is None else int(seed)
        return init_train_state(self.model, self.tx, self.inputs, self.shardings, seed=seed,
                                ema=self.abstract_state.ema_params is not None, objective=self.objective)

    def batch_spec(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """The model inputs of a global batch as the data pipeline delivers them (images uint8
        with ``config.data.normalize_on_device``), e.g. for ``step.lower(abstract_state, spec)``."""
        b = int(self.config.train.batch_size) if batch_size is None else int(batch_size)
        uint8 = bool(self.config.data.get("normalize_on_device", False))
        spec = {}
        for name, s in zip(self.modalities, self.inputs):
            dtype = jnp.uint8 if uint8 and name in ("image", "image_views") else s.dtype
            spec[name] = jax.ShapeDtypeStruct((b, *s.shape[1:]), dtype)
        return spec

    def device_batch(self, host_batch: dict) -> dict:
        """A host batch (this process's rows) -> global arrays split over the batch axes.
        Strings (captions) and other non-numeric fields stay on the host."""
        arrays = {k: v for k, v in host_batch.items() if hasattr(v, "dtype") and v.dtype.kind in "biuf"}
        return host_batch_to_global(arrays, self.mesh, self.batch_axes)


def build_training(config: Any, mesh: Mesh | None = None, *, tokenizer: Any = None,
                   durations: Durations | None = None, train_examples: int | None = None,
                   donate: bool = True, jit: bool = True) -> Training:
    """Builds the training of ``config``: validated, with the state's layout and the jitted step.

    Args:
      config: a full run config (:func:`contrastive_jax.train.load_config`).
      mesh: default ``make_mesh(config.mesh)``.
      tokenizer: resolves ``vocab_size = -1`` text towers (None: they must be set).
      durations: the run's lengths in steps; default resolved from the config with
        ``train_examples`` (the training split's size, needed only for ``*_epochs`` fields).
      donate: the step donates the state it is given (the caller must not reuse it).
      jit: the step is jitted (False: the pure Python step, for composition).

    Raises:
      ValueError: a config that cannot run (every problem named, before anything compiles).
    """
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    validate(config, mesh)
    batch_axes = batch_axes_of(mesh, config.sharding.batch_axes)
    durations = resolve_durations(config, train_examples) if durations is None else durations
    built = build_model(config, tokenizer)
    tx, schedule = make_optimizer(config.optim, durations.total, warmup_steps=durations.warmup)
    options = StepOptions.from_config(config)
    objective = losses.make_objective(config.loss, mesh, batch_axes, model_config=config.model,
                                      train_steps=durations.total)
    # An objective's teacher (momentum encoder) lives in the EMA slot.
    ema = options.ema_decay > 0 or bool(getattr(objective, "teacher", False))
    abstract, shardings = abstract_train_state(built.model, tx, built.inputs, rules=config.sharding.rules, mesh=mesh,
                                               ema=ema, sharding=config.sharding, objective=objective,
                                               batch_axes=batch_axes)
    step = make_train_step(built.model, (tx, schedule), objective,
                           Placement(mesh, batch_axes, shardings, config.sharding), options, donate=donate, jit=jit)
    return Training(config=config, mesh=mesh, batch_axes=batch_axes, model=built.model, modalities=built.modalities,
                    inputs=built.inputs, tx=tx, schedule=schedule, durations=durations, abstract_state=abstract,
                    shardings=shardings, step=step, objective=objective)
