"""The outer training loop: the only place with side effects (data I/O, logging, checkpoints).

``train(config, workdir)`` takes the workdir (its lock and fingerprint:
:mod:`contrastive_jax.train.workdir`), prepares the data and tokenizer, builds everything else
with :func:`contrastive_jax.train.build_training` (the same builder the benchmarks use), restores
the newest GOOD checkpoint in ``workdir`` if there is one (state, EMA, RNG, step AND the
data-iterator position; newer unreadable ones are set aside with one warning; a checkpoint of
another model, or none readable at all, stops the run instead) or initializes from
``checkpoint.init_from``, runs the jitted step, evaluates every eval interval and at the end, and
writes ``WORKDIR/summary.json``.

Stopping early, safely: SIGTERM (a preemption notice), Ctrl-C or ``train.deadline_minutes`` makes
the loop save a checkpoint at a step every process agrees on (:class:`StopRequest`) and return
``{"complete": False, "preempted": reason}``; the CLI then exits with :data:`EXIT_PREEMPTED` (75)
so a scheduler requeues the job, and the next run resumes from that step. With a fixed config and
seed the resumed run ends bitwise identical to an uninterrupted one (CPU).
"""
from __future__ import annotations

import dataclasses
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
from contrastive_jax import storage
from contrastive_jax.parallel.distributed import any_process, barrier
from contrastive_jax.parallel.mesh import make_mesh, to_host
from contrastive_jax.train.builder import NONFINITE_POLICIES, Training, build_training, model_config_for, validate
from contrastive_jax.train.config import ConfigError
from contrastive_jax.train.checkpoint import Checkpointer, load_params_from
from contrastive_jax.train.durations import resolve_durations
from contrastive_jax.train.flops import compiled_flops, peak_flops_per_device
from contrastive_jax.train import workdir as workdir_lib
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


def _jax_preemption_service() -> bool:
    """Whether JAX's preemption service runs here: a multi-process ``jax.distributed`` run with
    ``jax_enable_preemption_service`` (the default). Its SIGTERM handler propagates the notice to
    every process and picks the step all of them save at."""
    if jax.process_count() == 1:
        return False
    try:  # (no public accessor: multihost_utils raises if the service is off, on each call)
        from jax._src import distributed
    except ImportError:
        return False
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopRequest:
    """SIGTERM, Ctrl-C (SIGINT) and the wall-clock deadline, agreed across processes.

    The signal handlers only set a flag (they run between bytecodes of the main thread); the loop
    calls :meth:`poll` after each step, so the checkpoint is written from a consistent state. A
    second Ctrl-C ends the process at once (the default action is restored by the first).

    Agreement: with several processes, every one must stop after the same step (saving is
    collective). Where JAX's preemption service runs (:func:`_jax_preemption_service`), its own
    SIGTERM handler is left in place and ``multihost_utils.reached_preemption_sync_point`` gives
    that step: a local check per step, no collective (a Ctrl-C or the deadline raises SIGTERM in
    this process to use the same path). Otherwise an all-gather of the flags every step.
    """

    def __init__(self, deadline_minutes: float, t_start: float):
        self.reason: str | None = None
        self._deadline = t_start + 60.0 * deadline_minutes if deadline_minutes and deadline_minutes > 0 else None
        self._jax_sync = _jax_preemption_service()
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            if not self._jax_sync:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.reason = self.reason or "SIGTERM"

    def _on_sigint(self, signum, frame):
        del signum, frame
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
        self.reason = self.reason or "SIGINT"
        # os.write, not print: the handler may interrupt a print to stderr in the main thread.
        os.write(2, b"\nCtrl-C: saving a checkpoint after this step, then stopping "
                    b"(press Ctrl-C again to abort without saving)\n")
        self._tell_others()

    def _tell_others(self) -> None:
        if self._jax_sync:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler propagates it to every process

    def poll(self, step: int) -> str | None:
        """The reason to stop after ``step`` (every process gets the same answer), or None."""
        if self.reason is None and self._deadline is not None and time.time() >= self._deadline:
            self.reason = "deadline"
            self._tell_others()
        if self._jax_sync:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(int(step)):
                self.reason = self.reason or "SIGTERM"
                return self.reason
            return None
        local = self.reason
        # Every process must stop at the same step (saving is collective).
        if any_process(local is not None):
            self.reason = local or "stop requested by another process"
        return self.reason

    def close(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}


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
                    f"non-finite {what} at step {s}; the update was not applied. {self.last_checkpoint()} "
                    f"(config: {self.workdir}/config.json; config.train.nonfinite='skip' skips such steps instead)")
            log.warning("step %d skipped: non-finite %s", s, what)
            _say(f"WARNING: step {s} skipped: non-finite {what}")
        self.pending.clear()

    def last_checkpoint(self) -> str:
        """``Last checkpoint: step N in DIR`` (after any write in flight has finished), or that
        there is none yet."""
        self.ckpt.wait()
        step = self.ckpt.latest_step()
        if step is None:
            return f"No checkpoint yet in {self.ckpt.directory}."
        return f"Last checkpoint: step {step} in {self.ckpt.directory}."


def _skipped_report(config: Any, state: Any, done: int, total: int, complete: bool) -> str | None:
    """The closing line of a run that skipped non-finite steps (None if it skipped none); raises
    :class:`NonFiniteLossError` for a completed run that skipped more than
    ``train.max_nonfinite_fraction`` of its steps (its checkpoint and summary are written first)."""
    skipped = int(to_host(state.nonfinite_steps))
    if skipped == 0:
        return None
    limit = float(config.train.get("max_nonfinite_fraction", 0.5))
    line = (f"{skipped} of the {done} steps done so far were skipped (non-finite loss or gradient, "
            "config.train.nonfinite='skip'; train/finite in metrics.jsonl says which)")
    if complete and skipped > limit * total:
        raise NonFiniteLossError(f"{line}: more than config.train.max_nonfinite_fraction={limit:g} of the run, so the "
                                 "model has most likely diverged (a lower config.optim.lr?); its checkpoint and "
                                 "summary.json are written")
    return line


def _write_json(path: str, payload: Any) -> None:
    if jax.process_index() == 0:
        storage.write_json(path, payload)  # helper E: atomic, local or s3:// / gs://


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
    compiler: _StepCompiler


def _start(config: Any, workdir: str, mesh, t_start: float) -> _Run:
    """Data, tokenizer, the built training and its state (restored, initialized from
    ``checkpoint.init_from``, or fresh). Nothing of an earlier run in ``workdir`` is overwritten
    before it is known to be this run's (:mod:`contrastive_jax.train.workdir`)."""
    train_examples = _prepare_data(config)
    durations = resolve_durations(config, train_examples)
    # The tokenizer is stored with the run so evaluation and later loading tokenize exactly as
    # training did; one that differs from the stored one means another run.
    tokenizer = data_lib.build_tokenizer(config.data)
    _on_process_0(config, workdir, lambda: workdir_lib.check_tokenizer(workdir, tokenizer))
    train_iter = data_lib.make_train_iterator(config.data, tokenizer=tokenizer,
                                              global_batch_size=int(config.train.batch_size),
                                              seed=int(config.data.shuffle_seed))
    training = build_training(config, mesh, tokenizer=tokenizer, durations=durations)
    compiler = _StepCompiler(training, train_iter)
    ids = getattr(training.objective, "num_examples", None)  # per-example state (iSogCLR)
    if ids is not None and train_examples and int(ids) < int(train_examples):
        raise ConfigError(f"config.loss.{config.loss.name}.num_examples={ids} is smaller than the training split "
                          f"({train_examples} examples): every example_id must have a row of the state")
    evaluator = eval_lib.EvalRunner(config, training.model, mesh, training.batch_axes, training.shardings.params,
                                    tokenizer, default_every_steps=durations.eval_every)

    def open_checkpoints():
        return Checkpointer(storage.join(workdir, "checkpoints"), every_steps=durations.checkpoint_every,
                            keep=config.checkpoint.keep, async_save=bool(config.checkpoint.async_save))

    ckpt = open_checkpoints()
    state = training.init_state()
    try:
        restored = workdir_lib.resume(ckpt, workdir, state, training.shardings)
    except workdir_lib.UnresumableError as e:
        ckpt.close()
        _start_over_or_raise(config, workdir, e)
        ckpt, restored = open_checkpoints(), None
    resumed_from = None
    if restored is not None:
        resumed_from, state, data_state = restored
        train_iter.set_state(data_state)
        log.info("resumed from checkpoint at step %d in %s", resumed_from, ckpt.directory)
        _say(f"Resuming from step {resumed_from} ({ckpt.directory})")
    elif config.checkpoint.init_from:
        state = _init_from(config, state, training)
    if jax.process_index() == 0:
        # Now known to be this run's: the config as run (training-only fields may differ from the
        # previous invocation's), the tokenizer, and the fingerprint (kept once written).
        storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2))  # helper E
        with storage.writing_locally(storage.join(workdir, "tokenizer.json")) as path:  # helper E: s3:// too
            tokenizer.save(path)
        workdir_lib.write_fingerprint(workdir, config)
    return _Run(config, workdir, training, state, train_iter, evaluator, ckpt,
                MetricWriter(workdir, tensorboard=bool(config.log.tensorboard)), resumed_from, t_start, compiler)


def _on_process_0(config: Any, workdir: str, fn) -> None:
    """Runs ``fn()`` on process 0; its WorkdirError is agreed by every process: raised
    everywhere or, for an UnresumableError under ``checkpoint.on_mismatch='restart'``, the
    earlier run is moved aside instead."""
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except workdir_lib.WorkdirError as e:
            error = e
    if not any_process(error is not None):
        return
    # Only process 0 knows the error: its kind is agreed too.
    if any_process(isinstance(error, workdir_lib.UnresumableError)):
        _start_over_or_raise(config, workdir, error)
        return
    raise error or workdir_lib.WorkdirError(f"workdir {workdir}: process 0 refused it (its message says why)")


def _start_over_or_raise(config: Any, workdir: str, error: Exception | None) -> None:
    """Under ``checkpoint.on_mismatch='restart'``: moves the earlier run aside (process 0) and
    says where; otherwise raises ``error``."""
    if config.checkpoint.on_mismatch != "restart":
        raise error or workdir_lib.WorkdirError(f"workdir {workdir}: process 0 refused it (its message says why)")
    barrier("start-over-begin")
    if jax.process_index() == 0:
        moved = workdir_lib.move_run_aside(workdir)
        if moved:
            _say(f"checkpoint.on_mismatch=restart: the earlier run in {workdir} could not continue with this "
                 f"config; it was moved to {moved}; starting at step 0")
    barrier("start-over-done")


def _claim_workdir(config: Any, workdir: str) -> workdir_lib.WorkdirLock | None:
    """Creates the workdir, takes its lock and checks its fingerprint (process 0; the outcome is
    agreed by every process). Cheap: runs before the dataset, the model or any compilation.

    Raises:
      WorkdirError: not writable, another live trainer holds it, or it holds a run of another
        model/dataset (unless ``checkpoint.on_mismatch='restart'``: that run is moved aside).
    """
    lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
    held = []

    def claim():
        try:
            storage.makedirs(workdir)
        except OSError as e:
            raise workdir_lib.WorkdirError(f"cannot create the workdir {workdir} ({e.strerror or e}): choose a "
                                           "writable --workdir") from None
        lock.acquire()
        held.append(lock)
        workdir_lib.check_fingerprint(workdir, config)

    try:
        _on_process_0(config, workdir, claim)
    except BaseException:
        if held:
            lock.release()
        raise
    return lock if held else None


def _init_from(config: Any, state, training: Training):
    """The state with the parameters ``checkpoint.init_from`` names (the EMA restarts from them)."""
    loaded, taken = load_params_from(config.checkpoint.init_from, state.params, training.shardings.params,
                                     into=str(config.checkpoint.get("init_into", "")))
    params = jax.tree.map(lambda new, old: old if new is None else new, loaded, state.params,
                          is_leaf=lambda x: x is None)
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
    _say(f"Initialized {len(taken)} parameters from {config.checkpoint.init_from}")
    return state.replace(params=params, ema_params=ema)


def _avals(tree: Any) -> tuple:
    """The tree's structure and each leaf's shape and dtype: what a compiled step was made for."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


class _StepCompiler:
    """Compiles the train step ahead of time on a thread while the run is still being set up
    (the state's init, the checkpoint check, the data worker's start and first batch): XLA
    compiles with the GIL released, so on the 2-core quickstart ~10 s of the ~40 s before the
    first step overlap. The batch's shapes come from one example put through the pipeline by
    random access (:meth:`TrainIterator.peek_shapes`), the state's from the abstract state: the
    same lowering as at the first step, so the same executable. Where either is unknown or the
    first real batch or state differs, the step is compiled at the first step as before."""

    def __init__(self, training: Training, train_iter: Any):
        self._training, self._iter = training, train_iter
        self._spec, self._compiled, self._error = None, None, None
        # Not a daemon: a setup that fails while XLA compiles makes the interpreter wait for the
        # compile at exit (one compile) rather than tear XLA down under a running thread.
        self._thread = threading.Thread(target=self._compile, name="compile-train-step")
        self._thread.start()

    def _compile(self) -> None:
        try:
            peek = getattr(self._iter, "peek_shapes", None)
            shapes = peek() if peek is not None else None
            if not shapes:
                return
            # device_batch's view of the host batch: numeric fields, global rows.
            rows = int(self._training.config.train.batch_size)
            self._spec = {k: jax.ShapeDtypeStruct((rows, *shape[1:]), jax.dtypes.canonicalize_dtype(dtype))
                          for k, (shape, dtype) in shapes.items() if dtype.kind in "biuf" and len(shape) >= 1}
            self._compiled = self._training.step.lower(self._training.abstract_state, self._spec).compile()
        except Exception as e:  # noqa: BLE001 — the step is compiled again at the first step, which reports it
            self._error = e

    def get(self, state: Any, batch: dict):
        """The compiled step for this state and batch."""
        self._thread.join()
        if (self._compiled is not None and _avals(batch) == _avals(self._spec)
                and _avals(state) == _avals(self._training.abstract_state)):
            return self._compiled
        if self._error is not None:
            log.info("ahead-of-time step compile failed (%s); compiling at the first step", self._error)
        return self._training.step.lower(state, batch).compile()


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
                # Compiled ahead of time once (on a thread since the setup: _StepCompiler), also
                # to read the step's FLOPs for MFU.
                compiled = run.compiler.get(run.state, batch)
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
                    # The iterators name their counters `data/...` already (train/data/skipped, ...).
                    host.update({k if k.startswith("data/") else f"data/{k}": v
                                 for k, v in run.train_iter.stats().items()})
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
            preempted = stop.poll(done)
            if preempted or ckpt.should_save(done) or done == stop_at:
                guard.check()  # a non-finite step under policy 'stop' must not be followed by a save
                ckpt.save(done, run.state, run.train_iter.get_state(), force=True)
                run.writer.flush()  # helper E: a remote metrics.jsonl is rewritten with each checkpoint
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
        step, the metric and the last checkpoint), or policy ``skip`` and a completed run that
        skipped more than ``train.max_nonfinite_fraction`` of its steps (``.summary`` holds the
        written summary).
      WorkdirError: the workdir is not writable or another live trainer holds it;
        ``UnresumableError`` (a subclass): it holds a run of another model/dataset/tokenizer, or no
        readable checkpoint (unless ``checkpoint.on_mismatch='restart'``). One line each.
      ValueError: a config that cannot run (the message names the fields).
    """
    t_start = time.time()
    workdir = storage.abspath(workdir)  # helper E: local paths as before; s3:// / gs:// URLs kept
    mesh = make_mesh(config.mesh)
    validate(config, mesh)  # before the workdir is touched or data generated: a bad config costs nothing
    lock = _claim_workdir(config, workdir)
    try:
        return _train_locked(config, workdir, mesh, t_start)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config: Any, workdir: str, mesh, t_start: float) -> dict:
    """:func:`train` once the workdir is this trainer's."""
    stop = StopRequest(float(config.train.deadline_minutes), t_start)
    try:
        run = _start(config, workdir, mesh, t_start)
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
        skipped = _skipped_report(run.config, run.state, stopped_at, total, complete=False)
        if skipped:
            _say(f"WARNING: {skipped}")
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
    _write_json(storage.join(run.workdir, "summary.json"), summary)
    try:
        skipped = _skipped_report(config, state, total, total, complete=True)
    except NonFiniteLossError as e:
        e.summary = summary
        raise
    if skipped:
        _say(f"WARNING: {skipped}")
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
