"""The train step and loop: sharded vs unsharded, learning, resume vs uninterrupted."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from contrastive_jax.parallel import make_mesh, to_host
from contrastive_jax.train import build_training, load_config
from contrastive_jax.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


class _Vocab:
    vocab_size = 40


def _random_batch(batch, image_size, length, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    lengths = rng.integers(2, length + 1, size=batch)
    text = rng.integers(3, _Vocab.vocab_size, size=(batch, length)).astype(np.int32)
    for i, n in enumerate(lengths):
        text[i, n - 1] = 1  # EOS
        text[i, n:] = 0  # pad
    return {"image": images, "text": text}


def build(config, mesh_spec, n_devices, **kwargs):
    """The loop's own builder on the first ``n_devices`` devices (text vocabulary of ``_Vocab``)."""
    return build_training(config, make_mesh(mesh_spec, jax.devices()[:n_devices]), tokenizer=_Vocab, **kwargs)


def _run_steps(config, mesh_spec, n_devices, batches):
    training = build(config, mesh_spec, n_devices)
    state = training.init_state(seed=0)
    init_params = to_host(state.params)
    losses = []
    for b in batches:
        state, metrics = training.step(state, training.device_batch(b))
        losses.append(float(to_host(metrics["loss"])))
    return losses, init_params, to_host(state.params)


_BATCHES = [_random_batch(16, 32, 8, seed=s) for s in range(2)]


def _step_config(impl):
    return load_config(QUICKSTART + ":tiny", ["optim.warmup_steps=1", f"loss.impl={impl}", "loss.block_size=8",
                                              "data.max_text_len=8"])


@functools.lru_cache(maxsize=None)
def _single_device_reference(impl):
    return _run_steps(_step_config(impl), [("data", 1)], 1, _BATCHES)


@pytest.mark.parametrize(
    "mesh_spec, n_devices, impl",
    [
        # (4- and 8-device pure data parallelism with micro-batches and logical fsdp/tensor rules
        # are covered in test_training_system.py.)
        ([("data", 2)], 2, "dense"),
        ([("data", 8)], 8, "chunked"),
        ([("data", 2), ("fsdp", 4)], 8, "chunked"),
    ],
)
def test_sharded_train_step_matches_single_device(mesh_spec, n_devices, impl):
    config = _step_config(impl)
    ref_losses, init_params, ref_params = _single_device_reference(impl)
    losses, _, params = _run_steps(config, mesh_spec, n_devices, _BATCHES)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    # Same update on every parameter, not just the same loss: a lost all-reduce factor or a
    # wrongly replicated gradient would show here.
    for path, (a, b) in zip(
        jax.tree_util.tree_leaves_with_path(ref_params), zip(jax.tree.leaves(ref_params), jax.tree.leaves(params))
    ):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path[0]))
    # The steps really moved the parameters, so the comparison above is not vacuous. (Some leaves
    # legitimately get no gradient: the sigmoid loss's bias, attention key biases.)
    moved = [np.abs(a - b).max() > 1e-5 for a, b in zip(jax.tree.leaves(init_params), jax.tree.leaves(ref_params))]
    assert np.mean(moved) > 0.8, np.mean(moved)


def _tiny(workdir, *overrides):
    config = load_config(QUICKSTART + ":tiny", ["log.progress=false", *overrides])
    config.data.data_dir = os.path.join(os.path.dirname(workdir), "tfds")
    return config


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_short_run_lowers_loss_and_writes_summary(tmp_path):
    workdir = str(tmp_path / "run")
    summary = train(_tiny(workdir, "train.total_steps=40", "train.log_every_steps=5", "eval.every_steps=20"), workdir)
    losses = [m["train/loss"] for m in _read_metrics(workdir) if "train/loss" in m]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < losses[0] - 0.1, losses
    for key in ("zeroshot/color/top1", "zeroshot/kind/top1", "retrieval/image_to_text/R@1", "retrieval/text_to_image/R@5"):
        assert key in summary["eval"], key
    assert summary["steps"] == 40 and summary["examples_seen"] == 40 * 32
    with open(os.path.join(workdir, "summary.json")) as fh:
        assert json.load(fh)["eval"] == summary["eval"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_step_compiled_during_setup_is_used_and_trains_bitwise_as_compiled_at_the_first_step(tmp_path, monkeypatch):
    """The loop compiles the step on a thread while it sets up (loop._StepCompiler): that very
    executable runs the first step, and the run equals one whose step is compiled at the first step."""
    from contrastive_jax.train import loop
    from tests.train.test_resilience import _final_params

    args = ["train.total_steps=3", "train.log_every_steps=1", "eval.every_steps=0", "eval.evaluators=[]",
            "checkpoint.every_steps=3", "log.tensorboard=false"]
    used = []
    real_get = loop._StepCompiler.get

    def get(self, state, batch):
        compiled = real_get(self, state, batch)
        used.append(compiled is self._compiled and compiled is not None)
        return compiled

    monkeypatch.setattr(loop._StepCompiler, "get", get)
    ahead = str(tmp_path / "ahead")
    train(_tiny(ahead, *args), ahead)
    assert used == [True]
    # No shapes to compile from (as for a streamed source): the loop's own fallback compiles
    # the step at the first step.
    from contrastive_jax.data.pipeline import TrainIterator
    monkeypatch.setattr(TrainIterator, "peek_shapes", lambda self: None)
    first = str(tmp_path / "first")
    train(_tiny(first, *args), first)
    assert used == [True, False]
    for x, y in zip(jax.tree.leaves(_final_params(ahead)), jax.tree.leaves(_final_params(first)), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert [m["train/loss"] for m in _read_metrics(ahead) if "train/loss" in m] == \
        [m["train/loss"] for m in _read_metrics(first) if "train/loss" in m]
