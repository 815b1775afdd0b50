"""Reload a finished (or running) training run from its workdir: config, model, params, tokenizer.

Used by standalone evaluation, the notebook API and ``init_from``-style tooling. Everything needed
is in the workdir: ``config.json`` (the resolved run config, which also gives the model's input
shapes), ``tokenizer.json`` and ``checkpoints/<step>/``. Nothing here imports the loop, grain,
TFDS or tqdm.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from contrastive_jax.data.tokenizer import load_tokenizer as _read_tokenizer
from contrastive_jax.parallel.logical import param_shardings
from contrastive_jax.parallel.mesh import make_mesh
from contrastive_jax.train.builder import build_model
from contrastive_jax.train.checkpoint import quiet_background_failures, step_dirs
from contrastive_jax.train.config import default_config, merge


def load_config_json(workdir: str) -> ml_collections.ConfigDict:
    """The run config saved in ``WORKDIR/config.json``, merged onto today's defaults."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    return merge(default_config(), saved, source=path)


def load_tokenizer(workdir: str):
    """The tokenizer the run trained with (``WORKDIR/tokenizer.json``); None for a model directory
    written without one."""
    path = os.path.join(workdir, "tokenizer.json")
    return _read_tokenizer(path) if os.path.isfile(path) else None


def restore_params(workdir: str, abstract_params: Any, shardings: Any, *, step: int | None = None,
                   ema: bool = False) -> tuple[int, Any]:
    """Reads only the parameters (or the EMA parameters) of a checkpoint, straight into place.

    The optimizer state is not read, so this also loads model directories that hold parameters
    only (:func:`write_model_dir`). With ``step=None`` the newest checkpoint that restores is used
    (an unreadable one is skipped with a warning, as the trainer does).

    Returns ``(step, params)``.
    """
    checkpoints = os.path.join(workdir, "checkpoints")
    steps = step_dirs(checkpoints) if step is None else [int(step)]
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpoints}")
    key = "ema_params" if ema else "params"
    target = {key: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_params, shardings)}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    errors = []
    quiet_background_failures()  # a cut checkpoint: one error, not ~100 "Event loop is closed" tracebacks
    for s in steps:
        path = os.path.join(checkpoints, str(s), "state")
        try:
            with ocp.PyTreeCheckpointer() as reader:
                restored = reader.restore(path, args=args)
            return s, restored[key]
        except Exception as e:  # noqa: BLE001 - any failure means "try the previous checkpoint"
            if step is not None:
                what = "EMA parameters (config.optim.ema_decay was 0?)" if ema else "parameters"
                raise ValueError(f"cannot read the {what} of {path}: {type(e).__name__}: {str(e)[:400]}") from e
            errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
            warnings.warn(f"checkpoint {path} is unreadable ({errors[-1]}); trying the previous one")
    raise FileNotFoundError(f"no readable checkpoint in {checkpoints}:\n  " + "\n  ".join(errors))


def load_run(workdir: str, step: int | None = None, *, mesh=None, ema: bool = False):
    """Loads ``(config, model, params, tokenizer)`` of the run (or model directory) in ``workdir``
    (:func:`load_run_and_step` without the step)."""
    return load_run_and_step(workdir, step, mesh=mesh, ema=ema)[:4]


def load_run_and_step(workdir: str, step: int | None = None, *, mesh=None, ema: bool = False):
    """Loads ``(config, model, params, tokenizer, step)`` of the run (or model directory) in ``workdir``.

    Args:
      step: checkpoint step (None: the newest one that restores).
      mesh: where to place the params (None: replicated on this process's first device).
      ema: return the EMA parameters (the run must have kept them).

    Returns:
      ``config`` (ConfigDict), ``model`` (unbound flax module), ``params`` (pytree of float32
      jax.Arrays on ``mesh``), ``tokenizer`` (None for a model directory written without one),
      ``step`` (int: the checkpoint actually restored; with ``step=None`` an older one when the
      newest is unreadable).
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = load_config_json(workdir)
    tokenizer = load_tokenizer(workdir)
    built = build_model(config, tokenizer)
    if mesh is None:
        mesh = make_mesh([("data", 1)], jax.local_devices()[:1])
    # Shapes only: nothing is initialized, the checkpoint is read straight into place.
    abstract = jax.eval_shape(lambda *xs: built.model.init(jax.random.key(0), *xs), *built.inputs)["params"]
    shardings = param_shardings(abstract, config.sharding, mesh)
    used, params = restore_params(workdir, nn.meta.unbox(abstract), shardings, step=step, ema=ema)
    return config, built.model, params, tokenizer, int(used)


def write_model_dir(directory: str, config: Any, params: Any, tokenizer: Any = None) -> str:
    """Writes a directory that :func:`load_run`, ``contrastive_jax.load``, ``contrastive-jax eval
    --checkpoint`` and ``checkpoint.init_from`` all read: ``config.json``, ``tokenizer.json`` (if
    given) and ``checkpoints/0/state`` holding ``{'params': params}``.

    Args:
      config: a full run config (e.g. ``default_config()`` merged with a converted model's groups).
      params: the model's parameters (numpy or jax arrays, unboxed).
    Returns the directory's absolute path.
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    step_dir = os.path.join(directory, "checkpoints", "0")
    if os.path.exists(step_dir):
        raise FileExistsError(f"{step_dir} exists; choose an empty directory")
    build_model(config, tokenizer)  # a config that cannot build a model is refused before anything is written
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        fh.write(config.to_json_best_effort(indent=2))
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
    # The same item names as the trainer's checkpoints ('state' + 'data'), so every reader of a
    # run's checkpoints reads this too.
    manager = ocp.CheckpointManager(os.path.join(directory, "checkpoints"), item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    try:
        params = jax.tree.map(jnp.asarray, params)
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                                data=ocp.args.JsonSave({})))
        manager.wait_until_finished()
    finally:
        manager.close()
    return directory
