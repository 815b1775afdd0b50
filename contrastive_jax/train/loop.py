"""The outer training loop: the only place with side effects (data I/O, logging, checkpoints).

``train(config, workdir)`` builds the mesh, data, tokenizer, model and optimizer from the config,
restores the latest checkpoint in ``workdir`` if there is one (state AND data-iterator position),
runs the jitted step, evaluates every ``eval.every_steps`` and at the end, and writes
``WORKDIR/summary.json``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax import data as data_lib
from contrastive_jax import evaluate as eval_lib
from contrastive_jax import models
from contrastive_jax.parallel.mesh import (
    batch_axes_of,
    data_parallel_size,
    host_batch_to_global,
    make_mesh,
    to_host,
)
from contrastive_jax.train.checkpoint import Checkpointer
from contrastive_jax.train.metrics import MetricWriter
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.state import create_train_state
from contrastive_jax.train.step import make_train_step

log = logging.getLogger("contrastive_jax")

MODEL_INPUTS = ("image", "text")


class NonFiniteLossError(FloatingPointError):
    """Raised when a step's loss is NaN or infinite; the message names the step."""


def validate(config: Any, mesh) -> None:
    """Rejects configs that cannot run, before anything is compiled, naming the fields."""
    axes = batch_axes_of(mesh, config.sharding.batch_axes)
    dp = data_parallel_size(mesh, config.sharding.batch_axes)
    problems = []
    for field in ("train.batch_size", "eval.batch_size"):
        group, key = field.split(".")
        value = config[group][key]
        if value % dp:
            problems.append(f"config.{field}={value} is not divisible by the data-parallel size {dp} (mesh axes {axes})")
        if value % jax.process_count():
            problems.append(f"config.{field}={value} is not divisible by the process count {jax.process_count()}")
    if config.train.total_steps <= 0:
        problems.append(f"config.train.total_steps must be positive, got {config.train.total_steps}")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def model_config_for(config: Any, tokenizer: Any):
    """The model config with data-dependent fields (vocabulary size) filled in."""
    model_config = copy.deepcopy(config.model)
    if model_config.text.vocab_size == -1:
        model_config.text.vocab_size = int(tokenizer.vocab_size)
    return model_config


def _progress(total: int, initial: int, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def train(config: Any, workdir: str) -> dict:
    """Runs (or resumes) the training run described by ``config`` in ``workdir``.

    Returns:
      The summary dict also written to ``WORKDIR/summary.json``: final evaluation metrics,
      ``steps``, ``examples_seen``, ``wall_time_s`` (this invocation), ``resumed_from_step``.
    """
    t_start = time.time()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(config.mesh)
    batch_axes = batch_axes_of(mesh, config.sharding.batch_axes)
    validate(config, mesh)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as fh:
            fh.write(config.to_json_best_effort(indent=2))

    total_steps = int(config.train.total_steps)
    global_batch = int(config.train.batch_size)

    # Data and tokenizer. The tokenizer is stored with the run so evaluation and later loading
    # tokenize exactly as training did.
    tokenizer = data_lib.build_tokenizer(config.data)
    if jax.process_index() == 0:
        tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    train_iter = data_lib.make_train_iterator(
        config.data, tokenizer=tokenizer, global_batch_size=global_batch, seed=int(config.data.shuffle_seed)
    )

    # Model, optimizer and state, created directly sharded.
    model = models.build(model_config_for(config, tokenizer))
    tx, schedule = make_optimizer(config.optim, total_steps)
    size = int(config.data.image_size)
    sample = (
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, int(config.data.max_text_len)), jnp.int32),
    )
    state, shardings = create_train_state(
        model, tx, sample, seed=int(config.seed), rules=config.sharding.rules, mesh=mesh
    )
    train_step = make_train_step(model, tx, schedule, config.loss, mesh, batch_axes, shardings)
    evaluator = eval_lib.EvalRunner(config, model, mesh, batch_axes, shardings.params, tokenizer)

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep
    )
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
        state, data_state = ckpt.restore(resumed_from, state, shardings)
        train_iter.set_state(data_state)
        log.warning("resumed from checkpoint at step %d in %s", resumed_from, ckpt.directory)
        if jax.process_index() == 0:
            print(f"Resuming from step {resumed_from} ({ckpt.directory})", file=sys.stderr, flush=True)
    start_step = int(to_host(state.step))

    writer = MetricWriter(workdir, tensorboard=bool(config.log.tensorboard))
    pbar = _progress(total_steps, start_step, bool(config.log.progress))
    log_every = max(int(config.train.log_every_steps), 1)
    eval_every = int(config.eval.every_steps)
    pending_losses: list[tuple[int, jax.Array]] = []
    t_window, steps_window = time.time(), 0
    stop_at = total_steps
    if int(config.train.max_steps_per_run) > 0:
        stop_at = min(total_steps, start_step + int(config.train.max_steps_per_run))

    def check_finite():
        # Deferred so the host does not block on every step; the exact bad step is still found.
        for s, loss in pending_losses:
            value = float(to_host(loss))
            if not math.isfinite(value):
                raise NonFiniteLossError(f"non-finite loss {value} at step {s} (config: {workdir}/config.json)")
        pending_losses.clear()

    try:
        for step in range(start_step, stop_at):
            host_batch = next(train_iter)
            batch = host_batch_to_global({k: host_batch[k] for k in MODEL_INPUTS}, mesh, batch_axes)
            state, metrics = train_step(state, batch)
            done = step + 1
            steps_window += 1
            pending_losses.append((done, metrics["loss"]))
            if done % log_every == 0 or done == stop_at:
                check_finite()
                host = {k: float(v) for k, v in to_host(metrics).items()}
                elapsed = time.time() - t_window
                host["examples_per_sec"] = steps_window * global_batch / max(elapsed, 1e-9)
                host["steps_per_sec"] = steps_window / max(elapsed, 1e-9)
                host["examples_seen"] = done * global_batch
                writer.write(done, {f"train/{k}": v for k, v in host.items()})
                if pbar is not None:
                    pbar.set_postfix(loss=f"{host['loss']:.4f}", ex_s=f"{host['examples_per_sec']:.0f}", refresh=False)
                    # Advanced only here, where the host has waited for the device: with async
                    # dispatch, per-dispatch updates would show bursts and a wrong ETA.
                    pbar.update(done - pbar.n)
                t_window, steps_window = time.time(), 0
            if eval_every > 0 and done % eval_every == 0 and done != total_steps:
                results = evaluator(state.params)
                writer.write(done, {f"eval/{k}": v for k, v in results.items()})
                t_window, steps_window = time.time(), 0
            ckpt.save(done, state, train_iter.get_state(), force=(done == stop_at))
        check_finite()
    finally:
        if pbar is not None:
            pbar.close()
        ckpt.wait()

    if stop_at < total_steps:
        writer.close()
        ckpt.close()
        return {"complete": False, "stopped_at_step": stop_at, "resumed_from_step": resumed_from,
                "wall_time_s": time.time() - t_start}

    results = evaluator(state.params)
    writer.write(total_steps, {f"eval/{k}": v for k, v in results.items()})
    writer.close()
    ckpt.close()
    summary = {
        "complete": True,
        "eval": {k: float(v) for k, v in results.items()},
        "eval_split": config.data.eval_split,
        "steps": total_steps,
        "examples_seen": total_steps * global_batch,
        "resumed_from_step": resumed_from,
        "wall_time_s": time.time() - t_start,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return summary
