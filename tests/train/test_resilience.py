"""Runs that are killed, preempted, corrupted, poisoned with NaN, or span two processes.

Compilation is most of a tiny run's cost, so the in-process runs on 8 devices use the same run
length (8 steps: the train step's schedule is compiled in) and so share one compiled init, step
and evaluation through the session's compilation cache (tests/conftest.py).
"""
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contrastive_jax import data as data_lib
from contrastive_jax.train.loop import NonFiniteLossError, train
from tests.train.test_train import QUICKSTART, REPO, _read_metrics, _tiny

TINY = ["--config.log.progress=false", "--config.eval.every_steps=0", "--config.log.tensorboard=false"]
# The finished run several tests only read (shared_run).
SHARED_RUN = ["train.total_steps=8", "eval.every_steps=0", "eval.max_examples=64"]


@pytest.fixture(scope="session")
def shared_run():
    """A finished quickstart-tiny run of SHARED_RUN in this process (8 devices), trained once per
    session whatever the number of xdist workers (a file lock in the session's shared directory):
    the init_from source and the distillation teacher. Tests must not write into it."""
    root = os.environ["CONTRASTIVE_JAX_TEST_SHARED"]
    workdir = os.path.join(root, "tiny_run")
    with open(os.path.join(root, "tiny_run.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(os.path.join(workdir, "summary.json")):  # written when complete
                shutil.rmtree(workdir, ignore_errors=True)
                train(_tiny(workdir, *SHARED_RUN), workdir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return workdir


def _final_params(workdir, step=None):
    """The params of a checkpoint, read onto one device whatever topology saved them."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    step = step or max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    path = os.path.join(ckpt_dir, str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path).item_metadata.tree
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return checkpointer.restore(path, target)["params"]


def _cli(workdir, data_dir, *extra):
    return [sys.executable, "-m", "contrastive_jax.cli", "train", "--config", QUICKSTART + ":tiny",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *TINY, *extra]


def _env(devices):
    # The suite's other XLA flags (tests/conftest.py) too, so a subprocess compiles as this process does.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def _wait_for_stderr_line(proc, marker, what, timeout=300):
    """Reads ``proc``'s stderr until a line holding ``marker``; fails naming ``what`` if the process
    ends first (with its last stderr) or ``timeout`` s pass."""
    deadline, line, seen = time.time() + timeout, "", []
    while marker not in line:
        line = proc.stderr.readline()
        seen.append(line)
        assert line or proc.poll() is None, f"trainer ended (rc {proc.returncode}) before {what}: {''.join(seen)[-3000:]}"
        assert time.time() < deadline, f"{what} never started"


def _wait_for_checkpoint(proc, ckpt_dir, at_least, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if steps and max(steps) >= at_least:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before checkpoint {at_least}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"no checkpoint >= {at_least} within {timeout} s")


def test_sigkilled_twice_and_resumed_is_bitwise_identical(tmp_path):
    """Uninterrupted run vs. the same run SIGKILLed at two random points and resumed each time."""
    data_dir = tmp_path / "tfds"
    # No evaluation (none is compared); the uninterrupted run checkpoints only at its end.
    run = ["--config.train.total_steps=16", "--config.train.log_every_steps=1", "--config.eval.evaluators=[]"]
    args = [*run, "--config.checkpoint.every_steps=2"]
    env = _env(2)
    full = tmp_path / "full"
    done = subprocess.run(_cli(full, data_dir, *run, "--config.checkpoint.every_steps=16"), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    rng = random.Random(os.getpid())
    kills = sorted(rng.sample(range(2, 12, 2), 2))
    killed = tmp_path / "killed"
    seen = []
    for at in kills:
        at = min(max(at, seen[-1] + 2), 14) if seen else at  # each run must get further
        proc = subprocess.Popen(_cli(killed, data_dir, *args), env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            seen.append(_wait_for_checkpoint(proc, killed / "checkpoints", at))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
    last = subprocess.run(_cli(killed, data_dir, *args), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "Resuming from step" in last.stderr, (kills, seen)

    a, b = _final_params(full, 16), _final_params(killed, 16)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), (jax.tree_util.keystr(path), kills, seen)
    # The loss of every step, including those re-run after a kill, is the uninterrupted one.
    full_losses = {m["step"]: m["train/loss"] for m in _read_metrics(full) if "train/loss" in m}
    killed_losses = {m["step"]: m["train/loss"] for m in _read_metrics(killed) if "train/loss" in m}
    assert all(killed_losses[s] == full_losses[s] for s in killed_losses), (kills, seen)


class _Injecting:
    """Wraps the training iterator: calls ``hook(batch, n)`` on the n-th batch (1-based) it yields
    after its last ``set_state``. It has no ``peek_shapes``, so these runs also take the loop's
    fallback of compiling the step at the first step (loop._StepCompiler)."""

    def __init__(self, inner, hook):
        self.inner, self.hook, self.n = inner, hook, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        return self.hook(next(self.inner), self.n)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.n = 0
        self.inner.set_state(state)

    def stats(self):
        return self.inner.stats() if hasattr(self.inner, "stats") else {}


def _patch_iterator(monkeypatch, hook):
    real = data_lib.make_train_iterator
    monkeypatch.setattr(data_lib, "make_train_iterator", lambda *a, **k: _Injecting(real(*a, **k), hook))


def _nan_at(step):
    def hook(batch, n):
        if n == step:
            batch = dict(batch, image=np.array(batch["image"], copy=True))
            batch["image"][0, 0, 0, 0] = np.nan
        return batch
    return hook


def test_injected_nan_stops_with_its_step_number(tmp_path, monkeypatch):
    _patch_iterator(monkeypatch, _nan_at(4))
    workdir = str(tmp_path / "run")
    base = ["train.total_steps=8", "train.log_every_steps=3", "eval.every_steps=0"]
    # The message names the real last checkpoint: none yet (it said "step None"), then step 2.
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 4\b.*No checkpoint yet in "):
        train(_tiny(workdir, *base, "checkpoint.every_steps=100"), workdir)
    workdir = str(tmp_path / "run2")
    with pytest.raises(NonFiniteLossError, match=r"at step 4\b.*Last checkpoint: step 2 in .*run2/checkpoints"):
        train(_tiny(workdir, *base, "checkpoint.every_steps=2"), workdir)


def _nan_at_steps(steps):
    def hook(batch, n):
        return _nan_at(n)(batch, n) if n in steps else batch
    return hook


def test_injected_nan_is_skipped_under_skip_policy(tmp_path, monkeypatch, capfd):
    _patch_iterator(monkeypatch, _nan_at(3))
    workdir = str(tmp_path / "run")
    summary = train(_tiny(workdir, "train.total_steps=8", "train.log_every_steps=1", "eval.every_steps=0",
                          "train.nonfinite=skip", "eval.max_examples=64"), workdir)
    assert summary["complete"] and summary["nonfinite_steps"] == 1
    finite = {m["step"]: m["train/finite"] for m in _read_metrics(workdir) if "train/finite" in m}
    assert finite == {**{s: 1.0 for s in range(1, 9)}, 3: 0.0}
    # The run closes with one warning counting the skipped steps.
    closing = [line for line in capfd.readouterr().err.splitlines() if "steps done so far were skipped" in line]
    assert closing == ["WARNING: 1 of the 8 steps done so far were skipped (non-finite loss or gradient, "
                       "config.train.nonfinite='skip'; train/finite in metrics.jsonl says which)"]


def test_skipping_most_steps_fails_the_run(tmp_path, monkeypatch):
    """6 of 8 steps skipped (> train.max_nonfinite_fraction=0.5): exit code 3 through the CLI's
    NonFiniteLossError, after the checkpoint and summary are written."""
    _patch_iterator(monkeypatch, _nan_at_steps({2, 3, 4, 5, 6, 7}))
    workdir = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"^6 of the 8 steps .* more than config.train.max_nonfinite_"
                                                 r"fraction=0.5 of the run") as err:
        train(_tiny(workdir, "train.total_steps=8", "eval.every_steps=0", "train.nonfinite=skip",
                    "eval.max_examples=64"), workdir)
    assert err.value.summary["nonfinite_steps"] == 6
    with open(os.path.join(workdir, "summary.json")) as fh:
        assert json.load(fh)["nonfinite_steps"] == 6


def test_sigterm_saves_and_stops_then_resumes(tmp_path, monkeypatch):
    def hook(batch, n):
        if n == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the loop's handler
        return batch

    _patch_iterator(monkeypatch, hook)
    workdir = str(tmp_path / "run")
    config = _tiny(workdir, "train.total_steps=8", "eval.every_steps=0", "checkpoint.every_steps=100",
                   "eval.max_examples=64")
    first = train(config, workdir)
    assert first["preempted"] == "SIGTERM" and first["stopped_at_step"] == 4 and not first["complete"]
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [4]
    monkeypatch.undo()
    second = train(config, workdir)
    assert second["complete"] and second["resumed_from_step"] == 4


def test_deadline_and_max_steps_per_run_save_and_stop(tmp_path):
    workdir = str(tmp_path / "run")
    base = ["train.total_steps=8", "eval.every_steps=0", "checkpoint.every_steps=100"]
    result = train(_tiny(workdir, *base, "train.deadline_minutes=1e-6"), workdir)
    assert result["preempted"] == "deadline" and result["stopped_at_step"] == 1
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))
    # A fixed-length job slot: stop after 2 more steps with a checkpoint, not preempted.
    result = train(_tiny(workdir, *base, "train.max_steps_per_run=2"), workdir)
    assert result == {**result, "complete": False, "stopped_at_step": 3, "resumed_from_step": 1}
    assert "preempted" not in result and os.path.isdir(os.path.join(workdir, "checkpoints", "3"))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    workdir = tmp_path / "run"
    base = ["eval.every_steps=0", "checkpoint.every_steps=3", "checkpoint.keep=3", "eval.max_examples=64",
            "train.total_steps=8"]
    # Checkpoints at 3 and 6, then stopped (a job slot of 6 steps).
    first = train(_tiny(str(workdir), *base, "train.max_steps_per_run=6"), str(workdir))
    assert first["stopped_at_step"] == 6
    state_dir = workdir / "checkpoints" / "6" / "state"
    # Every array data file cut in half, as by a crash or a full disk during the write (OCDBT
    # may leave unreferenced files, so cutting just one could miss).
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs if os.path.basename(d) == "d"]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    # A fresh process, as after a crash (this one's tensorstore cache still holds the data).
    rerun = subprocess.run(_cli(workdir, tmp_path / "tfds", *[f"--config.{o}" for o in base]),
                           env=_env(2), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Exactly one warning line names the unreadable step and the one resumed from, and orbax's
    # failed reads print nothing (they were ~100 "Event loop is closed" tracebacks).
    warnings = [line for line in rerun.stderr.splitlines() if "could not be read" in line]
    assert len(warnings) == 1 and "resuming from step 3" in warnings[0] and "step 6:" in warnings[0], rerun.stderr
    assert "Traceback" not in rerun.stderr and "Event loop is closed" not in rerun.stderr, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{\n"):])
    assert summary["resumed_from_step"] == 3
    assert os.listdir(tmp_path / "run" / "checkpoints_corrupt")[0].startswith("6-")
    assert 8 in [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]


def test_init_from_takes_only_the_named_subtree(tmp_path, shared_run):
    source = shared_run
    src = _final_params(source)
    target = str(tmp_path / "lit")
    train(_tiny(target, "train.total_steps=2", "eval.every_steps=0", "eval.max_examples=64", "seed=7",
                "optim.freeze=('image/.*',)", f"checkpoint.init_from={source}:image"), target)
    got = _final_params(target)
    for x, y in zip(jax.tree.leaves(src["image"]), jax.tree.leaves(got["image"])):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()  # loaded, then frozen
    assert not np.allclose(np.asarray(src["text_proj"]["kernel"]), np.asarray(got["text_proj"]["kernel"]))
    with pytest.raises(ValueError, match="no parameter matches"):
        train(_tiny(str(tmp_path / "bad"), "train.total_steps=1", f"checkpoint.init_from={source}:nope"),
              str(tmp_path / "bad"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_8_devices(tmp_path):
    """jax.distributed with gloo: 2 processes x 4 CPU devices == 1 process x 8 devices."""
    data_dir = tmp_path / "tfds"
    overrides = ["train.total_steps=4", "train.log_every_steps=1", "eval.every_steps=0", "checkpoint.every_steps=4",
                 "eval.max_examples=64"]
    single = str(tmp_path / "single")
    config = _tiny(single, *overrides)
    config.data.data_dir = str(data_dir)
    one = train(config, single)
    assert one["devices"] == 8 and one["processes"] == 1

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(_cli(multi, data_dir, *[f"--config.{o}" for o in overrides],
                              "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)),
                         env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads(outs[0][0][outs[0][0].index("{"):])
    assert summary["devices"] == 8 and summary["processes"] == 2
    assert "{" not in outs[1][0]  # only process 0 prints the summary (gloo itself logs to stdout)

    single_losses = [m["train/loss"] for m in _read_metrics(single) if "train/loss" in m]
    multi_losses = [m["train/loss"] for m in _read_metrics(str(multi)) if "train/loss" in m]
    np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
    ref_leaves = jax.tree_util.tree_leaves_with_path(_final_params(single, 4))
    got_leaves = jax.tree.leaves(_final_params(str(multi), 4))
    lr = 2e-3  # configs/quickstart.py optim.lr
    for (path, x), y in zip(ref_leaves, got_leaves):
        name = jax.tree_util.keystr(path)
        if "['key']['bias']" in name:
            # An attention key bias adds q.b to every logit of a query row, which softmax cancels:
            # its exact gradient is 0, so Adam's update there normalizes rounding noise (any
            # reduction order gives other noise). Adam moves a parameter by at most ~lr per step.
            assert np.abs(np.asarray(y) - np.asarray(x)).max() <= 2 * 4 * lr, name
            continue
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6, err_msg=name)
    assert summary["eval"] == pytest.approx(one["eval"], rel=1e-4, abs=1e-6)


def test_distillation_from_a_frozen_teacher_run(tmp_path, shared_run):
    """configs/distill.py: the teacher is loaded under 'teacher/', stays bit-identical, and the
    student trains on the distillation loss."""
    from contrastive_jax.train import load_config

    teacher_dir = shared_run  # a finished quickstart-tiny run
    student_dir = str(tmp_path / "student")
    config = load_config(os.path.join(REPO, "configs", "distill.py") + ":tiny",
                         ["log.progress=false", "train.total_steps=3", "eval.every_steps=0", "eval.max_examples=64",
                          "train.log_every_steps=1", f"checkpoint.init_from={teacher_dir}"])
    config.data.data_dir = os.path.join(os.path.dirname(student_dir), "tfds")
    summary = train(config, student_dir)
    assert summary["complete"] and "retrieval/image_to_text/R@1" in summary["eval"]
    teacher, got = _final_params(teacher_dir), _final_params(student_dir)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(teacher), jax.tree.leaves(got["teacher"])):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)
    metrics = [m for m in _read_metrics(student_dir) if "train/distill_kl" in m]
    assert len(metrics) == 3 and all(np.isfinite(m["train/distill_kl"]) and m["train/distill_kl"] > 0 for m in metrics)
    assert "train/grad_norm/teacher" not in metrics[0] and metrics[0]["train/grad_norm/student"] > 0
