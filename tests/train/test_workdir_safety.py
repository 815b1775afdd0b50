"""A workdir is never clobbered: one trainer at a time (lock), one run per workdir (fingerprint),
no silent restart when no checkpoint is readable, nothing moved without an explicit choice.

The in-process runs use the tiny quickstart model on 8 devices with the run length of the other
resilience tests (8 steps), so they share one compiled init and step through the session's
compilation cache; each stops after 2 steps (``max_steps_per_run``) and so never evaluates.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from contrastive_jax.train import workdir as workdir_lib
from contrastive_jax.train.loop import train
from contrastive_jax.train.workdir import UnresumableError, WorkdirError, WorkdirLock
from tests.train.test_resilience import _cli, _env
from tests.train.test_train import REPO, _tiny

RUN = ["train.total_steps=8", "eval.every_steps=0", "eval.max_examples=64", "checkpoint.every_steps=1",
       "checkpoint.keep=2", "train.max_steps_per_run=2"]


def _listing(root):
    """Every file under ``root`` with its size and mtime: what 'nothing was touched' compares."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if f != workdir_lib.LOCK_NAME:
                st = os.stat(p)
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, **fields):
    info = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": workdir_lib._proc_start_ticks(os.getpid()),
            "started": "2026-01-01T00:00:00+00:00", "token": "someone-else", **fields}
    path = os.path.join(workdir, workdir_lib.LOCK_NAME)
    with open(path, "w") as fh:
        json.dump(info, fh)
    return path


# --- Lock ------------------------------------------------------------------------------------

def test_live_lock_refuses_naming_pid_and_host(tmp_path):
    first = WorkdirLock(str(tmp_path))
    first.acquire()
    try:
        with pytest.raises(WorkdirError, match=rf"in use by another trainer: pid {os.getpid()} on host "
                                               rf"{socket.gethostname()}"):
            WorkdirLock(str(tmp_path)).acquire()
        # A lock of another host refreshed recently is a live trainer there.
        os.remove(first.path)
        _write_lock(str(tmp_path), host="other-host", pid=12345)
        with pytest.raises(WorkdirError, match="pid 12345 on host other-host"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        first.release()
    assert os.path.exists(first.path)  # release never removes another trainer's lock


@pytest.mark.parametrize("stale", ["dead pid", "reused pid", "other host, not refreshed", "garbled"])
def test_stale_lock_is_taken_over_with_one_warning(tmp_path, capfd, stale):
    if stale == "dead pid":
        path = _write_lock(str(tmp_path), pid=_dead_pid())
    elif stale == "reused pid":  # our pid, but a process started at another time held it
        path = _write_lock(str(tmp_path), proc_start=(workdir_lib._proc_start_ticks(os.getpid()) or 0) + 1)
    elif stale == "other host, not refreshed":
        path = _write_lock(str(tmp_path), host="other-host", pid=12345)
        old = time.time() - workdir_lib.STALE_AFTER_S - 60
        os.utime(path, (old, old))
    else:
        path = os.path.join(str(tmp_path), workdir_lib.LOCK_NAME)
        open(path, "w").close()  # killed between create and write
        os.utime(path, (time.time() - 60, time.time() - 60))
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    err = capfd.readouterr().err
    assert err.count("WARNING: taking over the stale lock") == 1, err
    with open(path) as fh:
        assert json.load(fh)["token"] == lock.info["token"]
    lock.release()
    assert not os.path.exists(path) and os.listdir(tmp_path) == []


def _readonly_dir(tmp_path):
    """An existing directory this process cannot create files in: a chmod 555 directory, or (as
    root, which ignores modes) sysfs; None if neither exists here."""
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if not os.access(ro, os.W_OK):
        return str(ro)
    return "/sys/kernel" if os.path.isdir("/sys/kernel") else None


def test_second_trainer_and_readonly_workdir_exit_2_with_one_line(tmp_path):
    """The CLI, before any data or compilation: a live lock, then a read-only workdir."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    _write_lock(str(workdir))  # held by this (live) test process
    t0 = time.time()
    busy = subprocess.run(_cli(workdir, tmp_path / "tfds"), env=_env(2), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert busy.returncode == 2, busy.stderr[-2000:]
    lines = [line for line in busy.stderr.splitlines() if line.startswith("contrastive-jax:")]
    assert len(lines) == 1 and f"pid {os.getpid()} on host {socket.gethostname()}" in lines[0], busy.stderr
    assert "Traceback" not in busy.stderr and not (tmp_path / "tfds").exists()  # refused before the dataset
    assert os.listdir(workdir) == [workdir_lib.LOCK_NAME]
    refused_in = time.time() - t0

    readonly = _readonly_dir(tmp_path)
    if readonly is None:
        pytest.skip("no directory this process cannot write to (root without sysfs)")
    ro = subprocess.run(_cli(readonly, tmp_path / "tfds"), env=_env(2), cwd=REPO, capture_output=True, text=True,
                        timeout=300)
    assert ro.returncode == 2, ro.stderr[-2000:]
    lines = [line for line in ro.stderr.splitlines() if line.startswith("contrastive-jax:")]
    assert len(lines) == 1 and f"workdir {readonly} is not writable" in lines[0], ro.stderr
    assert "Traceback" not in ro.stderr and not (tmp_path / "tfds").exists()
    print(f"second trainer refused in {refused_in:.1f} s (process start included)")


# --- Fingerprint, mismatch, start over -------------------------------------------------------

def test_changed_model_is_refused_and_nothing_is_touched_unless_restart(tmp_path):
    workdir = str(tmp_path / "run")
    first = train(_tiny(workdir, *RUN), workdir)
    assert first["stopped_at_step"] == 2
    with open(os.path.join(workdir, workdir_lib.FINGERPRINT_NAME)) as fh:
        assert json.load(fh)["fields"]["model.text.depth"] == 1
    before = _listing(workdir)

    with pytest.raises(UnresumableError) as err:
        train(_tiny(workdir, *RUN, "model.text.depth=2", "data.name=other"), workdir)
    message = str(err.value)
    assert "\n" not in message
    assert "model.text.depth=1 there, 2 now" in message and "data.name='shapes' there, 'other' now" in message
    assert "checkpoint.on_mismatch=restart" in message and f"checkpoint.init_from={workdir}" in message
    assert _listing(workdir) == before  # nothing moved, rewritten or appended
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))  # released on the way out

    # A workdir from before fingerprints (config.json only) is recognized the same way.
    os.remove(os.path.join(workdir, workdir_lib.FINGERPRINT_NAME))
    with pytest.raises(UnresumableError, match="model.text.depth=1 there, 2 now"):
        train(_tiny(workdir, *RUN, "model.text.depth=2"), workdir)

    # Training-only fields change freely: other intervals, keep and job slot resume. (The learning
    # rate or run length would too, at the cost of compiling another step here.)
    again = train(_tiny(workdir, *RUN, "train.log_every_steps=1", "checkpoint.keep=3", "checkpoint.every_steps=2",
                        "train.max_steps_per_run=1"), workdir)
    assert again["resumed_from_step"] == 2 and again["stopped_at_step"] == 3

    # The explicit choice: the earlier run is moved (not deleted) and the new one starts at 0.
    moved_from = _listing(workdir)
    # (Another dataset seed, not the deeper model: the same compiled step, so the test stays fast.)
    restarted = train(_tiny(workdir, *RUN, "data.dataset_seed=1", "checkpoint.on_mismatch=restart"), workdir)
    assert restarted["resumed_from_step"] is None and restarted["stopped_at_step"] == 2
    (previous,) = os.listdir(os.path.join(workdir, workdir_lib.PREVIOUS_DIR))
    kept = _listing(os.path.join(workdir, workdir_lib.PREVIOUS_DIR, previous))
    assert {k: v[0] for k, v in kept.items()} == {k: v[0] for k, v in moved_from.items()}
    with open(os.path.join(workdir, workdir_lib.FINGERPRINT_NAME)) as fh:
        assert json.load(fh)["fields"]["data.dataset_seed"] == 1
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:  # the new run's only, not mixed with step 3
        assert [json.loads(line)["step"] for line in fh] == [2]


def test_mismatched_or_unreadable_checkpoints_are_errors_never_a_silent_restart(tmp_path):
    workdir = str(tmp_path / "run")
    train(_tiny(workdir, *RUN), workdir)
    # Same fingerprint, another state tree (an EMA now): a mismatch, refused, nothing quarantined.
    before = _listing(workdir)
    with pytest.raises(UnresumableError) as err:
        train(_tiny(workdir, *RUN, "optim.ema_decay=0.9"), workdir)
    message = str(err.value)
    assert "\n" not in message and "checkpoint at step 2" in message and "not corrupt" in message
    assert "only in this config's model (ema_params/" in message, message
    assert _listing(workdir) == before and not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))

    # Every checkpoint unreadable: an error listing each, newest first; nothing moved.
    ckpts = os.path.join(workdir, "checkpoints")
    assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [1, 2]
    shutil.rmtree(os.path.join(ckpts, "2", "state"))  # an item lost (a cut copy, a full disk)
    shutil.rmtree(os.path.join(ckpts, "1", "data"))
    before = _listing(workdir)
    with pytest.raises(UnresumableError) as err:
        train(_tiny(workdir, *RUN), workdir)
    message = str(err.value)
    assert "no readable checkpoint" in message and "\n" not in message
    assert message.index("step 2: ") < message.index("step 1: ") and "'state'" in message and "'data'" in message
    assert _listing(workdir) == before and not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))

    fresh = train(_tiny(workdir, *RUN, "checkpoint.on_mismatch=restart"), workdir)
    assert fresh["resumed_from_step"] is None and fresh["stopped_at_step"] == 2
    (previous,) = os.listdir(os.path.join(workdir, workdir_lib.PREVIOUS_DIR))
    assert sorted(os.listdir(os.path.join(workdir, workdir_lib.PREVIOUS_DIR, previous, "checkpoints"))) == ["1", "2"]


def test_fingerprint_of_a_run_that_left_nothing_is_replaced_and_otherwise_kept(tmp_path):
    workdir = str(tmp_path)
    one, two = {"model": {"depth": 1}, "optim": {"lr": 1.0}}, {"model": {"depth": 2}, "optim": {"lr": 2.0}}
    assert workdir_lib.fingerprint(one) == {"model.depth": 1}  # training-only fields are not in it
    workdir_lib.write_fingerprint(workdir, one)
    workdir_lib.check_fingerprint(workdir, two)  # no checkpoint or metrics yet: nothing to protect
    workdir_lib.write_fingerprint(workdir, two)  # (a first run killed before its first checkpoint)
    os.makedirs(os.path.join(workdir, "checkpoints", "5"))
    workdir_lib.write_fingerprint(workdir, one)  # kept: it describes checkpoint 5
    with pytest.raises(UnresumableError, match=r"model.depth=2 there, 1 now"):
        workdir_lib.check_fingerprint(workdir, one)
    workdir_lib.check_fingerprint(workdir, {**two, "optim": {"lr": 3.0}})


class _SavedAs:
    """A tokenizer stand-in whose ``save`` writes fixed text."""

    def __init__(self, text):
        self.text = text

    def save(self, path):
        with open(path, "w") as fh:
            fh.write(self.text)


def test_another_tokenizer_is_refused_once_the_run_has_history(tmp_path):
    workdir = str(tmp_path)
    with open(os.path.join(workdir, "tokenizer.json"), "w") as fh:
        fh.write('{"vocab": ["a", "b"]}')
    assert workdir_lib.check_tokenizer(workdir, _SavedAs('{"vocab": ["a", "c"]}'))  # no history: accepted
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:
        fh.write('{"step": 5}\n')
    assert workdir_lib.check_tokenizer(workdir, _SavedAs('{"vocab": ["a", "b"]}')) == b'{"vocab": ["a", "b"]}'
    with pytest.raises(UnresumableError, match=r"tokenizer built from this config differs .*tokenizer.json"):
        workdir_lib.check_tokenizer(workdir, _SavedAs('{"vocab": ["a", "c"]}'))
