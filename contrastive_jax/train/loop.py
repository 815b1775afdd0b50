"""The outer training loop: the only place with side effects (data I/O, logging, checkpoints).

``train(config, workdir)`` prepares the data and tokenizer, builds everything else with
:func:`contrastive_jax.train.build_training` (the same builder the benchmarks use), restores the
newest GOOD checkpoint in ``workdir`` if there is one (state, EMA, RNG, step AND the data-iterator
position; an unreadable checkpoint is set aside and the previous one used) or initializes from
``checkpoint.init_from``, runs the jitted step, evaluates every eval interval and at the end, and
writes ``WORKDIR/summary.json``.

Stopping early, safely: SIGTERM (a preemption notice) or ``train.deadline_minutes`` makes the loop
save a checkpoint at the current step and return ``{"complete": False, "preempted": reason}``; the
CLI then exits with :data:`EXIT_PREEMPTED` (75) so a scheduler requeues the job, and the next run
resumes from that step. With a fixed config and seed the resumed run ends bitwise identical to an
uninterrupted one (CPU).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax import data as data_lib
from contrastive_jax import evaluate as eval_lib
from contrastive_jax.parallel.distributed import any_process, barrier
from contrastive_jax.parallel.mesh import make_mesh, to_host
from contrastive_jax.train.builder import NONFINITE_POLICIES, Training, build_training, model_config_for, validate
from contrastive_jax.train.checkpoint import Checkpointer, load_params_from
from contrastive_jax.train.durations import resolve_durations
from contrastive_jax.train.flops import compiled_flops, peak_flops_per_device
from contrastive_jax.train.metrics import MetricWriter

log = logging.getLogger("contrastive_jax")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — requeue and resume

__all__ = ["EXIT_PREEMPTED", "NONFINITE_POLICIES", "NonFiniteLossError", "StopRequest", "model_config_for", "train",
           "validate"]


class NonFiniteLossError(FloatingPointError):
    """Raised (policy ``stop``) when a step's loss or gradient is NaN/inf; names step and metric."""


def _progress(total: int, initial: int, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def _say(message: str) -> None:
    """A line on stderr from process 0 (progress notes the user should see)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


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


class NonFiniteGuard:
    """Checks the ``finite`` metric of the steps since the last check (deferred, so the host does
    not block on every step; the exact bad step is still named) and applies
    ``config.train.nonfinite``: ``'stop'`` raises :class:`NonFiniteLossError`, ``'skip'`` warns."""

    def __init__(self, policy: str, ckpt: Checkpointer, workdir: str):
        self.policy, self.ckpt, self.workdir = policy, ckpt, workdir
        self.pending: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, {k: metrics[k] for k in ("finite", "loss", "grad_norm")}))

    def check(self) -> None:
        for s, m in self.pending:
            if float(to_host(m["finite"])) > 0:
                continue
            loss, gnorm = float(to_host(m["loss"])), float(to_host(m["grad_norm"]))
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient (grad_norm={gnorm})"
            if self.policy == "stop":
                raise NonFiniteLossError(
                    f"non-finite {what} at step {s}; the update was not applied. Last checkpoint: step "
                    f"{self.ckpt.latest_step()} in {self.ckpt.directory} (config: {self.workdir}/config.json; "
                    "config.train.nonfinite='skip' skips such steps instead)")
            log.warning("step %d skipped: non-finite %s", s, what)
            _say(f"WARNING: step {s} skipped: non-finite {what}")
        self.pending.clear()


def _write_json(path: str, payload: Any) -> None:
    if jax.process_index() == 0:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)


def _prepare_data(config: Any) -> int:
    """Builds/opens the dataset (process 0 first: others would race it on a shared disk) and
    returns the training split's size."""
    if jax.process_index() == 0:
        size = len(data_lib.build_dataset(config.data)[config.data.train_split])
    barrier("dataset-prepared")
    if jax.process_index() != 0:
        size = len(data_lib.build_dataset(config.data)[config.data.train_split])
    return size


@dataclasses.dataclass
class _Run:
    """One invocation's training, set up: what :func:`_run_steps` and :func:`_finish` share."""

    config: Any
    workdir: str
    training: Training
    state: Any
    train_iter: Any
    evaluator: Any
    ckpt: Checkpointer
    writer: MetricWriter
    resumed_from: int | None
    t_start: float


def _start(config: Any, workdir: str, t_start: float) -> _Run:
    """Data, tokenizer, the built training and its state (restored, initialized from
    ``checkpoint.init_from``, or fresh)."""
    mesh = make_mesh(config.mesh)
    validate(config, mesh)  # before the dataset is generated: a bad config costs nothing
    durations = resolve_durations(config, _prepare_data(config))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as fh:
            fh.write(config.to_json_best_effort(indent=2))
    # The tokenizer is stored with the run so evaluation and later loading tokenize exactly as
    # training did.
    tokenizer = data_lib.build_tokenizer(config.data)
    if jax.process_index() == 0:
        tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    train_iter = data_lib.make_train_iterator(config.data, tokenizer=tokenizer,
                                              global_batch_size=int(config.train.batch_size),
                                              seed=int(config.data.shuffle_seed))
    training = build_training(config, mesh, tokenizer=tokenizer, durations=durations)
    evaluator = eval_lib.EvalRunner(config, training.model, mesh, training.batch_axes, training.shardings.params,
                                    tokenizer, default_every_steps=durations.eval_every)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=durations.checkpoint_every,
                        keep=config.checkpoint.keep, async_save=bool(config.checkpoint.async_save))
    state = training.init_state()
    resumed_from = None
    restored = ckpt.restore_latest_good(state, training.shardings) if ckpt.all_steps() else None
    if restored is not None:
        resumed_from, state, data_state = restored
        train_iter.set_state(data_state)
        log.warning("resumed from checkpoint at step %d in %s", resumed_from, ckpt.directory)
        _say(f"Resuming from step {resumed_from} ({ckpt.directory})")
    elif config.checkpoint.init_from:
        state = _init_from(config, state, training)
    return _Run(config, workdir, training, state, train_iter, evaluator, ckpt,
                MetricWriter(workdir, tensorboard=bool(config.log.tensorboard)), resumed_from, t_start)


def _init_from(config: Any, state, training: Training):
    """The state with the parameters ``checkpoint.init_from`` names (the EMA restarts from them)."""
    loaded, taken = load_params_from(config.checkpoint.init_from, state.params, training.shardings.params,
                                     into=str(config.checkpoint.get("init_into", "")))
    params = jax.tree.map(lambda new, old: old if new is None else new, loaded, state.params,
                          is_leaf=lambda x: x is None)
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
    _say(f"Initialized {len(taken)} parameters from {config.checkpoint.init_from}")
    return state.replace(params=params, ema_params=ema)


class _Throughput:
    """Step time, examples/s, epoch and MFU over the steps since the last log line."""

    def __init__(self, run: _Run, compiled):
        self.global_batch = int(run.config.train.batch_size)
        self.steps_per_epoch = run.training.durations.steps_per_epoch
        self.flops = compiled_flops(compiled)
        self.peak = peak_flops_per_device(float(run.config.log.peak_flops_per_device)) if self.flops else 0.0
        self.reset()

    def reset(self) -> None:
        self.t, self.steps = time.time(), 0

    def metrics(self, done: int) -> dict:
        step_time = (time.time() - self.t) / max(self.steps, 1)
        out = {"step_time_s": step_time, "examples_per_sec": self.global_batch / max(step_time, 1e-9),
               "examples_seen": done * self.global_batch,
               "epoch": done / self.steps_per_epoch if self.steps_per_epoch else 0.0}
        if self.flops and self.peak:
            out["mfu"] = self.flops / step_time / self.peak
        return out


def _run_steps(run: _Run, stop: StopRequest, stop_at: int) -> tuple[int, str | None]:
    """Steps from the state's step to ``stop_at``: logging, evaluation, checkpoints, stopping.

    Returns ``(last step done, preemption reason or None)``.
    """
    config, training, ckpt = run.config, run.training, run.ckpt
    total = training.durations.total
    start = int(to_host(run.state.step))
    guard = NonFiniteGuard(config.train.nonfinite, ckpt, run.workdir)
    pbar = _progress(total, start, bool(config.log.progress))
    log_every = max(training.durations.log_every, 1)
    profile = tuple(int(s) for s in config.log.profile_steps)
    compiled, rate, preempted = None, None, None
    try:
        for step in range(start, stop_at):
            batch = training.device_batch(next(run.train_iter))
            if compiled is None:
                # Compiled ahead of time once, to read the step's FLOPs for MFU.
                compiled = training.step.lower(run.state, batch).compile()
                rate = _Throughput(run, compiled)
            if profile and step + 1 == profile[0]:
                jax.profiler.start_trace(os.path.join(run.workdir, "profile"))
            run.state, metrics = compiled(run.state, batch)
            done = step + 1
            rate.steps += 1
            guard.add(done, metrics)
            if profile and done == profile[1]:
                jax.block_until_ready(run.state)
                jax.profiler.stop_trace()
            if done % log_every == 0 or done == stop_at:
                guard.check()
                host = {k: float(v) for k, v in to_host(metrics).items()}
                host.update(rate.metrics(done))
                if hasattr(run.train_iter, "stats"):
                    host.update({f"data/{k}": v for k, v in run.train_iter.stats().items()})
                run.writer.write(done, {f"train/{k}": v for k, v in host.items()})
                if pbar is not None:
                    pbar.set_postfix(loss=f"{host['loss']:.4f}", ex_s=f"{host['examples_per_sec']:.0f}", refresh=False)
                    # Advanced only here, where the host has waited for the device: with async
                    # dispatch, per-dispatch updates would show bursts and a wrong ETA.
                    pbar.update(done - pbar.n)
                rate.reset()
            if done != total and run.evaluator.due(done):
                _evaluate(run.evaluator, run.state, run.writer, done, step=done)
                rate.reset()
            preempted = stop.poll()
            if preempted or ckpt.should_save(done) or done == stop_at:
                guard.check()  # a non-finite step under policy 'stop' must not be followed by a save
                ckpt.save(done, run.state, run.train_iter.get_state(), force=True)
            if preempted:
                return done, preempted
        guard.check()
    finally:
        if pbar is not None:
            pbar.close()
        ckpt.wait()
    return stop_at, None


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
    stop = StopRequest(float(config.train.deadline_minutes), t_start)
    try:
        run = _start(config, workdir, t_start)
        total = run.training.durations.total
        stop_at = total
        if int(config.train.max_steps_per_run) > 0:
            stop_at = min(total, int(to_host(run.state.step)) + int(config.train.max_steps_per_run))
        stopped_at, preempted = _run_steps(run, stop, stop_at)
    finally:
        stop.close()
    if stopped_at < total:
        run.writer.close()
        run.ckpt.close()
        result = {"complete": False, "stopped_at_step": stopped_at, "resumed_from_step": run.resumed_from,
                  "wall_time_s": time.time() - t_start}
        if preempted:
            result["preempted"] = preempted
            _say(f"Stopped at step {stopped_at} ({preempted}); checkpoint saved, re-run to resume")
        return result
    return _finish(run)


def _finish(run: _Run) -> dict:
    """Final evaluation, the report and ``summary.json`` of a completed run."""
    config, state, total = run.config, run.state, run.training.durations.total
    results = _evaluate(run.evaluator, state, run.writer, total)
    run.writer.close()
    run.ckpt.close()
    if config.eval.get("write_report", False):
        # Every process calls it (the report may evaluate); process 0 writes the files.
        eval_lib.write_report(run.workdir, run.evaluator, state.params)
    summary = {
        "complete": True,
        "eval": {k: float(v) for k, v in results.items() if not k.startswith("ema/")},
        "eval_split": config.data.eval_split,
        "steps": total,
        "examples_seen": total * int(config.train.batch_size),
        "nonfinite_steps": int(to_host(state.nonfinite_steps)),
        "resumed_from_step": run.resumed_from,
        "wall_time_s": time.time() - run.t_start,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "mesh": {k: int(v) for k, v in run.training.mesh.shape.items()},
    }
    if state.ema_params is not None:
        summary["eval_ema"] = {k[len("ema/"):]: float(v) for k, v in results.items() if k.startswith("ema/")}
    _write_json(os.path.join(run.workdir, "summary.json"), summary)
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
