"""MoCo (losses/moco.py): InfoNCE against teacher keys + queue (dense and chunked, 1 and 8
devices) against float64 loops, the FIFO queue over steps, the momentum schedule, hand-derived
identities, config errors, and training through build_training (8 devices = 1, queue sharded)."""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from contrastive_jax import losses
from contrastive_jax.losses import moco
from contrastive_jax.losses.config import defaults as loss_defaults
from contrastive_jax.parallel import to_host
from contrastive_jax.train import load_config

from tests.train.test_train import REPO, build

MOCO = os.path.join(REPO, "configs", "moco.py")


def _unit(rng, *shape):
    a = rng.normal(size=shape)
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# float64 reference: one direction, plain loops
# ---------------------------------------------------------------------------------------------


def _ref_direction(q, k, queue, filled, s, in_batch):
    """(loss, dloss/dq [B, D], dloss/ds) of mean_i [lse_i - s q_i.k_i] in float64, where lse_i runs
    over k_i, the other keys (in_batch) and queue slots 0..filled-1."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    queue = np.zeros((0, q.shape[1])) if queue is None else np.asarray(queue, np.float64)
    B = q.shape[0]
    loss, dq, ds = 0.0, np.zeros_like(q), 0.0
    for i in range(B):
        cands = [k[j] for j in range(B) if in_batch or j == i] + [queue[m] for m in range(filled)]
        logits = np.array([s * float(q[i] @ c) for c in cands])
        top = logits.max()
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        p = np.exp(logits - lse)
        loss += (lse - s * float(q[i] @ k[i])) / B
        dq[i] = s * (sum(pj * c for pj, c in zip(p, cands)) - k[i]) / B
        ds += (sum(pj * float(q[i] @ c) for pj, c in zip(p, cands)) - float(q[i] @ k[i])) / B
    return loss, dq, ds


# ---------------------------------------------------------------------------------------------
# moco_infonce: dense / chunked / 8-device chunked against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("where", ["dense", "chunked", "chunked_8"])
def test_infonce_value_and_gradient_match_float64(where, in_batch):
    rng = np.random.default_rng(0)
    B, D, K, filled, s = 16, 8, 24, 19, 6.0
    q, k, queue = _unit(rng, B, D), _unit(rng, B, D), _unit(rng, K, D)
    mesh = Mesh(np.array(jax.devices()), ("data",)) if where == "chunked_8" else None
    impl = "dense" if where == "dense" else "chunked"

    def f(q, s):
        # block 5: tiles never divide B + K, so padding rows / columns are exercised.
        return moco.moco_infonce(q, k, queue, scale=s, queue_filled=filled, in_batch_negatives=in_batch,
                                 impl=impl, block_size=5, mesh=mesh)

    loss, (gq, gs) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(q), jnp.float32(s))
    want, want_dq, want_ds = _ref_direction(q, k, queue, filled, s, in_batch)
    np.testing.assert_allclose(float(loss), want, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(gq), want_dq, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(gs), want_ds, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the objective, both modes, non-empty queue
# ---------------------------------------------------------------------------------------------


def _objective(mode="image", impl="dense", **moco_fields):
    cfg = loss_defaults()
    cfg.name, cfg.impl, cfg.block_size = "moco", impl, 6
    cfg.moco.update(mode=mode, **moco_fields)
    return losses.make_objective(cfg)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("mode", ["image", "image_text"])
def test_objective_loss_and_gradient_match_float64_both_modes(mode, impl):
    rng = np.random.default_rng(1)
    B, D, K, filled, tau = 8, 6, 10, 7, 0.2
    obj = _objective(mode, impl, queue_size=K, embed_dim=D, temperature=tau)
    state = {f"queue_{m}": jnp.asarray(_unit(rng, K, D)) for m in obj.queue_names}
    state.update(ptr=jnp.int32(filled), filled=jnp.int32(filled))
    if mode == "image":
        student = {"image_views": _unit(rng, B, 2, D)}
        teacher = {"image_views": _unit(rng, B, 2, D)}
    else:
        student = {"image": _unit(rng, B, D), "text": _unit(rng, B, D)}
        teacher = {"image": _unit(rng, B, D), "text": _unit(rng, B, D)}

    def f(student):
        loss, metrics, _ = obj(dict(student, scale=jnp.float32(3.0), teacher=teacher), {}, state, jnp.int32(0))
        return loss

    loss, grads = jax.value_and_grad(f)(jax.tree.map(jnp.asarray, student))
    s = 1.0 / tau
    if mode == "image":
        v, t, Q = student["image_views"], teacher["image_views"], np.asarray(state["queue_image"])
        lab, gab, _ = _ref_direction(v[:, 0], t[:, 1], Q, filled, s, True)
        lba, gba, _ = _ref_direction(v[:, 1], t[:, 0], Q, filled, s, True)
        want, want_g = (lab + lba) / 2, {"image_views": np.stack([gab, gba], axis=1) / 2}
    else:
        lit, git, _ = _ref_direction(student["image"], teacher["text"], np.asarray(state["queue_text"]), filled, s,
                                     True)
        lti, gti, _ = _ref_direction(student["text"], teacher["image"], np.asarray(state["queue_image"]), filled, s,
                                     True)
        want, want_g = (lit + lti) / 2, {"image": git / 2, "text": gti / 2}
    np.testing.assert_allclose(float(loss), want, rtol=2e-6)
    for key in want_g:
        np.testing.assert_allclose(np.asarray(grads[key]), want_g[key], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# queue: FIFO over three steps, wrap-around, more keys than slots
# ---------------------------------------------------------------------------------------------


def test_queue_fifo_over_three_steps_with_wraparound():
    rng = np.random.default_rng(2)
    B, D, K = 4, 3, 10  # 4 keys per step into 10 slots: step 3 wraps (slots 8, 9, 0, 1)
    obj = _objective("image_text", queue_size=K, embed_dim=D)
    state = obj.init_state()
    ref = {"image": [None] * K, "text": [None] * K}
    ptr = filled = 0
    for step in range(3):
        student = {"image": _unit(rng, B, D), "text": _unit(rng, B, D)}
        teacher = {"image": _unit(rng, B, D), "text": _unit(rng, B, D)}
        _, metrics, state = obj(dict(student, scale=1.0, teacher=teacher), {}, state, jnp.int32(step))
        for m in ("image", "text"):
            for i in range(B):
                ref[m][(ptr + i) % K] = teacher[m][i]
        ptr, filled = (ptr + B) % K, min(filled + B, K)
        assert int(state["ptr"]) == ptr and int(state["filled"]) == filled
        assert float(metrics["queue_filled"]) == pytest.approx(filled / K)
        for m in ("image", "text"):
            got = np.asarray(state[f"queue_{m}"])
            for slot in range(K):
                want = np.zeros(D, np.float32) if ref[m][slot] is None else ref[m][slot]
                np.testing.assert_array_equal(got[slot], want)
    assert ptr == 2 and filled == K  # the case exercised: wrapped, full


def test_enqueue_more_keys_than_slots_keeps_the_newest():
    keys = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    queue, ptr, filled = moco.enqueue(jnp.zeros((3, 2)), jnp.int32(1), jnp.int32(0), jnp.asarray(keys))
    # Writing keys 0..6 at slots 1, 2, 0, 1, 2, 0, 1 in order: the last writes win.
    want = np.zeros((3, 2), np.float32)
    for i in range(7):
        want[(1 + i) % 3] = keys[i]
    np.testing.assert_array_equal(np.asarray(queue), want)
    assert int(ptr) == (1 + 7) % 3 and int(filled) == 3


# ---------------------------------------------------------------------------------------------
# hand-derived identities
# ---------------------------------------------------------------------------------------------


def test_no_queue_and_teacher_equal_to_student_is_clip_softmax():
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(_unit(rng, 12, 8)), jnp.asarray(_unit(rng, 12, 8))
    scale = jnp.float32(7.5)
    obj = _objective("image_text", learned_scale=True)
    loss, _, _ = obj({"image": x, "text": y, "scale": scale, "teacher": {"image": x, "text": y}}, {},
                     obj.init_state(), jnp.int32(0))
    # CLIP's loss: mean of image->text and text->image cross-entropies, the same pairs and scale.
    want = losses.softmax_contrastive_loss(x, y, scale=scale)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("in_batch, filled, n_cands", [(True, 20, 8 + 20), (True, 5, 8 + 5), (False, 20, 1 + 20)])
def test_equal_embeddings_give_log_of_the_candidate_count(impl, in_batch, filled, n_cands):
    # Every logit equal: the positive is one of n equally likely candidates, loss = log n.
    v = np.zeros((8, 4), np.float32)
    v[:, 0] = 1.0
    loss = moco.moco_infonce(jnp.asarray(v), jnp.asarray(v), jnp.asarray(np.tile(v[:1], (20, 1))), scale=5.0,
                             queue_filled=filled, in_batch_negatives=in_batch, impl=impl, block_size=3)
    np.testing.assert_allclose(float(loss), math.log(n_cands), rtol=1e-6)


def test_momentum_schedule_values():
    const = _objective("image", momentum=0.996)
    assert [float(const.teacher_decay(jnp.int32(t))) for t in (0, 50, 10**6)] == pytest.approx([0.996] * 3)
    cos = _objective("image", momentum=0.99, momentum_schedule="cosine", momentum_steps=100)
    got = [float(cos.teacher_decay(jnp.int32(t))) for t in (0, 25, 50, 100, 250)]
    # v3: m_t = 1 - (1 - m0)(1 + cos(pi t / T)) / 2, held at 1 after T.
    want = [1 - 0.01 * (1 + math.cos(math.pi * min(t, 100) / 100)) / 2 for t in (0, 25, 50, 100, 250)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert got[0] == pytest.approx(0.99) and got[2] == pytest.approx(0.995) and got[3] == 1.0


# ---------------------------------------------------------------------------------------------
# config errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, match", [
    (dict(mode="video"), r"config.loss.moco.mode='video' is invalid"),
    (dict(queue_size=-1), r"config.loss.moco.queue_size=-1 is invalid"),
    (dict(queue_size=16), r"config.loss.moco.embed_dim=0 is invalid"),
    (dict(temperature=0.0), r"config.loss.moco.temperature=0.0 is invalid"),
    (dict(momentum=1.5), r"config.loss.moco.momentum=1.5 is invalid"),
    (dict(momentum_schedule="cosine"), r"config.loss.moco.momentum_steps=0 is invalid"),
    (dict(momentum_schedule="step"), r"config.loss.moco.momentum_schedule='step' is invalid"),
    (dict(in_batch_negatives=False), r"config.loss.moco.in_batch_negatives=False is invalid"),
])
def test_bad_config_values_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        _objective(**{"mode": "image", **fields})


def test_queue_size_must_divide_over_the_mesh_and_match_the_embedding():
    cfg = loss_defaults()
    cfg.name = "moco"
    cfg.moco.update(queue_size=12, embed_dim=4)
    with pytest.raises(ValueError, match=r"config.loss.moco.queue_size=12 is invalid: must be a multiple of the 8"):
        losses.make_objective(cfg, Mesh(np.array(jax.devices()), ("data",)), ("data",))
    with pytest.raises(ValueError, match="config.loss.impl='ring' is not supported"):
        _objective("image", impl="ring")
    obj = _objective("image_text", queue_size=8, embed_dim=4)
    out = {"image": jnp.zeros((2, 6)), "text": jnp.zeros((2, 6)), "scale": 1.0}
    with pytest.raises(ValueError, match=r"config.loss.moco.embed_dim=4 is invalid"):
        obj(dict(out, teacher=out), {}, obj.init_state(), jnp.int32(0))


# ---------------------------------------------------------------------------------------------
# training through build_training: 8 devices = 1, queue sharded along K
# ---------------------------------------------------------------------------------------------

_B = 16


@functools.lru_cache(maxsize=None)
def _train(n_devices):
    # 2 views x 16 = 32 keys per step into 40 slots: step 2 wraps the pointer (to 24).
    config = load_config(MOCO + ":tiny", ["optim.warmup_steps=1", "loss.moco.queue_size=40", "loss.block_size=8"])
    training = build(config, [("data", n_devices)], n_devices)
    state = training.init_state(seed=0)
    rng = np.random.default_rng(4)
    metrics = []
    for _ in range(2):
        batch = {"image_views": rng.normal(size=(_B, 2, 32, 32, 3)).astype(np.float32)}
        state, m = training.step(state, training.device_batch(batch))
        metrics.append(to_host(m))
    return state, metrics


def test_training_eight_devices_equal_one_with_sharded_queue():
    s1, m1 = _train(1)
    s8, m8 = _train(8)
    q8 = s8.loss_state["queue_image"]
    assert q8.sharding.spec == P(("data",))
    assert len(q8.addressable_shards) == 8 and q8.addressable_shards[0].data.shape == (5, 32)
    assert [int(to_host(s["ptr"])) for s in (s1.loss_state, s8.loss_state)] == [24, 24]
    assert [float(m["queue_filled"]) for m in m8] == pytest.approx([32 / 40, 1.0])
    np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=2e-5)
    np.testing.assert_allclose(to_host(q8), to_host(s1.loss_state["queue_image"]), rtol=2e-5, atol=1e-6)
    # The queue holds unit teacher keys where written (all 40 slots after 64 writes).
    np.testing.assert_allclose(np.linalg.norm(to_host(q8), axis=1), 1.0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(to_host(s1.ema_params)), jax.tree.leaves(to_host(s8.ema_params))):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)
