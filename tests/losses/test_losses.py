"""Contrastive losses: every implementation and option against a float64 numpy reference.

The reference (``np_softmax`` / ``np_sigmoid``) is written from the formulas with hand-derived
gradients, independent of the library code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.losses import sigmoid_contrastive_loss, softmax_contrastive_loss

RTOL = 1e-5


# ------------------------------------------------------------------------------------------
# float64 numpy references (value + gradients w.r.t. x, y, scale vector, bias vector)
# ------------------------------------------------------------------------------------------


def _lse(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _np_metrics(logits, v):
    """In-batch metrics of a float64 [B, B] logit matrix over the valid (v > 0) examples."""
    eye = np.eye(logits.shape[0])
    N = v.sum()
    off = np.where((v[:, None] * v[None, :] > 0) & (eye == 0), logits, -np.inf)
    d = np.diag(logits)
    nneg = N * N - N
    return {
        "i2t_top1": np.sum(v * (d > off.max(1))) / N,
        "t2i_top1": np.sum(v * (d > off.max(0))) / N,
        "pos_logit": np.sum(v * d) / N,
        "neg_logit": (np.sum(np.where(np.isfinite(off), off, 0)) / nneg) if nneg else 0.0,
    }


def np_softmax(x, y, s, *, weights=None, eps=0.0, bidirectional=True):
    """Returns (loss, dx, dy, ds_vector, metrics) in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    B = x.shape[0]
    s = np.broadcast_to(np.asarray(s, np.float64), (B,))
    w = np.ones(B) if weights is None else np.asarray(weights, np.float64)
    v = (w > 0).astype(np.float64)
    W, N = w.sum(), v.sum()
    dots = x @ y.T
    lg = s[:, None] * dots
    lr = np.where(v[None, :] > 0, lg, -np.inf)
    lc = np.where(v[:, None] > 0, lg, -np.inf)
    lse_r, lse_c = _lse(lr, 1), _lse(lc, 0)
    pr, pc = np.exp(lr - lse_r[:, None]), np.exp(lc - lse_c[None, :])
    eye = np.eye(B)
    row = lse_r - (1 - eps) * np.diag(lg) - eps / N * (lg @ v)
    col = lse_c - (1 - eps) * np.diag(lg) - eps / N * (v @ lg)
    alpha = 0.5 if bidirectional else 1.0
    per = alpha * row + (0.5 * col if bidirectional else 0.0)
    loss = np.sum(w * v * per) / W
    a = alpha * w * v / W
    G = a[:, None] * (pr - (1 - eps) * eye - eps / N * v[None, :])
    if bidirectional:
        b = 0.5 * w * v / W
        G = G + b[None, :] * (pc - (1 - eps) * eye - eps / N * v[:, None])
    dx = s[:, None] * (G @ y)
    dy = G.T @ (s[:, None] * x)
    ds = np.sum(G * dots, axis=1)
    metrics = _np_metrics(lg, v)
    return loss, dx, dy, ds, metrics


def np_sigmoid(x, y, s, bias, *, weights=None):
    """Returns (loss, dx, dy, ds_vector, db_vector, metrics) in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    B = x.shape[0]
    s = np.broadcast_to(np.asarray(s, np.float64), (B,))
    bias = np.broadcast_to(np.asarray(bias, np.float64), (B,))
    w = np.ones(B) if weights is None else np.asarray(weights, np.float64)
    v = (w > 0).astype(np.float64)
    W = w.sum()
    dots = x @ y.T
    t = s[:, None] * dots + bias[:, None]
    eye = np.eye(B)
    z = 2 * eye - 1
    pair_w = (w * v)[:, None] * v[None, :] / W
    loss = np.sum(pair_w * np.logaddexp(0.0, -z * t))
    G = pair_w * (-z) / (1 + np.exp(z * t))  # d softplus(-z t) / dt = -z * sigmoid(-z t)
    dx = s[:, None] * (G @ y)
    dy = G.T @ (s[:, None] * x)
    ds = np.sum(G * dots, axis=1)
    db = np.sum(G, axis=1)
    metrics = _np_metrics(t, v)
    return loss, dx, dy, ds, db, metrics


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def embeddings(B, D, seed=0, dtype=np.float32, sharpen=0.0):
    """Random L2-normalized pairs; ``sharpen`` > 0 makes y_i correlated with x_i."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, D))
    y = rng.standard_normal((B, D)) + sharpen * x
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x.astype(dtype), y.astype(dtype)


def close(actual, expected, rtol=RTOL, name=""):
    """Relative closeness; elementwise arrays are compared against their largest magnitude."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


# ------------------------------------------------------------------------------------------
# dense reference implementation: values, gradients, hand-derived properties
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,D", [(8, 4), (64, 32), (256, 64)])
@pytest.mark.parametrize("per_row_scale", [False, True])
def test_dense_softmax_matches_numpy(B, D, per_row_scale):
    x, y = embeddings(B, D, seed=B, sharpen=1.0)
    s = np.linspace(5.0, 15.0, B).astype(np.float32) if per_row_scale else np.float32(10.0)

    f = lambda x, y, s: softmax_contrastive_loss(x, y, scale=s, impl="dense")
    loss, (gx, gy, gs) = jax.value_and_grad(f, argnums=(0, 1, 2))(x, y, s)
    rl, rdx, rdy, rds, _ = np_softmax(x, y, s)
    close(loss, rl, name="loss")
    close(gx, rdx, name="dx")
    close(gy, rdy, name="dy")
    close(gs, rds if per_row_scale else rds.sum(), name="dscale")
    assert loss.dtype == jnp.float32 and loss.shape == ()


@pytest.mark.parametrize("B,D", [(8, 4), (64, 32), (256, 64)])
@pytest.mark.parametrize("per_row", [False, True])
def test_dense_sigmoid_matches_numpy(B, D, per_row):
    x, y = embeddings(B, D, seed=B + 1, sharpen=1.0)
    if per_row:
        s = np.linspace(5.0, 15.0, B).astype(np.float32)
        b = np.linspace(-8.0, -2.0, B).astype(np.float32)
    else:
        s, b = np.float32(10.0), np.float32(-5.0)
    f = lambda x, y, s, b: sigmoid_contrastive_loss(x, y, scale=s, bias=b, impl="dense")
    loss, (gx, gy, gs, gb) = jax.value_and_grad(f, argnums=(0, 1, 2, 3))(x, y, s, b)
    rl, rdx, rdy, rds, rdb, _ = np_sigmoid(x, y, s, b)
    close(loss, rl, name="loss")
    close(gx, rdx, name="dx")
    close(gy, rdy, name="dy")
    close(gs, rds if per_row else rds.sum(), name="dscale")
    close(gb, rdb if per_row else rdb.sum(), name="dbias")


# The all-equal closed forms (dense and streamed) are in test_losses_streaming.py.


# ------------------------------------------------------------------------------------------
# argument handling shared by every loss: the one impl check, the mask's name
# ------------------------------------------------------------------------------------------


def _all_losses():
    """(name, fn(impl, **kw)) for every public loss that takes ``impl``."""
    from contrastive_jax import losses as L

    x, y = embeddings(8, 4, seed=11, sharpen=1.0)
    g = np.arange(8) // 2
    return {
        "softmax": lambda **kw: L.softmax_contrastive_loss(x, y, scale=5.0, **kw),
        "sigmoid": lambda **kw: L.sigmoid_contrastive_loss(x, y, scale=5.0, bias=-1.0, **kw),
        "dcl": lambda **kw: L.decoupled_contrastive_loss(x, y, scale=5.0, **kw),
        "hard_negative": lambda **kw: L.hard_negative_loss(x, y, scale=5.0, **kw),
        "cwcl": lambda **kw: L.soft_target_loss(x, y, scale=5.0, targets=x, **kw),
        "multi_positive": lambda **kw: L.multi_positive_loss(x, y, scale=5.0, groups=g, **kw),
        "sigmoid_multi_positive": lambda **kw: L.sigmoid_multi_positive_loss(x, y, scale=5.0, bias=-1.0, groups=g,
                                                                              **kw),
        "nt_xent": lambda **kw: L.nt_xent_loss(np.stack([x, y], 1), scale=5.0, **kw),
        "symile": lambda **kw: L.symile_loss([x, y, x], scale=5.0, **kw),
        "distill": lambda **kw: L.similarity_distillation_loss(x, y, x, y, scale=5.0, teacher_scale=5.0, **kw),
        "uniformity": lambda **kw: L.uniformity(x, **kw),
    }


@pytest.mark.parametrize("name", sorted(_all_losses()))
def test_unknown_impl_is_rejected_by_every_loss_with_one_message(name):
    with pytest.raises(ValueError, match=r"^unknown impl 'flash'; known: dense, chunked, ring$"):
        _all_losses()[name](impl="flash")


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_weights_is_a_deprecated_alias_of_valid(impl):
    x, y = embeddings(16, 8, seed=12, sharpen=1.0)
    w = np.linspace(0.0, 2.0, 16).astype(np.float32)  # w[0] == 0: padding
    kw = dict(impl=impl, block_size=5, return_metrics=True)
    for f in (lambda **k: softmax_contrastive_loss(x, y, scale=6.0, label_smoothing=0.1, **k),
              lambda **k: sigmoid_contrastive_loss(x, y, scale=6.0, bias=-2.0, **k)):
        new = f(valid=w, **kw)
        with pytest.warns(DeprecationWarning, match="valid="):
            old = f(weights=w, **kw)
        assert float(old[0]) == float(new[0])
        assert {k: float(v) for k, v in old[1].items()} == {k: float(v) for k, v in new[1].items()}
        with pytest.raises(TypeError, match="valid= only"):
            f(valid=w, weights=w, **kw)
