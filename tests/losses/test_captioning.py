"""Fused linear + cross-entropy (captioning loss) against a float64 numpy reference.

Value, per-token losses, accuracy and the gradients w.r.t. h, W, bias and the token weights,
with padding masked, label smoothing, and block sizes that divide neither N nor V; the numpy
reference's own analytic gradient is checked by central differences. A compiled-HLO check that
the chunked forward+backward holds no array of N*V elements while the dense control does; and
8 devices (h and the targets sharded over the tokens) equal one.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.losses.captioning import caption_loss, fused_cross_entropy

N, D, V = 37, 8, 50


def np_reference(h, w, b, t, m, eps):
    """Dense float64 loss, per-token losses, accuracy and analytic gradients (dh, dW, db, dm)."""
    h, w, b, m = (np.asarray(a, np.float64) for a in (h, w, b, m))
    z = h @ w + b
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
    v = z.shape[1]
    q = np.full_like(z, eps / v)
    q[np.arange(len(t)), t] += 1.0 - eps
    per_tok = lse - (q * z).sum(axis=1)
    denom = m.sum() if m.sum() > 0 else 1.0
    loss = (m * per_tok).sum() / denom
    acc = (m * (z.argmax(axis=1) == t)).sum() / denom
    p = np.exp(z - lse[:, None])
    dz = (m / denom)[:, None] * (p - q)
    return loss, per_tok, acc, dz @ w.T, h.T @ dz, dz.sum(axis=0), (per_tok - loss) / denom


def np_softmax_minus_target(h, w, b, t, eps):
    """``p - q`` [N, V] float64: the gradient of each token's own loss w.r.t. its logits."""
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    q = np.full_like(z, eps / z.shape[1])
    q[np.arange(len(t)), t] += 1.0 - eps
    return p - q


def data(seed=0, n=N, d=D, v=V, scale=1.0):
    r = np.random.default_rng(seed)
    h = (scale * r.normal(size=(n, d))).astype(np.float32)
    w = r.normal(size=(d, v)).astype(np.float32)
    b = r.normal(size=(v,)).astype(np.float32)
    t = r.integers(0, v, n).astype(np.int32)
    # Some targets at the row's argmax so that the accuracy is neither 0 nor 1.
    z = h.astype(np.float64) @ w + b
    t[::3] = z.argmax(axis=1)[::3]
    m = (r.random(n) > 0.3).astype(np.float32)  # ~30% padding
    return h, w, b, t, m


def close(a, b, tol=2e-5, name=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))
    assert err < tol, f"{name}: rel err {err:.2e}"


def test_reference_gradient_is_the_derivative_of_the_reference_loss():
    """The float64 reference's analytic gradients agree with central differences of its loss."""
    h, w, b, t, m = (a.astype(np.float64) if a.dtype != np.int32 else a for a in data(1, n=7, d=3, v=6))
    eps, step = 0.2, 1e-6
    grads = np_reference(h, w, b, t, m, eps)[3:]
    args = [h, w, b, m]
    for which, grad in enumerate(grads):
        for idx in [(0,) * args[which].ndim, tuple(s - 1 for s in args[which].shape)]:
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += step
            minus[which][idx] -= step
            loss = lambda a: np_reference(a[0], a[1], a[2], t, a[3], eps)[0]
            fd = (loss(plus) - loss(minus)) / (2 * step)
            assert abs(fd - grad[idx]) < 1e-6, (which, idx, fd, grad[idx])


@pytest.mark.parametrize("impl,eps,vocab_block,token_block,with_bias", [
    ("dense", 0.1, 16, 10, True),
    ("chunked", 0.0, 16, 10, True),    # 16 divides neither V=50 nor 10 N=37: padding both ways
    ("chunked", 0.1, 16, 10, True),
    ("chunked", 0.1, 7, None, False),  # one token block, no bias
    ("chunked", 0.3, 64, 64, True),    # blocks larger than the arrays
])
def test_value_and_gradients_match_float64(impl, eps, vocab_block, token_block, with_bias):
    h, w, b, t, m = data(0)
    if not with_bias:
        b = np.zeros_like(b)

    def f(h, w, b, m):
        out = fused_cross_entropy(h, w, t, m, b if with_bias else None, label_smoothing=eps, impl=impl,
                                  vocab_block=vocab_block, token_block=token_block)
        return out.loss, out

    (loss, out), (gh, gw, gb, gm) = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(h, w, b, m)
    rl, rtok, racc, rdh, rdw, rdb, rdm = np_reference(h, w, b, t, m, eps)
    close(loss, rl, name="loss")
    close(out.per_token, rtok, name="per_token")
    assert 0.0 < racc < 1.0
    close(out.accuracy, racc, tol=1e-6, name="accuracy")
    # Per-token correctness (masked tokens included) against the float64 logits' argmax.
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) + (np.asarray(b, np.float64) if with_bias else 0.0)
    np.testing.assert_array_equal(np.asarray(out.correct), (z.argmax(axis=1) == t).astype(np.float32))
    close(gh, rdh, name="dh")
    close(gw, rdw, name="dW")
    close(gm, rdm, name="dweights")
    if with_bias:
        close(gb, rdb, name="dbias")
    # Padded positions contribute nothing to dh.
    assert np.all(np.asarray(gh)[m == 0] == 0)


def test_per_token_cotangent_and_bool_mask():
    """A loss built on the per-token output (sum_i r_i l_i) differentiates through the fused VJP;
    a bool mask equals the 0/1 float mask."""
    h, w, b, t, m = data(2)
    r = np.random.default_rng(3).normal(size=N)

    def f(h, w):
        out = fused_cross_entropy(h, w, t, m > 0, b, label_smoothing=0.1, vocab_block=16, token_block=8)
        return jnp.sum(out.per_token * r) + 2.0 * out.loss

    gh, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(h, w)
    # Reference: d(sum_i r_i l_i)/dz_i = r_i (p_i - q_i), and the mean's part is twice the masked one.
    _, _, _, dh_mean, dw_mean, _, _ = np_reference(h, w, b, t, m, 0.1)
    dz_tok = r[:, None] * np_softmax_minus_target(h, w, b, t, 0.1)
    close(gh, 2.0 * dh_mean + dz_tok @ w.T.astype(np.float64), name="dh")
    close(gw, 2.0 * dw_mean + h.T.astype(np.float64) @ dz_tok, name="dW")


def test_all_masked_is_zero_and_batch_length_wrapper():
    h, w, b, t, m = data(4, n=12)
    out = fused_cross_entropy(h, w, t, np.zeros(12, np.float32), b, vocab_block=16)
    assert float(out.loss) == 0.0 and float(out.accuracy) == 0.0
    g = jax.grad(lambda h: fused_cross_entropy(h, w, t, np.zeros(12, np.float32), b, vocab_block=16).loss)(h)
    assert np.all(np.asarray(g) == 0)
    # [B, L, d] wrapper: the same numbers as the flat call.
    res = caption_loss(h.reshape(3, 4, D), w, t.reshape(3, 4), m.reshape(3, 4), b, vocab_block=16)
    flat = np_reference(h, w, b, t, m, 0.0)
    close(res.loss, flat[0], name="loss")
    assert res.per_token.shape == (3, 4)
    close(res.per_token.reshape(-1), flat[1], name="per_token")


def test_bfloat16_inputs_close_to_float32():
    h, w, b, t, m = data(5, scale=0.3)
    f = lambda h, w: fused_cross_entropy(h, w, t, m, b, vocab_block=16, token_block=10).loss
    l32, (gh32, gw32) = jax.value_and_grad(f, argnums=(0, 1))(h, w)
    l16, (gh16, gw16) = jax.value_and_grad(f, argnums=(0, 1))(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert gh16.dtype == jnp.bfloat16 and gw16.dtype == jnp.bfloat16
    close(l16, l32, tol=2e-2, name="loss")
    close(gh16, gh32, tol=3e-2, name="dh")
    close(gw16, gw32, tol=3e-2, name="dW")


def _largest_array(hlo_text: str) -> int:
    """Elements of the largest array shape anywhere in compiled HLO text."""
    best = 0
    for dims in re.findall(r"(?:f32|bf16|f16|s32|pred|u32|f64)\[([\d,]*)\]", hlo_text):
        if dims:
            best = max(best, int(np.prod([int(x) for x in dims.split(",")])))
    return best


def test_chunked_never_materializes_n_by_v():
    n, d, v = 256, 16, 3000
    h, w, b, t, m = data(6, n=n, d=d, v=v)

    def compiled(impl):
        f = lambda h, w, b: fused_cross_entropy(h, w, t, m, b, impl=impl, vocab_block=256, token_block=64).loss
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(h, w, b).compile()

    dense, chunked = compiled("dense"), compiled("chunked")
    assert _largest_array(dense.as_text()) >= n * v  # the control: the check can see [N, V]
    largest = _largest_array(chunked.as_text())
    assert largest < n * v // 8, largest  # tiles are 64 x 256; W / dW are d x V
    assert chunked.memory_analysis().temp_size_in_bytes < dense.memory_analysis().temp_size_in_bytes / 4


def test_sharded_over_tokens_equals_one_device():
    n = 64  # 8 tokens per device; token blocks of 16 (strided): each block spans all devices
    h, w, b, t, m = data(7, n=n)
    f = lambda h, w, b, t, m: fused_cross_entropy(h, w, t, m, b, label_smoothing=0.1, vocab_block=16,
                                                  token_block=16).loss
    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    one = step(h, w, b, t, m)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    hs, ts, ms = (jax.device_put(a, rows) for a in (h, t, m))
    eight = step(hs, w, b, ts, ms)
    assert len(eight[1][0].sharding.device_set) == 8
    for a, c in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-6)
    close(one[0], np_reference(h, w, b, t, m, 0.1)[0], name="loss")
