"""Workdirs on object storage: ``--workdir s3://bucket/run`` against moto's S3 server on 127.0.0.1.

The server runs in this process (moto's ThreadedMotoServer, a real HTTP endpoint, nothing leaves
the machine); trainers and ``contrastive_jax.storage`` reach it through ``AWS_ENDPOINT_URL_S3``.
"""
import json
import os
import signal
import subprocess
import sys
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import storage
from contrastive_jax.train.checkpoint import COMMIT_MARKER, Checkpointer, load_params_from
from contrastive_jax.train.workdir import resume
from tests.train.test_resilience import _cli, _env, _final_params, _wait_for_stderr_line
from tests.train.test_train import REPO

# No evaluation: none is compared, and it was a third of each run's cost.
RUN = ["--config.train.total_steps=6", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3",
       "--config.eval.evaluators=[]"]
# In a trainer subprocess: the upload of checkpoint step CJ_FAULT_STEP stops for good after 3 files
# (as if the job were killed or the network lost mid-upload); a line on stderr says when.
_HANG_UPLOAD = """
import asyncio, os, sys
import s3fs
_orig, _n = s3fs.S3FileSystem._put_file, [0]
async def _put_file(self, lpath, rpath, *a, **k):
    if "/checkpoints/" + os.environ["CJ_FAULT_STEP"] + "/" in rpath:
        _n[0] += 1
        if _n[0] > 3:
            print("FAULT: upload in flight", file=sys.stderr, flush=True)
            await asyncio.sleep(600)
    return await _orig(self, lpath, rpath, *a, **k)
s3fs.S3FileSystem._put_file = _put_file
from contrastive_jax.cli import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def s3(moto_s3, tmp_path_factory):
    """The module's moto S3 server (tests/conftest.py); yields a function that creates a fresh
    bucket and returns its ``s3://`` URL. Checkpoint staging dirs (also those of trainer
    subprocesses, which inherit the environment) go under pytest's tmp."""
    moto_s3.setenv("CONTRASTIVE_JAX_STAGING_DIR", str(tmp_path_factory.mktemp("staging")))

    def bucket():
        name = f"cj-{uuid.uuid4().hex[:12]}"
        fs, _ = storage.filesystem(f"s3://{name}")
        fs.mkdir(name)
        return f"s3://{name}"

    return bucket


def test_storage_layer_behaves_alike_locally_and_on_s3(s3, tmp_path):
    for root in (str(tmp_path / "local"), s3() + "/run"):
        storage.makedirs(root)
        storage.write_json(storage.join(root, "config.json"), {"a": 1})
        storage.append_text(storage.join(root, "m.jsonl"), "1\n")
        storage.append_text(storage.join(root, "m.jsonl"), "2\n")
        assert storage.read_json(storage.join(root, "config.json")) == {"a": 1}, root
        assert storage.read_text(storage.join(root, "m.jsonl")) == "1\n2\n", root
        assert sorted(storage.listdir(root)) == ["config.json", "m.jsonl"], root
        assert storage.isfile(storage.join(root, "m.jsonl")) and not storage.isdir(storage.join(root, "m.jsonl"))
        with storage.writing_locally(storage.join(root, "tok.json")) as local:
            with open(local, "w") as fh:
                fh.write("tok")
        with storage.reading_locally(storage.join(root, "tok.json")) as local:
            assert open(local).read() == "tok", root
        storage.remove(storage.join(root, "m.jsonl"))
        assert not storage.exists(storage.join(root, "m.jsonl")), root
    assert sorted(os.listdir(tmp_path / "local")) == ["config.json", "tok.json"]  # really written locally
    with pytest.raises(FileNotFoundError, match="bucket 'cj-no-such-bucket' does not exist"):
        storage.makedirs("s3://cj-no-such-bucket/run")


def _tree(value):
    return {"w": jnp.full((8, 4), value, jnp.float32), "b": jnp.arange(3, dtype=jnp.int32) + int(value)}


def test_checkpointer_on_s3_commits_prunes_restores_and_ignores_uncommitted(s3):
    directory = s3() + "/run/checkpoints"
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, _tree(0))
    ckpt = Checkpointer(directory, every_steps=2, keep=2)
    for step in (2, 4, 6):
        assert ckpt.save(step, _tree(step), {"pos": step})
    ckpt.close()
    assert not os.path.exists(ckpt.local)  # the staging dir is temporary
    assert sorted(storage.listdir(directory)) == ["4", "6"]  # keep=2: step 2 deleted remotely
    assert storage.isfile(f"{directory}/6/{COMMIT_MARKER}")
    # An upload cut short: the files of step 8 without the marker. It must never be "latest".
    fs, path = storage.filesystem(directory)
    for key in fs.find(f"{path}/6"):
        if not key.endswith(COMMIT_MARKER):
            fs.copy(key, key.replace(f"{path}/6/", f"{path}/8/"))
    reopened = Checkpointer(directory, every_steps=2, keep=2)
    assert reopened.all_steps() == [4, 6] and reopened.latest_step() == 6
    step, state, data = resume(reopened, directory, _tree(0), shardings)
    assert (step, data) == (6, {"pos": 6})
    np.testing.assert_array_equal(np.asarray(state["w"]), 6.0)
    # Saving step 8 replaces the debris and commits it.
    assert reopened.save(8, _tree(8), {"pos": 8})
    reopened.close()
    fresh = Checkpointer(directory, every_steps=2, keep=2)
    step, state, data = resume(fresh, directory, _tree(0), shardings)
    assert (step, data, fresh.all_steps()) == (8, {"pos": 8}, [6, 8])
    np.testing.assert_array_equal(np.asarray(state["b"]), np.arange(3) + 8)
    fresh.close()
    # checkpoint.init_from=s3://.../run:w takes the newest committed step's `w` only.
    loaded, taken = load_params_from(directory.rsplit("/", 1)[0] + ":w", _tree(0), shardings)
    assert taken == ["w"] and loaded["b"] is None
    np.testing.assert_array_equal(np.asarray(loaded["w"]), 8.0)


def test_s3_workdir_killed_mid_upload_resumes_from_last_committed_step(s3, tmp_path):
    """SIGKILL while the step-4 upload is half done: the re-run ignores the uncommitted step 4,
    resumes from step 2 and ends with the same parameters as an uninterrupted local run."""
    workdir, data_dir = s3() + "/run", tmp_path / "tfds"
    env = _env(2)
    local = tmp_path / "local"
    reference = subprocess.run(_cli(local, data_dir, *RUN), env=env, cwd=REPO, capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    cmd = _cli(workdir, data_dir, *RUN)
    proc = subprocess.Popen([sys.executable, "-c", _HANG_UPLOAD, *cmd[3:]], env={**env, "CJ_FAULT_STEP": "4"},
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_stderr_line(proc, "FAULT: upload in flight", "the step-4 upload")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpts = f"{workdir}/checkpoints"
    assert sorted(storage.listdir(ckpts)) == ["2", "4"]
    assert storage.isfile(f"{ckpts}/2/{COMMIT_MARKER}") and not storage.isfile(f"{ckpts}/4/{COMMIT_MARKER}")
    assert len(storage.filesystem(ckpts)[0].find(storage.filesystem(ckpts)[1] + "/4")) == 3  # cut short

    staging = os.environ["CONTRASTIVE_JAX_STAGING_DIR"]
    assert [d for d in os.listdir(staging) if d.startswith(f"contrastive_jax_staging_{proc.pid}_")]
    rerun = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # The killed trainer's staging dir was removed by the re-run (which removed its own at exit).
    assert not [d for d in os.listdir(staging) if d.startswith(f"contrastive_jax_staging_{proc.pid}_")]
    assert f"{ckpts}/4 has no {COMMIT_MARKER} marker" in rerun.stderr
    assert "Resuming from step 2" in rerun.stderr
    summary = json.loads(rerun.stdout[rerun.stdout.index("{\n"):])
    assert summary["resumed_from_step"] == 2 and summary["complete"]
    assert storage.read_json(f"{workdir}/summary.json") == summary
    assert storage.isfile(f"{workdir}/config.json") and storage.isfile(f"{workdir}/tokenizer.json")
    steps = [json.loads(x)["step"] for x in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    assert 6 in steps
    assert sorted(storage.listdir(ckpts)) == ["2", "4", "6"]
    assert all(storage.isfile(f"{ckpts}/{s}/{COMMIT_MARKER}") for s in (2, 4, 6))

    downloaded = tmp_path / "downloaded"
    storage.copy_dir_from(f"{ckpts}/6", str(downloaded / "checkpoints" / "6"))
    a, b = _final_params(local, 6), _final_params(downloaded, 6)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


def test_s3_checkpoint_faults_missing_item_and_failed_upload(s3, monkeypatch):
    """A remote step missing an item is set aside under ``checkpoints_corrupt/`` (on the bucket) and
    the previous one used; a failed upload is one CheckpointSaveError naming the step."""
    from contrastive_jax.train.checkpoint import CheckpointSaveError

    run = s3() + "/run"
    directory = run + "/checkpoints"
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, _tree(0))
    ckpt = Checkpointer(directory, every_steps=2, keep=3, async_save=False)
    for step in (2, 4):
        assert ckpt.save(step, _tree(step), {"pos": step})
    ckpt.close()
    storage.rmtree(f"{directory}/4/data")
    reopened = Checkpointer(directory, every_steps=2, keep=3)
    step, state, data = resume(reopened, directory, _tree(0), shardings)
    assert (step, data, reopened.all_steps()) == (2, {"pos": 2}, [2])
    aside = storage.listdir(run + "/checkpoints_corrupt")
    assert len(aside) == 1 and aside[0].startswith("4-")
    assert "state" in storage.listdir(f"{run}/checkpoints_corrupt/{aside[0]}")  # kept for inspection

    def lost_network(local_dir, dest):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(storage, "copy_dir_to", lost_network)
    assert reopened.save(4, _tree(4), {"pos": 4})  # the upload runs in the background
    with pytest.raises(CheckpointSaveError, match=r"uploading checkpoint step 4 to s3://.*ConnectionError: "
                                                  r"connection reset by peer.*newest complete checkpoint is step 2"):
        reopened.wait()
    assert reopened.all_steps() == [2]
    reopened.close()
