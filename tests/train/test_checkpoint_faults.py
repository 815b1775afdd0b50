"""Checkpoint fault injection: a SIGKILL while orbax writes, a checkpoint missing an item, a full disk.

Each must end with one clear message and the previous good checkpoint intact and used on resume.
The trainer runs as a subprocess (2 simulated devices) started from a copy of one shared run that
holds checkpoints at steps 2, 4 and 6 of an 8-step run (the `base_run` fixture), so each test costs
one or two short resumed runs.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.train.checkpoint import Checkpointer, CheckpointSaveError
from contrastive_jax.train.workdir import resume
from tests.train.test_resilience import _cli, _env, _wait_for_stderr_line
from tests.train.test_train import REPO

# No evaluation: no test here reads one.
RUN = ["--config.train.total_steps=8", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3",
       "--config.eval.evaluators=[]"]
# Patches orbax's JSON item writer (the `data` item) in a trainer subprocess, for the write of the
# step named in CJ_FAULT_STEP: 'hang' sleeps (a write still in flight when SIGKILL comes).
_HANG_WRITE = """
import asyncio, os, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as h
_orig = h.JsonCheckpointHandler._save_fn
async def _save_fn(self, x, directory):
    if os.path.basename(str(directory.parent)).startswith(os.environ["CJ_FAULT_STEP"] + ".orbax-checkpoint-tmp"):
        print("FAULT: write in flight", file=sys.stderr, flush=True)
        await asyncio.sleep(600)
    return await _orig(self, x, directory)
h.JsonCheckpointHandler._save_fn = _save_fn
from contrastive_jax.cli import main
sys.exit(main())
"""


def _steps(ckpt_dir):
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _summary(stdout):
    return json.loads(stdout[stdout.index("{\n"):])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A run stopped after step 6 (checkpoints 2, 4, 6); tests copy it, never write into it."""
    root = tmp_path_factory.mktemp("faults")
    workdir = root / "base"
    done = subprocess.run(_cli(workdir, root / "tfds", *RUN, "--config.train.max_steps_per_run=6"), env=_env(2),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps(workdir / "checkpoints") == [2, 4, 6]
    return root


def _copy(base_run, tmp_path, name="run"):
    workdir = tmp_path / name
    shutil.copytree(base_run / "base", workdir, symlinks=True)
    return workdir


def _resume(workdir, base_run, *extra, prefix=()):
    return subprocess.run([*prefix, *_cli(workdir, base_run / "tfds", *RUN, *extra)], env=_env(2), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def _state_bytes(step_dir):
    return {os.path.relpath(os.path.join(d, f), step_dir): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(step_dir) for f in fs}


def test_sigkill_during_async_write_resumes_from_previous_checkpoint(base_run, tmp_path):
    workdir = _copy(base_run, tmp_path)
    before = _state_bytes(workdir / "checkpoints" / "6")
    cmd = _cli(workdir, base_run / "tfds", *RUN)
    cmd = [sys.executable, "-c", _HANG_WRITE, *cmd[3:]]  # same arguments, the cli entry point behind the patch
    proc = subprocess.Popen(cmd, env={**_env(2), "CJ_FAULT_STEP": "8"}, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_stderr_line(proc, "FAULT: write in flight", "the step-8 write")
        tmp = [d for d in os.listdir(workdir / "checkpoints") if d.startswith("8.orbax-checkpoint-tmp")]
        assert tmp, os.listdir(workdir / "checkpoints")  # killed mid-write: only orbax's temporary dir exists
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _steps(workdir / "checkpoints") == [2, 4, 6]

    rerun = _resume(workdir, base_run)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "an interrupted write of checkpoint step 8" in rerun.stderr
    assert "Resuming from step 6" in rerun.stderr and _summary(rerun.stdout)["resumed_from_step"] == 6
    assert "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
    assert _steps(workdir / "checkpoints") == [4, 6, 8]  # keep=3
    assert not [d for d in os.listdir(workdir / "checkpoints") if "tmp" in d]
    assert _state_bytes(workdir / "checkpoints" / "6") == before  # the good checkpoint was only read


def test_checkpoints_missing_an_item_fall_back_with_one_warning(base_run, tmp_path):
    """Step 6 lost its `state` item, step 4 its `data` item: one warning naming both, step 2 used."""
    workdir = _copy(base_run, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "6" / "state")
    shutil.rmtree(workdir / "checkpoints" / "4" / "data")
    before = _state_bytes(workdir / "checkpoints" / "2")
    rerun = _resume(workdir, base_run, "--config.checkpoint.keep=4")  # step 2 is kept to be compared
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    warnings = [line for line in rerun.stderr.splitlines() if "is missing" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING"), rerun.stderr[-3000:]
    assert "item 'state' is missing" in warnings[0] and "item 'data' is missing" in warnings[0], warnings[0]
    assert "Traceback" not in rerun.stderr and "Event loop is closed" not in rerun.stderr, rerun.stderr[-3000:]
    assert _summary(rerun.stdout)["resumed_from_step"] == 2
    assert _state_bytes(workdir / "checkpoints" / "2") == before
    # Set aside for inspection, not deleted; the run saved steps 4, 6 and 8 again.
    assert sorted(d.split("-")[0] for d in os.listdir(tmp_path / "run" / "checkpoints_corrupt")) == ["4", "6"]
    assert _steps(workdir / "checkpoints") == [2, 4, 6, 8]


def _small_state(value):
    return {"w": jnp.full((4, 3), value, jnp.float32), "step": jnp.asarray(value, jnp.int32)}


def test_injected_enospc_names_the_step_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """In process, any platform: the `data` item's write fails with ENOSPC."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as h

    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, every_steps=2, keep=3, async_save=True)
    assert ckpt.save(2, _small_state(2), {"pos": 2})
    ckpt.wait()
    original = h.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, path):
        if os.path.basename(str(path.parent)).startswith("4."):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return await original(self, x, path)

    monkeypatch.setattr(h.JsonCheckpointHandler, "_save_fn", full_disk)
    with pytest.raises(CheckpointSaveError) as raised:
        ckpt.save(4, _small_state(4), {"pos": 4})
        ckpt.wait()  # the write is asynchronous: the failure surfaces here (or at the next save)
    message = str(raised.value)
    assert "checkpoint step 4" in message and "No space left on device" in message, message
    assert "newest complete checkpoint is step 2" in message and "\n" not in message, message
    ckpt.wait()  # raised once, not again at exit
    ckpt.close()
    monkeypatch.undo()
    assert _steps(directory) == [2]
    reopened = Checkpointer(directory, every_steps=2, keep=3)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, state, data = resume(reopened, directory, _small_state(0), jax.tree.map(lambda _: one, _small_state(0)))
    assert (step, data, int(state["step"])) == (2, {"pos": 2}, 2)
    np.testing.assert_array_equal(np.asarray(state["w"]), 2.0)
    reopened.close()
    assert "Event loop is closed" not in capsys.readouterr().err


def _unshare_works():
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


def test_full_tmpfs_during_save_exits_74_then_resumes(base_run, tmp_path):
    """A real full disk: the workdir on a 4 MiB tmpfs (in a private mount namespace, no root needed
    where user namespaces are allowed), filled up to 200 kB before the step-8 save."""
    reason = _unshare_works()
    if reason:
        pytest.skip(f"no real full disk here ({reason}); test_injected_enospc_* covers ENOSPC in process")
    mount = tmp_path / "mnt"
    mount.mkdir()
    workdir = mount / "run"
    args = " ".join(f"'{a}'" for a in _cli(workdir, base_run / "tfds", *RUN))
    script = f"""
set -e
mount -t tmpfs -o size=4m none {mount}
cp -a {base_run / 'base'} {workdir}
avail=$(df -B1 --output=avail {mount} | tail -1)
fallocate -l $((avail - 200000)) {mount}/filler
set +e
{args} > {tmp_path}/full.out 2> {tmp_path}/full.err
echo $? > {tmp_path}/full.rc
ls {workdir}/checkpoints > {tmp_path}/full.ls
rm {mount}/filler
{args} > {tmp_path}/again.out 2> {tmp_path}/again.err
echo $? > {tmp_path}/again.rc
ls {workdir}/checkpoints > {tmp_path}/again.ls
"""
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(2), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    assert read("full.rc").strip() == "74", read("full.err")[-3000:]
    err = read("full.err")
    last = err.strip().splitlines()[-1]
    assert last.startswith("contrastive-jax: saving checkpoint step 8") and "No space left on device" in last, err
    assert "newest complete checkpoint is step 6" in last
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    assert [d for d in read("full.ls").split() if d.isdigit()] == ["2", "4", "6"]  # 8 was never complete
    assert read("again.rc").strip() == "0", read("again.err")[-3000:]
    assert "Resuming from step 6" in read("again.err")
    assert "an interrupted write of checkpoint step 8" in read("again.err")
    assert read("again.ls").split() == ["4", "6", "8"]


def test_abandoned_orbax_task_errors_print_nothing_but_others_still_do():
    """asyncio logs "Task exception was never retrieved" (with a traceback) when the garbage
    collector meets a failed task nobody awaited — what orbax leaves after a failed checkpoint
    read, at a moment that depends on GC timing. The filter drops those whose traceback runs
    through orbax, and those of real tensorstore futures (the open of a corrupt zarr array, the
    read of a truncated chunk) wrapped in tasks, whose tracebacks hold only asyncio's frames — the
    shape that reached a CI run's stderr once. Nothing else: a user's own abandoned coroutine, and
    a user's own abandoned future, still print."""
    code = r'''
import asyncio, gc, os, sys, tempfile
import numpy as np
import tensorstore as ts
from contrastive_jax.train.checkpoint import quiet_background_failures
quiet_background_failures()
corrupt, cut = tempfile.mkdtemp(), tempfile.mkdtemp()
with open(os.path.join(corrupt, ".zarray"), "w") as fh:
    fh.write("cut in half by a crash")
spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": cut}}
ts.open({**spec, "metadata": {"shape": [1000], "chunks": [1000], "dtype": "<f4", "compressor": {"id": "zstd"}}},
        create=True).result().write(np.random.default_rng(0).random(1000, np.float32)).result()
opened = ts.open(spec).result()
with open(os.path.join(cut, "0"), "r+b") as fh:
    fh.truncate(os.path.getsize(fh.name) // 2)
async def abandon(awaitable, expected):
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait([task])
    assert expected in str(task._exception), task._exception  # failed, and nobody retrieved it
    del task
    gc.collect()
async def abandon_all():
    await abandon(ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": corrupt}}), "tensorstore_spec")
    await abandon(opened.read(), "FAILED_PRECONDITION: ")
    users = asyncio.get_running_loop().create_future()
    users.set_exception(ValueError("the user's own future"))
    await abandon(users, "the user's own future")
asyncio.run(abandon_all())
src = "async def read():\n    raise ValueError('OUT_OF_RANGE: byte range not valid')\n"
for where in ("/site-packages/orbax/checkpoint/_src/serialization/fake.py", "/home/user/mine.py"):
    ns = {}
    exec(compile(src, where, "exec"), ns)
    loop = asyncio.new_event_loop()
    task = loop.create_task(ns["read"]())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()
print("done", file=sys.stderr)
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("exception was never retrieved") == 2, proc.stderr
    assert "mine.py" in proc.stderr and "the user's own future" in proc.stderr, proc.stderr
    assert "orbax" not in proc.stderr and "tensorstore" not in proc.stderr and "zstd" not in proc.stderr.lower(), proc.stderr
