"""Objectives with state or token structure survive a SIGKILL: the resumed run's whole train
state -- parameters, optimizer state, the objective's state (iSogCLR's per-example temperatures
and moving averages, MoCo's queues and pointer, SwAV's queue) and the teacher (MoCo's momentum
encoder) -- is bitwise the uninterrupted run's, as is every logged loss."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contrastive_jax.train import load_config
from contrastive_jax.train.loop import train
from tests.train.test_resilience import _env, _wait_for_checkpoint
from tests.train.test_train import REPO, _read_metrics

STEPS = 6
# No evaluation (none is compared here; it was a third of a run's cost); the killed run
# checkpoints every 2 steps, the uninterrupted one only at its end (saving does not change
# training, which the bitwise comparison itself shows).
ARGS = [f"train.total_steps={STEPS}", "train.log_every_steps=1", "eval.every_steps=0", "eval.evaluators=[]",
        "log.progress=false", "log.tensorboard=false"]


def _state(workdir, step):
    """The whole saved TrainState of checkpoint ``step``, read onto one device."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path).item_metadata.tree
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return checkpointer.restore(path, target)


@pytest.mark.parametrize("name, state_keys", [
    ("isogclr", ("loss_state",)),
    ("moco", ("loss_state", "ema_params")),
    ("swav", ("loss_state",)),
    ("filip", ()),
    # loss.name='multi': sigmoid + captioning + self-distillation (DINO centres, EMA teacher).
    ("siglip2", ("loss_state", "ema_params")),
])
def test_sigkilled_stateful_run_resumes_bitwise(tmp_path, name, state_keys):
    config_path = os.path.join(REPO, "configs", f"{name}.py") + ":tiny"
    data_dir = str(tmp_path / "tfds")
    run = [*ARGS, f"data.data_dir={data_dir}"]
    overrides = [*run, "checkpoint.every_steps=2"]

    full = str(tmp_path / "full")
    train(load_config(config_path, [*run, f"checkpoint.every_steps={STEPS}"]), full)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "contrastive_jax.cli", "train", "--config", config_path, "--workdir", str(killed),
           *[f"--config.{o}" for o in overrides]]
    proc = subprocess.Popen(cmd, env=_env(8), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(proc, killed / "checkpoints", 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    train(load_config(config_path, overrides), str(killed))

    a, b = _state(full, STEPS), _state(str(killed), STEPS)
    for key in state_keys:
        assert jax.tree.leaves(a[key]), f"{name}: {key} is empty"
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), (name, jax.tree_util.keystr(path))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    full_losses = {m["step"]: m["train/loss"] for m in _read_metrics(full) if "train/loss" in m}
    killed_losses = {m["step"]: m["train/loss"] for m in _read_metrics(str(killed)) if "train/loss" in m}
    assert len(full_losses) == STEPS and all(killed_losses[s] == full_losses[s] for s in killed_losses)
