"""iSogCLR (contrastive_jax.losses.isogclr) against a float64 numpy reference written with plain
loops, hand-derived closed forms, config errors, and 8 devices == 1 through the loop's builder."""
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses import isogclr
from contrastive_jax.losses.config import defaults as loss_defaults
from contrastive_jax.parallel import to_host
from contrastive_jax.train import load_config

from tests.train.test_train import _random_batch, build

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "isogclr.py")

SIDES = ("image", "text")


def _loss_config(**fields):
    c = loss_defaults()
    c.name = "isogclr"
    c.isogclr.update(fields)
    return c


def _objective(**fields):
    return isogclr.build(_loss_config(**fields), None, None)


# ---------------------------------------------------------------------------------------------
# float64 reference: the paper's update written out per anchor, in u-space (no log tricks).
# ---------------------------------------------------------------------------------------------
def _ref_init(n, tau_init):
    # u = nan marks "never seen".
    return {s: {"tau": np.full(n, tau_init), "u": np.full(n, np.nan), "m": np.zeros(n)} for s in SIDES}


def _ref_step(x, y, ids, st, hp, n):
    """(loss, dL/dx, dL/dy, new state, mean taus) for one batch; x, y float64 [B, D]."""
    b = len(ids)
    sim = x @ y.T
    loss, gx, gy = 0.0, np.zeros_like(x), np.zeros_like(y)
    new = {s: {k: v.copy() for k, v in st[s].items()} for s in SIDES}
    taus = {}
    for side in SIDES:
        used = []
        for i in range(b):
            k = int(ids[i])
            inside = 0 <= k < n
            tau = st[side]["tau"][k] if inside else hp["tau_init"]
            u_old = st[side]["u"][k] if inside else np.nan
            m_old = st[side]["m"][k] if inside else 0.0
            used.append(tau)
            if side == "image":
                d = [sim[i, j] - sim[i, i] for j in range(b)]
            else:
                d = [sim[j, i] - sim[i, i] for j in range(b)]
            negs = [j for j in range(b) if j != i]
            g = sum(math.exp(d[j] / tau) for j in negs) / (b - 1)
            u = g if np.isnan(u_old) else (1 - hp["gamma"]) * u_old + hp["gamma"] * g
            w = {j: math.exp(d[j] / tau) / (u * (b - 1)) for j in negs}
            loss += sum(w[j] * d[j] for j in negs) / b
            for j in negs:
                if side == "image":  # d_j = <x_i, y_j> - <x_i, y_i>
                    gx[i] += w[j] * (y[j] - y[i]) / b
                    gy[j] += w[j] * x[i] / b
                    gy[i] -= w[j] * x[i] / b
                else:  # d_j = <x_j, y_i> - <x_i, y_i>
                    gy[i] += w[j] * (x[j] - x[i]) / b
                    gx[j] += w[j] * y[i] / b
                    gx[i] -= w[j] * y[i] / b
            grad_tau = math.log(u) + hp["rho"] - sum(w[j] * d[j] / tau for j in negs)
            clipped = min(max(grad_tau, -hp["tau_grad_clip"]), hp["tau_grad_clip"])
            m = (1 - hp["tau_beta"]) * m_old + hp["tau_beta"] * clipped
            tau_new = min(max(tau - hp["tau_lr"] * m, hp["tau_min"]), hp["tau_max"])
            if inside:  # in batch order, so a repeated id keeps its last occurrence's values
                new[side]["tau"][k], new[side]["u"][k], new[side]["m"][k] = tau_new, u, m
        taus[side] = float(np.mean(used))
    return loss, gx, gy, new, taus


def _unit(rng, b, d):
    v = rng.normal(size=(b, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


HYPER = {
    # Moderate temperatures and a fast tau step: the temperatures move visibly in 3 steps.
    "moderate": dict(gamma=0.5, rho=0.3, tau_init=0.1, tau_min=0.02, tau_max=1.0, tau_lr=0.02, tau_beta=0.7,
                     tau_grad_clip=1.5),
    # The paper's bimodal defaults (tau = 0.01: d / tau up to 200, past float32's exp range).
    "paper": dict(gamma=0.8, rho=8.0, tau_init=0.01, tau_min=0.005, tau_max=1.0, tau_lr=0.03, tau_beta=0.9,
                  tau_grad_clip=5.0),
}


@pytest.mark.parametrize("name", sorted(HYPER))
def test_loss_gradient_and_state_match_float64_reference_over_three_steps(name):
    hp, n, b = HYPER[name], 12, 6
    obj = _objective(num_examples=n, **hp)
    # Overlapping ids across steps; step 2 repeats id 3 inside the batch, step 3 has an id >= n.
    id_steps = [np.array([0, 1, 2, 3, 4, 5]), np.array([3, 4, 9, 6, 7, 3]), np.array([7, 8, 0, 13, 11, 3])]
    rng = np.random.default_rng(0)

    @jax.jit
    def run(out, batch, state):
        (loss, (metrics, new)), grads = jax.value_and_grad(
            lambda o: (lambda r: (r[0], (r[1], r[2])))(obj(o, batch, state, jnp.int32(0))), has_aux=True)(out)
        return loss, metrics, new, grads

    state, ref = obj.init_state(), _ref_init(n, hp["tau_init"])
    for ids in id_steps:
        x, y = _unit(rng, b, 8), _unit(rng, b, 8)
        # Pull positives together so the tau gradient is not saturated by the clip everywhere.
        y = x + 0.6 * y
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        out = {"image": jnp.asarray(x, jnp.float32), "text": jnp.asarray(y, jnp.float32),
               "scale": jnp.float32(10.0), "bias": jnp.float32(0.0)}
        loss, metrics, state, grads = run(out, {"example_id": jnp.asarray(ids, jnp.int32)}, state)
        want_loss, want_gx, want_gy, ref, taus = _ref_step(x.astype(np.float32).astype(np.float64),
                                                           y.astype(np.float32).astype(np.float64), ids, ref, hp, n)
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grads["image"]), want_gx, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grads["text"]), want_gy, rtol=1e-4, atol=1e-6)
        assert float(grads["scale"]) == 0.0 and float(grads["bias"]) == 0.0  # the learned scale is unused
        for s in SIDES:
            np.testing.assert_allclose(float(metrics[f"tau_{s}"]), taus[s], rtol=1e-6)
            np.testing.assert_allclose(np.asarray(state[s]["tau"]), ref[s]["tau"], rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(np.asarray(state[s]["m"]), ref[s]["m"], rtol=1e-4, atol=1e-5)
            want_log_u = np.where(np.isnan(ref[s]["u"]), -np.inf, np.log(np.where(np.isnan(ref[s]["u"]), 1, ref[s]["u"])))
            np.testing.assert_allclose(np.asarray(state[s]["log_u"]), want_log_u, rtol=1e-4, atol=1e-4)
        assert float(metrics["ids_out_of_range"]) == float(np.sum(ids >= n))
    # Ids never seen (5 after step 1 is seen; 10 never) keep their initial values.
    assert float(state["image"]["log_u"][10]) == -np.inf and float(state["text"]["tau"][10]) == np.float32(hp["tau_init"])
    assert not np.allclose(np.asarray(state["image"]["tau"][:9]), hp["tau_init"])  # the temperatures moved


def test_equal_embeddings_give_closed_form_updates():
    """All embeddings equal: every d_ij = 0, so g_i = 1 exactly, u_i = 1 after any number of
    visits, the loss and its gradient are 0, and dF/dtau = log 1 + rho - 0 = rho: the momentum
    follows m_t = (1 - beta) m_{t-1} + beta * rho and tau_t = tau_{t-1} - lr * m_t."""
    rho, beta, lr, tau0 = 0.5, 0.6, 0.01, 0.2
    obj = _objective(num_examples=8, gamma=0.8, rho=rho, tau_init=tau0, tau_min=0.005, tau_max=1.0, tau_lr=lr,
                     tau_beta=beta, tau_grad_clip=5.0)
    v = jnp.ones((4, 16), jnp.float32) / 4.0
    out = {"image": v, "text": v, "scale": jnp.float32(1.0)}
    batch = {"example_id": jnp.array([1, 3, 5, 7], jnp.int32)}
    state, m, tau = obj.init_state(), 0.0, tau0
    f = jax.jit(jax.value_and_grad(lambda o, s: obj(o, batch, s, 0)[0]))
    update = jax.jit(lambda o, s: obj(o, batch, s, 0)[2])
    for _ in range(3):
        loss, grads = f(out, state)
        state = update(out, state)
        m = (1 - beta) * m + beta * rho
        tau = tau - lr * m
        assert float(loss) == 0.0
        # sum_j w_ij (y_j - y_i) with w_ij = 1/(B-1): zero up to float32 rounding of 1/3.
        assert float(jnp.max(jnp.abs(grads["image"]))) < 1e-7 and float(jnp.max(jnp.abs(grads["text"]))) < 1e-7
        for s in SIDES:
            # log u = log(3 exp(0)) - log 3: 0 up to float32 rounding of log 3.
            np.testing.assert_allclose(np.asarray(state[s]["log_u"])[[1, 3, 5, 7]], 0.0, atol=1e-6)
            np.testing.assert_allclose(np.asarray(state[s]["m"])[[1, 3, 5, 7]], m, rtol=1e-6)
            np.testing.assert_allclose(np.asarray(state[s]["tau"])[[1, 3, 5, 7]], tau, rtol=1e-6)
            assert np.all(np.isneginf(np.asarray(state[s]["log_u"])[[0, 2, 4, 6]]))


def test_tau_gradient_is_rho_minus_kl_of_the_negative_weights():
    """On a first visit (u = g), dF/dtau = rho - KL(p || uniform) with p_j = softmax_j(d_j / tau)
    over the negatives: equidistant negatives give exactly rho (tau falls), one near negative among
    far ones gives rho - log(B-1) + H(p) (< 0 for small rho: tau rises). Hand-built d rows."""
    b, tau, rho = 5, 0.1, 0.2
    d = np.zeros((b, b))
    d[0, 1:] = -0.5  # equidistant
    d[1] = [-1.0, 0.0, -1.0, -1.0, -0.05]  # one near negative (j = 4)
    d[2:] = d[1]  # other rows: irrelevant, copy
    d[2:, 2:] = -0.3
    np.fill_diagonal(d, 0.0)
    kw = dict(gamma=0.8, rho=rho, tau_lr=1.0, tau_beta=1.0, tau_grad_clip=100.0, tau_min=1e-3, tau_max=10.0)
    _, (tau_new, _, m_new), _ = isogclr._side_update(jnp.asarray(d, jnp.float32), jnp.full((b,), tau, jnp.float32),
                                                     jnp.full((b,), -jnp.inf), jnp.zeros((b,)), **kw)
    # With beta = 1 and lr = 1, m is the gradient and tau_new = tau - gradient.
    np.testing.assert_allclose(float(m_new[0]), rho, rtol=1e-5)
    z = np.array([-1.0, -1.0, -1.0, -0.05]) / tau
    p = np.exp(z) / np.exp(z).sum()
    kl = float(np.sum(p * np.log(p * (b - 1))))
    np.testing.assert_allclose(float(m_new[1]), rho - kl, rtol=1e-5)
    assert float(m_new[1]) < 0 and float(tau_new[1]) > tau and float(tau_new[0]) < tau


@pytest.mark.parametrize("field,value,match", [
    ("num_examples", 0, "config.loss.isogclr.num_examples=0 is invalid"),
    ("gamma", 0.0, "config.loss.isogclr.gamma=0.0 is invalid"),
    ("tau_min", 0.0, "config.loss.isogclr.tau_min=0.0 is invalid"),
    ("tau_init", 2.0, "config.loss.isogclr.tau_init=2.0 is invalid"),
    ("tau_beta", 1.5, "config.loss.isogclr.tau_beta=1.5 is invalid"),
    ("rho", "x", "config.loss.isogclr.rho='x' is invalid"),
])
def test_bad_config_values_name_the_field(field, value, match):
    fields = dict(num_examples=10)
    fields[field] = value
    c = _loss_config()
    c.isogclr.num_examples = fields.pop("num_examples")
    if fields:
        c.isogclr = ml_collections.ConfigDict(dict(c.isogclr.to_dict(), **fields))
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        isogclr.build(c, None, None)


def test_rejects_streamed_impl_and_a_batch_without_ids():
    c = _loss_config(num_examples=4)
    c.impl = "chunked"
    with pytest.raises(ValueError, match="config.loss.impl='chunked' is not supported by config.loss.name='isogclr'"):
        isogclr.build(c, None, None)
    obj = _objective(num_examples=4)
    v = jnp.eye(2, 4)
    with pytest.raises(KeyError, match="example_id"):
        obj({"image": v, "text": v}, {"image": None}, obj.init_state(), 0)


def _train(n_devices, batches):
    config = load_config(CONFIG + ":tiny", ["optim.warmup_steps=1", "data.max_text_len=8",
                                            "loss.isogclr.num_examples=37", "loss.isogclr.tau_init=0.05",
                                            "loss.isogclr.tau_lr=0.003"])
    training = build(config, [("data", n_devices)], n_devices)
    state = training.init_state(seed=0)
    metrics = []
    for b in batches:
        state, m = training.step(state, training.device_batch(b))
        metrics.append(to_host(m))
    return state, metrics


def test_eight_devices_equal_one_and_state_is_sharded():
    batches = []
    for s in range(2):
        b = _random_batch(16, 32, 8, seed=s)
        b["example_id"] = np.random.default_rng(7 + s).permutation(37)[:16].astype(np.int32)
        batches.append(b)
    s1, m1 = _train(1, batches)
    s8, m8 = _train(8, batches)
    training_init = isogclr.ISogCLR(37, tau_init=0.05, num_shards=8).init_state()
    for s in SIDES:
        for f in ("tau", "log_u", "m"):
            leaf = s8.loss_state[s][f]
            assert leaf.shape == (40,)  # 37 rounded up to a multiple of the 8 batch shards
            assert leaf.sharding.spec == P(("data",))
            assert len(leaf.addressable_shards) == 8 and leaf.addressable_shards[0].data.shape == (5,)
            # One device: no padding (37); eight: 3 padding slots that are never written.
            # atol: log u and m carry d / tau (~20x the similarities' float32 rounding).
            np.testing.assert_allclose(to_host(leaf)[:37], to_host(s1.loss_state[s][f]), rtol=2e-5, atol=1e-5)
            np.testing.assert_array_equal(to_host(leaf)[37:], to_host(training_init[s][f])[37:])
        seen = np.union1d(batches[0]["example_id"], batches[1]["example_id"])
        log_u = to_host(s1.loss_state[s]["log_u"])
        assert np.all(np.isfinite(log_u[seen])) and np.all(np.isneginf(np.delete(log_u, seen)))
    for a, b in zip(jax.tree.leaves(to_host(s1.params)), jax.tree.leaves(to_host(s8.params))):
        # atol: Adam's normalized step (lr 2e-3) magnifies float32 rounding of near-zero gradients.
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=2e-5, atol=1e-6)
    assert {"tau_image", "tau_text", "robust_image", "robust_text"} <= set(m1[0])
    np.testing.assert_allclose(m1[0]["tau_image"], 0.05, rtol=1e-6)


def test_state_smaller_than_the_training_split_is_a_config_error(tmp_path):
    """Every example_id needs a row: the trainer compares num_examples with the split's size
    before anything compiles."""
    from contrastive_jax.train import load_config
    from contrastive_jax.train.config import ConfigError
    from contrastive_jax.train.loop import train

    config = load_config(os.path.join(REPO, "configs", "isogclr.py") + ":tiny",
                         ["loss.isogclr.num_examples=100", f"data.data_dir={tmp_path / 'tfds'}", "log.progress=false"])
    with pytest.raises(ConfigError, match=r"config.loss.isogclr.num_examples=100 is smaller than the training split \(512"):
        train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
