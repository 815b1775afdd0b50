"""The stateful-objective protocol in the train step: state threaded through TrainState.loss_state
(sharded, kept on a non-finite step), the teacher held in the EMA slot and run without gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import losses
from contrastive_jax.parallel import to_host
from contrastive_jax.train import load_config

from tests.train.test_train import QUICKSTART, _random_batch, build

NUM_IDS = 32
DECAY = 0.75


class _Counting(losses.StatefulObjective):
    """CLIP's loss plus state: how often each example id was seen ([NUM_IDS], split over the batch
    axes) and the number of steps; with a teacher, the mean |teacher - student| image gap."""

    teacher = True

    def init_state(self):
        return {"seen": jnp.zeros((NUM_IDS,), jnp.float32), "steps": jnp.zeros((), jnp.int32)}

    def state_specs(self, batch_axes):
        return {"seen": P(batch_axes), "steps": P()}

    def teacher_decay(self, step):
        return jnp.float32(DECAY)

    def __call__(self, out, batch, state, step):
        loss, metrics = losses.softmax_contrastive_loss(out["image"], out["text"], scale=out["scale"],
                                                        return_metrics=True)
        seen = state["seen"].at[batch["example_id"]].add(1.0)
        gap = jnp.mean(jnp.abs(out["teacher"]["image"] - jax.lax.stop_gradient(out["image"])))
        new = {"seen": seen, "steps": state["steps"] + 1}
        factor = jnp.mean(batch["loss_factor"]) if "loss_factor" in batch else 1.0
        return loss * factor, dict(metrics, teacher_gap=gap), new


@pytest.fixture
def counting():
    losses.register_objective("test_counting", lambda cfg, mesh, axes: _Counting())
    yield
    losses.OBJECTIVES.pop("test_counting")


def _config(*extra):
    return load_config(QUICKSTART + ":tiny", ["optim.warmup_steps=1", "loss.name=test_counting", "data.max_text_len=8",
                                              *extra])


def _batches(n=3):
    out = []
    for s in range(n):
        b = _random_batch(16, 32, 8, seed=s)
        b["example_id"] = np.random.default_rng(100 + s).integers(0, NUM_IDS, size=16).astype(np.int32)
        out.append(b)
    return out


def _run(n_devices, batches, *extra):
    training = build(_config(*extra), [("data", n_devices)], n_devices)
    state = training.init_state(seed=0)
    params = [to_host(state.params)]
    emas = [to_host(state.ema_params)]
    metrics = []
    for b in batches:
        state, m = training.step(state, training.device_batch(b))
        params.append(to_host(state.params))
        emas.append(to_host(state.ema_params))
        metrics.append(to_host(m))
    return training, state, params, emas, metrics


def test_state_threaded_and_teacher_is_the_ema_of_the_parameters(counting):
    batches = _batches()
    training, state, params, emas, metrics = _run(1, batches)
    want = np.zeros(NUM_IDS)
    for b in batches:
        np.add.at(want, b["example_id"], 1.0)
    np.testing.assert_array_equal(to_host(state.loss_state["seen"]), want)
    assert int(to_host(state.loss_state["steps"])) == 3
    # The teacher starts as the parameters and follows t <- d t + (1 - d) p after each update
    # (float64 recurrence over the recorded parameter trajectory).
    ref = jax.tree.map(lambda p: np.asarray(p, np.float64), params[0])
    for k in range(1, 4):
        ref = jax.tree.map(lambda t, p: DECAY * t + (1 - DECAY) * np.asarray(p, np.float64), ref, params[k])
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(emas[k])):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    # Step 0: teacher == student (same parameters, deterministic forward); later they differ.
    assert float(metrics[0]["teacher_gap"]) == 0.0
    assert float(metrics[2]["teacher_gap"]) > 0.0
    # The teacher gets no optimizer state: the optimizer state has the params' structure only.
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(training.init_state(seed=0).opt_state)


def test_state_is_sharded_and_eight_devices_equal_one(counting):
    batches = _batches(2)
    _, s1, p1, e1, m1 = _run(1, batches)
    _, s8, p8, e8, m8 = _run(8, batches)
    assert s8.loss_state["seen"].sharding.spec == P(("data",))
    assert len(s8.loss_state["seen"].addressable_shards) == 8
    np.testing.assert_array_equal(to_host(s8.loss_state["seen"]), to_host(s1.loss_state["seen"]))
    for a, b in zip(jax.tree.leaves(e1[-1]), jax.tree.leaves(e8[-1])):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=2e-5)


def test_gradcache_microbatches_give_the_same_state_and_teacher(counting):
    batches = _batches(2)
    _, s1, p1, e1, m1 = _run(2, batches)
    _, s4, p4, e4, m4 = _run(2, batches, "train.microbatch_size=4")
    np.testing.assert_array_equal(to_host(s4.loss_state["seen"]), to_host(s1.loss_state["seen"]))
    np.testing.assert_allclose([m["teacher_gap"] for m in m4], [m["teacher_gap"] for m in m1], rtol=1e-4, atol=1e-7)
    for a, b in zip(jax.tree.leaves(p1[-1]), jax.tree.leaves(p4[-1])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_nonfinite_step_keeps_the_state(counting):
    batches = _batches(2)
    batches[1]["loss_factor"] = np.full((16,), np.nan, np.float32)
    _, state, params, emas, metrics = _run(1, batches, "train.nonfinite=skip")
    assert float(metrics[1]["finite"]) == 0.0
    want = np.zeros(NUM_IDS)
    np.add.at(want, batches[0]["example_id"], 1.0)
    np.testing.assert_array_equal(to_host(state.loss_state["seen"]), want)
    assert int(to_host(state.loss_state["steps"])) == 1
    for a, b in zip(jax.tree.leaves(emas[1]), jax.tree.leaves(emas[2])):
        np.testing.assert_array_equal(a, b)


def test_teacher_objective_rejects_a_separate_ema_decay(counting):
    with pytest.raises(ValueError, match="config.optim.ema_decay must be 0"):
        build(_config("optim.ema_decay=0.9"), [("data", 1)], 1)
