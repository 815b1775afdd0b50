"""The outer training loop: the only place with side effects (data I/O, logging, checkpoints).

``train(config, workdir)`` builds the mesh, data, tokenizer, model and optimizer from the config,
restores the newest GOOD checkpoint in ``workdir`` if there is one (state, EMA, RNG, step AND the
data-iterator position; an unreadable checkpoint is set aside and the previous one used) or
initializes from ``checkpoint.init_from``, runs the jitted step, evaluates every eval interval and
at the end, and writes ``WORKDIR/summary.json``.

Stopping early, safely: SIGTERM (a preemption notice) or ``train.deadline_minutes`` makes the loop
save a checkpoint at the current step and return ``{"complete": False, "preempted": reason}``; the
CLI then exits with :data:`EXIT_PREEMPTED` (75) so a scheduler requeues the job, and the next run
resumes from that step. With a fixed config and seed the resumed run ends bitwise identical to an
uninterrupted one (CPU).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from contrastive_jax import data as data_lib
from contrastive_jax import evaluate as eval_lib
from contrastive_jax import models
from contrastive_jax.parallel.distributed import any_process, barrier
from contrastive_jax.parallel.mesh import (
    batch_axes_of,
    data_parallel_size,
    host_batch_to_global,
    make_mesh,
    to_host,
)
from contrastive_jax.train.checkpoint import Checkpointer, load_params_from
from contrastive_jax.train.durations import Durations, resolve_durations
from contrastive_jax.train.flops import compiled_flops, peak_flops_per_device
from contrastive_jax.train.gradcache import ACCUMULATIONS
from contrastive_jax.train.metrics import MetricWriter
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.state import create_train_state
from contrastive_jax.train.step import make_train_step, model_modalities

log = logging.getLogger("contrastive_jax")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — requeue and resume
NONFINITE_POLICIES = ("stop", "skip")
INPUTS_FILE = "inputs.json"  # per-example shapes/dtypes of the model inputs (for reloading)


class NonFiniteLossError(FloatingPointError):
    """Raised (policy ``stop``) when a step's loss or gradient is NaN/inf; names step and metric."""


def validate(config: Any, mesh) -> None:
    """Rejects configs that cannot run, before anything is compiled, naming the fields."""
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
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


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
    text_groups = [g for g in (model_config.get("text"), teacher.get("text")) if g is not None]
    towers = list(model_config.get("towers", {}).values()) + list(teacher.get("towers", {}).values())
    for group, missing in [(g, -1) for g in text_groups] + [(g, 0) for g in towers]:
        if hasattr(group, "get") and group.get("vocab_size", missing) == -1:
            with group.unlocked() if hasattr(group, "unlocked") else contextlib.nullcontext():
                group["vocab_size"] = int(tokenizer.vocab_size)
    return model_config


def _progress(total: int, initial: int, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


class StopRequest:
    """SIGTERM and wall-clock deadline, agreed across processes.

    The signal handler only sets a flag (it runs between bytecodes of the main thread); the loop
    polls :meth:`poll` after each step, so the checkpoint is written from a consistent state.
    """

    def __init__(self, deadline_minutes: float, t_start: float):
        self.reason: str | None = None
        self._deadline = t_start + 60.0 * deadline_minutes if deadline_minutes and deadline_minutes > 0 else None
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.reason = self.reason or "SIGTERM"

    def poll(self) -> str | None:
        if self.reason is None and self._deadline is not None and time.time() >= self._deadline:
            self.reason = "deadline"
        local = self.reason
        # Every process must stop at the same step (saving is collective).
        if any_process(local is not None):
            self.reason = local or "stop requested by another process"
        return self.reason

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _write_json(path: str, payload: Any) -> None:
    if jax.process_index() == 0:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)


def write_inputs_spec(workdir: str, modalities: Sequence[str], sample: Sequence[jax.ShapeDtypeStruct]) -> None:
    """``WORKDIR/inputs.json``: each modality's per-example shape and dtype (batch dim dropped)."""
    _write_json(os.path.join(workdir, INPUTS_FILE),
                {k: [list(s.shape[1:]), str(s.dtype)] for k, s in zip(modalities, sample)})


def read_inputs_spec(workdir: str) -> list[jax.ShapeDtypeStruct]:
    """The model's inputs for a batch of 1, in the order :func:`write_inputs_spec` wrote them."""
    with open(os.path.join(workdir, INPUTS_FILE), encoding="utf-8") as fh:
        spec = json.load(fh)
    return [jax.ShapeDtypeStruct((1, *shape), jnp.dtype(dtype)) for shape, dtype in spec.values()]


def _prepare_data(config: Any) -> int:
    """Builds/opens the dataset (process 0 first: others would race it on a shared disk) and
    returns the training split's size."""
    if jax.process_index() == 0:
        size = len(data_lib.build_dataset(config.data)[config.data.train_split])
    barrier("dataset-prepared")
    if jax.process_index() != 0:
        size = len(data_lib.build_dataset(config.data)[config.data.train_split])
    return size


def _sample_inputs(host_batch: dict, modalities: tuple[str, ...]) -> list[jax.ShapeDtypeStruct]:
    # uint8 images (data.normalize_on_device) reach the model as float32.
    return [jax.ShapeDtypeStruct((1,) + tuple(host_batch[k].shape[1:]),
                                 jnp.float32 if host_batch[k].dtype == jnp.uint8 else host_batch[k].dtype)
            for k in modalities]


def _device_batch(host_batch: dict, mesh, batch_axes) -> dict:
    # Strings (captions) and other non-array fields stay on the host.
    arrays = {k: v for k, v in host_batch.items() if hasattr(v, "dtype") and v.dtype.kind in "biuf"}
    return host_batch_to_global(arrays, mesh, batch_axes)


def train(config: Any, workdir: str) -> dict:
    """Runs (or resumes) the training run described by ``config`` in ``workdir``.

    Returns:
      The summary dict also written to ``WORKDIR/summary.json`` when the run completes: final
      evaluation metrics (``eval``, and ``eval_ema`` with an EMA), ``steps``, ``examples_seen``,
      ``wall_time_s`` (this invocation), ``resumed_from_step``. A run that stops early returns
      ``complete: False`` with ``stopped_at_step`` and, for SIGTERM / deadline, ``preempted``.

    Raises:
      NonFiniteLossError: policy ``stop`` and a NaN/inf loss or gradient (the message names the
        step and the metric).
      ValueError: a config that cannot run (the message names the fields).
    """
    t_start = time.time()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(config.mesh)
    batch_axes = batch_axes_of(mesh, config.sharding.batch_axes)
    validate(config, mesh)
    stop = StopRequest(float(config.train.deadline_minutes), t_start)

    train_examples = _prepare_data(config)
    durations: Durations = resolve_durations(config, train_examples)
    total_steps = durations.total
    global_batch = int(config.train.batch_size)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as fh:
            fh.write(config.to_json_best_effort(indent=2))

    # Data and tokenizer. The tokenizer is stored with the run so evaluation and later loading
    # tokenize exactly as training did.
    tokenizer = data_lib.build_tokenizer(config.data)
    if jax.process_index() == 0:
        tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    train_iter = data_lib.make_train_iterator(
        config.data, tokenizer=tokenizer, global_batch_size=global_batch, seed=int(config.data.shuffle_seed)
    )

    # Model, optimizer and state, created directly sharded. Input shapes come from one batch
    # (the iterator is rewound, so the first step still sees it).
    model = models.build(model_config_for(config, tokenizer))
    modalities = model_modalities(model)
    rewind = train_iter.get_state()
    sample = _sample_inputs(next(train_iter), modalities)
    train_iter.set_state(rewind)
    write_inputs_spec(workdir, modalities, sample)
    tx, schedule = make_optimizer(config.optim, total_steps, warmup_steps=durations.warmup)
    ema_decay = float(config.optim.ema_decay)
    state, shardings = create_train_state(
        model, tx, sample, seed=int(config.seed), rules=config.sharding.rules, mesh=mesh, ema=ema_decay > 0,
        sharding=config.sharding,
    )
    train_step = make_train_step(
        model, tx, schedule, config.loss, mesh, batch_axes, shardings,
        freeze=tuple(config.optim.freeze), microbatch_size=int(config.train.microbatch_size),
        accumulation=config.train.accumulation, ema_decay=ema_decay, model_config=config.model,
        image_mean=tuple(config.data.mean), image_std=tuple(config.data.std), sharding_config=config.sharding,
    )
    evaluator = eval_lib.EvalRunner(config, model, mesh, batch_axes, shardings.params, tokenizer,
                                    default_every_steps=durations.eval_every)

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=durations.checkpoint_every, keep=config.checkpoint.keep,
        async_save=bool(config.checkpoint.async_save),
    )
    resumed_from = None
    restored = ckpt.restore_latest_good(state, shardings) if ckpt.all_steps() else None
    if restored is not None:
        resumed_from, state, data_state = restored
        train_iter.set_state(data_state)
        log.warning("resumed from checkpoint at step %d in %s", resumed_from, ckpt.directory)
        if jax.process_index() == 0:
            print(f"Resuming from step {resumed_from} ({ckpt.directory})", file=sys.stderr, flush=True)
    elif config.checkpoint.init_from:
        loaded, taken = load_params_from(config.checkpoint.init_from, state.params, shardings.params,
                                         into=str(config.checkpoint.get("init_into", "")))
        params = jax.tree.map(lambda new, old: old if new is None else new, loaded, state.params,
                              is_leaf=lambda x: x is None)
        ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
        state = state.replace(params=params, ema_params=ema)
        if jax.process_index() == 0:
            print(f"Initialized {len(taken)} parameters from {config.checkpoint.init_from}", file=sys.stderr, flush=True)
    start_step = int(to_host(state.step))

    writer = MetricWriter(workdir, tensorboard=bool(config.log.tensorboard))
    pbar = _progress(total_steps, start_step, bool(config.log.progress))
    log_every = max(durations.log_every, 1)
    nonfinite_policy = config.train.nonfinite
    pending: list[tuple[int, dict]] = []
    t_window, steps_window = time.time(), 0
    stop_at = total_steps
    if int(config.train.max_steps_per_run) > 0:
        stop_at = min(total_steps, start_step + int(config.train.max_steps_per_run))
    profile = tuple(int(s) for s in config.log.profile_steps)
    step_flops, peak = 0.0, 0.0
    compiled = None
    preempted = None

    def check_finite():
        # Deferred so the host does not block on every step; the exact bad step is still named.
        for s, m in pending:
            if float(to_host(m["finite"])) > 0:
                continue
            loss, gnorm = float(to_host(m["loss"])), float(to_host(m["grad_norm"]))
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient (grad_norm={gnorm})"
            if nonfinite_policy == "stop":
                raise NonFiniteLossError(
                    f"non-finite {what} at step {s}; the update was not applied. Last checkpoint: step "
                    f"{ckpt.latest_step()} in {ckpt.directory} (config: {workdir}/config.json; "
                    "config.train.nonfinite='skip' skips such steps instead)")
            log.warning("step %d skipped: non-finite %s", s, what)
            if jax.process_index() == 0:
                print(f"WARNING: step {s} skipped: non-finite {what}", file=sys.stderr, flush=True)
        pending.clear()

    try:
        for step in range(start_step, stop_at):
            host_batch = next(train_iter)
            batch = _device_batch(host_batch, mesh, batch_axes)
            if compiled is None:
                # Compiled ahead of time once, to read the step's FLOPs for MFU.
                compiled = train_step.lower(state, batch).compile()
                step_flops = compiled_flops(compiled)
                peak = peak_flops_per_device(float(config.log.peak_flops_per_device)) if step_flops else 0.0
            if profile and step + 1 == profile[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            state, metrics = compiled(state, batch)
            done = step + 1
            steps_window += 1
            pending.append((done, {k: metrics[k] for k in ("finite", "loss", "grad_norm")}))
            if profile and done == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            if done % log_every == 0 or done == stop_at:
                check_finite()
                host = {k: float(v) for k, v in to_host(metrics).items()}
                elapsed = time.time() - t_window
                step_time = elapsed / max(steps_window, 1)
                host["step_time_s"] = step_time
                host["examples_per_sec"] = global_batch / max(step_time, 1e-9)
                host["examples_seen"] = done * global_batch
                host["epoch"] = done / durations.steps_per_epoch if durations.steps_per_epoch else 0.0
                if step_flops and peak:
                    host["mfu"] = step_flops / step_time / peak
                if hasattr(train_iter, "stats"):
                    host.update({f"data/{k}": v for k, v in train_iter.stats().items()})
                writer.write(done, {f"train/{k}": v for k, v in host.items()})
                if pbar is not None:
                    pbar.set_postfix(loss=f"{host['loss']:.4f}", ex_s=f"{host['examples_per_sec']:.0f}", refresh=False)
                    # Advanced only here, where the host has waited for the device: with async
                    # dispatch, per-dispatch updates would show bursts and a wrong ETA.
                    pbar.update(done - pbar.n)
                t_window, steps_window = time.time(), 0
            if done != total_steps and evaluator.due(done):
                _evaluate(evaluator, state, writer, done, step=done)
                t_window, steps_window = time.time(), 0
            preempted = stop.poll()
            if preempted or ckpt.should_save(done) or done == stop_at:
                # A non-finite step under policy 'stop' must not be followed by a save.
                check_finite()
                ckpt.save(done, state, train_iter.get_state(), force=True)
            if preempted:
                stop_at = done
                break
        check_finite()
    finally:
        stop.close()
        if pbar is not None:
            pbar.close()
        ckpt.wait()

    if stop_at < total_steps:
        writer.close()
        ckpt.close()
        result = {"complete": False, "stopped_at_step": stop_at, "resumed_from_step": resumed_from,
                  "wall_time_s": time.time() - t_start}
        if preempted:
            result["preempted"] = preempted
            if jax.process_index() == 0:
                print(f"Stopped at step {stop_at} ({preempted}); checkpoint saved, re-run to resume",
                      file=sys.stderr, flush=True)
        return result

    results = _evaluate(evaluator, state, writer, total_steps)
    writer.close()
    ckpt.close()
    if config.eval.get("write_report", False):
        # Every process calls it (the report may evaluate); process 0 writes the files.
        eval_lib.write_report(workdir, evaluator, state.params)
    summary = {
        "complete": True,
        "eval": {k: float(v) for k, v in results.items() if not k.startswith("ema/")},
        "eval_split": config.data.eval_split,
        "steps": total_steps,
        "examples_seen": total_steps * global_batch,
        "nonfinite_steps": int(to_host(state.nonfinite_steps)),
        "resumed_from_step": resumed_from,
        "wall_time_s": time.time() - t_start,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
    }
    if state.ema_params is not None:
        summary["eval_ema"] = {k[len("ema/"):]: float(v) for k, v in results.items() if k.startswith("ema/")}
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def _evaluate(evaluator, state, writer: MetricWriter, log_step: int, *, step: int | None = None) -> dict:
    """Evaluates the params (and the EMA params, as ``ema/...``) and logs ``eval/...``.

    ``step``: the evaluators due at this step (None: all of them, the final evaluation).
    """
    results = dict(evaluator(state.params, step=step))
    if state.ema_params is not None:
        results.update({f"ema/{k}": v for k, v in evaluator(state.ema_params, step=step).items()})
    writer.write(log_step, {f"eval/{k}": v for k, v in results.items()})
    return results
