"""SwAV (losses/swav.py, the prototypes of models/multiview.py): Sinkhorn-Knopp and the swapped
prediction against float64 loop references, the queue over steps, hand-derived properties, the
global-batch normalization on a mesh, and training through build_training (8 devices = 1,
prototypes held by optim.freeze_until)."""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax import losses, models
from contrastive_jax.losses import config as loss_config_lib
from contrastive_jax.losses import swav
from contrastive_jax.parallel import to_host
from contrastive_jax.train import load_config

from tests.train.test_train import build

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWAV = os.path.join(REPO, "configs", "swav.py")


# ---------------------------------------------------------------------------------------------
# float64 references, written with explicit loops
# ---------------------------------------------------------------------------------------------


def sinkhorn_ref(scores, eps, iters):
    s = np.asarray(scores, np.float64)
    n, k = s.shape
    q = np.exp(s / eps)  # no max shift here: the reference stays the textbook formula
    total = sum(q[i, j] for i in range(n) for j in range(k))
    q = q / total
    for _ in range(iters):
        for j in range(k):
            col = sum(q[i, j] for i in range(n))
            for i in range(n):
                q[i, j] = q[i, j] / col / k
        for i in range(n):
            row = sum(q[i, j] for j in range(k))
            for j in range(k):
                q[i, j] = q[i, j] / row / n
    return q * n


def log_softmax_ref(x):
    m = np.max(x)
    return x - m - math.log(sum(math.exp(v - m) for v in x))


def swav_ref(global_scores, local_scores, codes, temp):
    """Loss and d loss / d scores (global and local) in float64; codes [B, V, K] are constants."""
    g = np.asarray(global_scores, np.float64)
    views = np.concatenate([g, np.asarray(local_scores, np.float64)], axis=1) if local_scores is not None else g
    b, t, k = views.shape
    v = g.shape[1]
    loss, grad = 0.0, np.zeros_like(views)
    pairs = v * (t - 1)
    for cv in range(v):
        for pv in range(t):
            if pv == cv:
                continue
            for i in range(b):
                logp = log_softmax_ref(views[i, pv] / temp)
                q = codes[i, cv]
                loss -= sum(q[j] * logp[j] for j in range(k)) / b / pairs
                # d/dx of -sum_j q_j log softmax(x / T)_j = (softmax(x / T) - q) / T (sum q = 1).
                grad[i, pv] += (np.exp(logp) - q) / temp / b / pairs
    return loss, grad[:, :v], grad[:, v:]


def _scores(rng, b, v, k, scale=1.0):
    return (scale * rng.uniform(-1, 1, size=(b, v, k))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps, iters", [(0.05, 3), (0.5, 1), (0.3, 7)])
def test_sinkhorn_matches_float64_loops(eps, iters):
    s = np.random.default_rng(0).uniform(-1, 1, size=(12, 5)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x: swav.sinkhorn_knopp(x, eps, iters))(s))
    np.testing.assert_allclose(got, sinkhorn_ref(s, eps, iters), rtol=2e-5, atol=1e-7)


def test_sinkhorn_marginals_row_one_column_n_over_k():
    # Transport-plan form P = codes / N: row sums 1/N (exact, the last step) and column sums 1/K
    # (converged: many iterations at a mild epsilon).
    n, k = 24, 6
    s = np.random.default_rng(1).uniform(-1, 1, size=(n, k)).astype(np.float32)
    plan = np.asarray(swav.sinkhorn_knopp(s, 0.5, 200), np.float64) / n
    np.testing.assert_allclose(plan.sum(1), np.full(n, 1 / n), rtol=1e-5)
    np.testing.assert_allclose(plan.sum(0), np.full(k, 1 / k), rtol=1e-4)
    # Few iterations: rows still exact, columns only approximately balanced.
    codes = np.asarray(swav.sinkhorn_knopp(s, 0.05, 3), np.float64)
    np.testing.assert_allclose(codes.sum(1), np.ones(n), rtol=1e-5)
    assert np.all(codes >= 0)


def test_sinkhorn_is_over_the_global_batch_on_a_mesh():
    # Rows split over 8 devices: the column sums must be over all 64 rows (a per-shard
    # normalization would give every shard its own balance and differ).
    s = np.random.default_rng(2).uniform(-1, 1, size=(64, 10)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    x = jax.device_put(s, NamedSharding(mesh, P("data", None)))
    got = jax.jit(lambda x: swav.sinkhorn_knopp(x, 0.05, 3))(x)
    assert len(got.addressable_shards) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(swav.sinkhorn_knopp(s, 0.05, 3)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got), sinkhorn_ref(s, 0.05, 3), rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The objective: value, gradient, queue, properties, errors
# ---------------------------------------------------------------------------------------------


def _objective(**swav_fields):
    cfg = loss_config_lib.defaults()
    cfg.name = "swav"
    cfg.swav.update(swav_fields)
    return losses.make_objective(cfg)


def test_loss_and_gradient_match_float64_reference():
    rng = np.random.default_rng(3)
    b, v, n, k, temp, eps = 6, 2, 3, 5, 0.1, 0.05
    g, loc = _scores(rng, b, v, k), _scores(rng, b, n, k)
    obj = _objective(temperature=temp, epsilon=eps, sinkhorn_iterations=3)
    assert isinstance(obj, losses.StatefulObjective)
    state = obj.init_state()

    def f(g, loc):
        out = {"image_views_scores": g, "image_local_views_scores": loc}
        loss, metrics, _ = obj(out, {}, state, jnp.int32(0))
        return loss, metrics

    (loss, metrics), (dg, dl) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(g, loc)
    codes = np.stack([sinkhorn_ref(g[:, i], eps, 3) for i in range(v)], axis=1)
    want, want_dg, want_dl = swav_ref(g, loc, codes, temp)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # The codes are stop-gradient: the global views' gradient is their prediction term only.
    np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dl), want_dl, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(metrics["swav_code_max"]), codes.max(-1).mean(), rtol=1e-5)
    assert float(metrics["swav_queue_used"]) == 0.0


def test_equal_scores_give_uniform_codes_and_loss_log_k():
    # All scores equal: Sinkhorn's plan is uniform (codes 1/K) and every prediction is uniform,
    # so each cross-entropy is -sum_k (1/K) log(1/K) = log K exactly.
    b, v, n, k = 4, 2, 2, 7
    obj = _objective()
    out = {"image_views_scores": jnp.full((b, v, k), 0.3), "image_local_views_scores": jnp.full((b, n, k), 0.3)}
    loss, metrics, _ = obj(out, {}, obj.init_state(), jnp.int32(0))
    codes, _ = obj.codes(out["image_views_scores"], obj.init_state())
    np.testing.assert_allclose(np.asarray(codes), np.full((b, v, k), 1 / k), rtol=1e-6)
    np.testing.assert_allclose(float(loss), math.log(k), rtol=1e-6)


def test_queue_state_and_loss_over_three_steps():
    # queue_length = B, filled from step 1: step 0 neither uses nor fills it; step 1 fills it
    # (not yet full when the codes are made); step 2 uses it.
    rng = np.random.default_rng(4)
    b, v, n, k, eps, temp = 4, 2, 1, 3, 0.05, 0.1
    obj = _objective(queue_length=b, queue_start_steps=1, queue_views=v, prototypes=k, epsilon=eps,
                     temperature=temp)
    step_fn = jax.jit(lambda out, state, step: obj(out, {}, state, step))
    state = obj.init_state()
    ref_queue, ref_filled = np.zeros((v, b, k)), 0
    for step in range(3):
        g, loc = _scores(rng, b, v, k), _scores(rng, b, n, k)
        loss, metrics, state = step_fn({"image_views_scores": g, "image_local_views_scores": loc}, state,
                                       jnp.int32(step))
        use = ref_filled >= b
        codes = np.zeros((b, v, k))
        for i in range(v):
            rows = np.concatenate([ref_queue[i], g[:, i]], axis=0) if use else g[:, i]
            codes[:, i] = sinkhorn_ref(rows, eps, 3)[-b:]
        want, _, _ = swav_ref(g, loc, codes, temp)
        if use:  # the queue matters: without it the codes, and so the loss, differ
            plain = np.stack([sinkhorn_ref(g[:, i], eps, 3) for i in range(v)], axis=1)
            assert abs(swav_ref(g, loc, plain, temp)[0] - want) > 1e-3
        if step >= 1:  # FIFO push, newest first
            for i in range(v):
                ref_queue[i] = np.concatenate([g[:, i], ref_queue[i][:-b]], axis=0)
            ref_filled = min(ref_filled + b, b)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        assert float(metrics["swav_queue_used"]) == float(use) == float(step == 2)
        np.testing.assert_allclose(np.asarray(state["queue"]), ref_queue, rtol=0, atol=0)
        assert int(state["filled"]) == ref_filled
    assert state["queue"].shape == (v, b, k)


@pytest.mark.parametrize("field, value, match", [
    ("temperature", 0.0, r"config\.loss\.swav\.temperature=0\.0 is invalid"),
    ("epsilon", -1.0, r"config\.loss\.swav\.epsilon=-1\.0 is invalid"),
    ("sinkhorn_iterations", 0, r"config\.loss\.swav\.sinkhorn_iterations=0 is invalid"),
    ("queue_length", -2, r"config\.loss\.swav\.queue_length=-2 is invalid"),
    ("scores_key", "", r"config\.loss\.swav\.scores_key='' is invalid"),
])
def test_bad_config_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        _objective(**{field: value})


def test_queue_errors_name_the_field():
    with pytest.raises(ValueError, match=r"config\.loss\.swav\.prototypes=0 is invalid"):
        _objective(queue_length=8)
    cfg = loss_config_lib.defaults()
    cfg.name = "swav"
    cfg.swav.update(queue_length=12, prototypes=4)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    with pytest.raises(ValueError, match=r"config\.loss\.swav\.queue_length=12 is invalid: must be a multiple"):
        losses.make_objective(cfg, mesh, ("data",))
    obj = _objective(queue_length=8, prototypes=5, queue_views=2)
    out = {"image_views_scores": jnp.zeros((16, 2, 5))}
    with pytest.raises(ValueError, match=r"config\.loss\.swav\.queue_length=8 is invalid: must be >= the global"):
        obj(out, {}, obj.init_state(), jnp.int32(0))
    with pytest.raises(ValueError, match=r"config\.loss\.swav\.queue_views=2 / prototypes=5 are invalid"):
        obj({"image_views_scores": jnp.zeros((4, 2, 6))}, {}, obj.init_state(), jnp.int32(0))


# ---------------------------------------------------------------------------------------------
# The model's prototypes and multi-crop input
# ---------------------------------------------------------------------------------------------


def _model_config(**over):
    c = load_config(SWAV + ":tiny", []).model
    for key, value in over.items():
        if isinstance(value, dict):
            c[key].update(value)
        else:
            c[key] = value
    return c


def test_model_scores_are_cosines_with_unit_prototypes_on_any_crop_size():
    cfg = _model_config(dtype="float32")
    model = models.build(cfg)
    assert model.modalities == ("image_views", "image_local_views")
    rng = np.random.default_rng(5)
    views = rng.normal(size=(2, 2, 32, 32, 3)).astype(np.float32)
    local = rng.normal(size=(2, 3, 16, 16, 3)).astype(np.float32)  # ViT sincos2d: a 2x2 grid
    params = jax.jit(model.init)(jax.random.key(0), views, local)
    apply = jax.jit(model.apply)
    # Scale the stored prototypes: the forward normalizes them, so scores must not change.
    p = jax.tree.map(lambda x: x, params)
    p["params"]["prototypes"] = params["params"]["prototypes"] * 3.0
    out = apply(p, views, local)
    protos = np.asarray(p["params"]["prototypes"], np.float64)
    assert protos.shape == (16, cfg.embed_dim)
    unit = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    for key, shape in (("image_views", (2, 2)), ("image_local_views", (2, 3))):
        z = np.asarray(out[key], np.float64)
        assert z.shape == shape + (cfg.embed_dim,)
        want = np.einsum("bvd,kd->bvk", z, unit)
        np.testing.assert_allclose(np.asarray(out[key + "_scores"]), want, rtol=1e-5, atol=1e-6)
    # Multi-crop from the same encoder: a local crop at the global size embeds like a global view.
    same = apply(p, views, views[:, :1])
    np.testing.assert_allclose(np.asarray(same["image_local_views"][:, 0]), np.asarray(same["image_views"][:, 0]),
                               rtol=1e-5, atol=1e-6)


def test_multicrop_vit_with_learned_positions_is_rejected():
    with pytest.raises(ValueError, match=r"model\.image\.posemb='learn' is invalid with model\.multicrop=True"):
        models.build(_model_config(image=dict(posemb="learn")))
    with pytest.raises(ValueError, match=r"config\.data\.local_views=0 is invalid"):
        cfg = load_config(SWAV + ":tiny", ["data.local_views=0"])
        models.sample_inputs(cfg.model, cfg.data)


# ---------------------------------------------------------------------------------------------
# Training: 8 devices = 1, queue in use, prototypes held by optim.freeze_until then trained
# ---------------------------------------------------------------------------------------------

_B = 32


def _batches(n):
    rng = np.random.default_rng(6)
    return [{"image_views": rng.normal(size=(_B, 2, 32, 32, 3)).astype(np.float32),
             "image_local_views": rng.normal(size=(_B, 2, 16, 16, 3)).astype(np.float32),
             "example_id": np.arange(_B, dtype=np.int32)} for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _train(n_devices):
    # Queue of one batch filled from step 0 (used from step 1); prototypes held for 2 updates.
    config = load_config(SWAV + ":tiny", ["optim.warmup_steps=1", "model.dtype=float32",
                                          f"loss.swav.queue_length={_B}", "loss.swav.queue_start_steps=0",
                                          "optim.freeze_until=[('prototypes', 2)]"])
    training = build(config, [("data", n_devices)], n_devices)
    state = training.init_state(seed=0)
    params, metrics = [to_host(state.params)], []
    for b in _batches(3):
        state, m = training.step(state, training.device_batch(b))
        params.append(to_host(state.params))
        metrics.append(to_host(m))
    return state, params, metrics


def test_training_eight_devices_equal_one_with_queue_and_held_prototypes():
    s1, p1, m1 = _train(1)
    s8, p8, m8 = _train(8)
    assert s8.loss_state["queue"].sharding.spec == P(None, "data", None)
    assert len(s8.loss_state["queue"].addressable_shards) == 8
    np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=2e-5)
    assert [float(m["swav_queue_used"]) for m in m8] == [0.0, 1.0, 1.0]
    np.testing.assert_allclose(to_host(s8.loss_state["queue"]), to_host(s1.loss_state["queue"]), rtol=2e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(p1[-1]), jax.tree.leaves(p8[-1])):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)
    # Prototypes: bitwise unchanged by updates 0 and 1, moved by update 2; the rest trains from 0.
    protos = [p["prototypes"] for p in p8]
    np.testing.assert_array_equal(protos[1], protos[0])
    np.testing.assert_array_equal(protos[2], protos[0])
    assert np.abs(protos[3] - protos[2]).max() > 0
    # Update 0 has learning rate 0 (warmup); update 1 trains the head while the prototypes hold.
    head = [p["view_proj"] for p in p8]
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(head[2]), jax.tree.leaves(head[1]))) > 0
