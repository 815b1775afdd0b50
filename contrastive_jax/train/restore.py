"""Reload a finished (or running) training run from its workdir: config, model, params, tokenizer.

Used by standalone evaluation, the notebook API and ``init_from``-style tooling. Everything needed
is in the workdir: ``config.json`` (the resolved run config), ``tokenizer.json``, ``inputs.json``
(per-example input shapes) and ``checkpoints/<step>/``.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from contrastive_jax import data as data_lib
from contrastive_jax import models
from contrastive_jax.parallel.mesh import make_mesh
from contrastive_jax.train.checkpoint import Checkpointer
from contrastive_jax.train.config import default_config, merge
from contrastive_jax.train.loop import INPUTS_FILE, model_config_for
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.state import abstract_train_state


def _to_config_dict(value: Any) -> Any:
    if isinstance(value, dict):
        return ml_collections.ConfigDict({k: _to_config_dict(v) for k, v in value.items()})
    return value


def load_config_json(workdir: str) -> ml_collections.ConfigDict:
    """The run config saved in ``WORKDIR/config.json``, merged onto today's defaults."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    return merge(default_config(), _to_config_dict(saved), source=path)


def load_tokenizer(workdir: str):
    """The tokenizer the run trained with (``WORKDIR/tokenizer.json``)."""
    return data_lib.load_tokenizer(os.path.join(workdir, "tokenizer.json"))


def load_run(workdir: str, step: int | None = None, *, mesh=None, ema: bool = False):
    """Loads ``(config, model, params, tokenizer)`` of the run in ``workdir``.

    Args:
      step: checkpoint step (None: the newest one that restores).
      mesh: where to place the params (None: a mesh over this process's first device).
      ema: return the EMA parameters (the run must have kept them).

    Returns:
      ``config`` (ConfigDict), ``model`` (unbound flax module), ``params`` (pytree of float32
      jax.Arrays on ``mesh``), ``tokenizer``.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = load_config_json(workdir)
    tokenizer = load_tokenizer(workdir)
    model = models.build(model_config_for(config, tokenizer))
    with open(os.path.join(workdir, INPUTS_FILE), encoding="utf-8") as fh:
        spec = json.load(fh)
    sample = [jax.ShapeDtypeStruct((1, *spec[k][0]), jnp.dtype(spec[k][1])) for k in spec]
    if mesh is None:
        mesh = make_mesh([("data", 1)], jax.local_devices()[:1])
    # The schedule does not change the state's structure, so its length does not matter here.
    tx, _ = make_optimizer(config.optim, 1, warmup_steps=0)
    # Shapes only: nothing is initialized, the checkpoint is read straight into place.
    state, shardings = abstract_train_state(model, tx, sample, rules=config.sharding.rules, mesh=mesh,
                                            ema=float(config.optim.ema_decay) > 0, sharding=config.sharding)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=1 << 30, async_save=False)
    try:
        if step is None:
            restored = ckpt.restore_latest_good(state, shardings, quarantine=False)
            if restored is None:
                raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
            _, state, _ = restored
        else:
            state, _ = ckpt.restore(step, state, shardings)
    finally:
        ckpt.close()
    if ema:
        if state.ema_params is None:
            raise ValueError(f"the run in {workdir} kept no EMA parameters (config.optim.ema_decay=0)")
        return config, model, state.ema_params, tokenizer
    return config, model, state.params, tokenizer
