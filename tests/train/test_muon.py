"""`optim.name = 'muon'`: which parameters Muon updates, and its update against a float64 numpy
reference of the published method (Jordan et al. 2024; RMS matching of Liu et al. 2025)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive_jax.train import load_config, make_optimizer
from contrastive_jax.train.builder import build_training
from contrastive_jax.train.optim import muon_dimension_numbers
from contrastive_jax.parallel.sharding import path_str

# The quintic Newton-Schulz coefficients of Jordan et al. 2024 (the default of optax's Muon).
NS = (3.4445, -4.775, 2.0315)


def _muon(*overrides, lr=0.1):
    c = load_config(None, ["optim.name=muon", f"optim.lr={lr}", "optim.schedule=constant", "optim.grad_clip_norm=0",
                           *overrides])
    return make_optimizer(c.optim, 100, warmup_steps=0).tx


def _newton_schulz64(g, steps=5):
    """float64 reference: ``g`` ``[A, B]`` normalized by its Frobenius norm, then ``steps`` of
    ``X <- a X + (b X X^T + c (X X^T)^2) X``."""
    x = np.asarray(g, np.float64)
    x = x / np.linalg.norm(x)
    a, b, c = NS
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x


def test_first_update_matches_float64_newton_schulz_and_rms_scaling():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 20)).astype(np.float32)
    g = rng.normal(size=(48, 20)).astype(np.float32)
    bias = rng.normal(size=(20,)).astype(np.float32)
    params = {"dense": {"kernel": jnp.asarray(w), "bias": jnp.asarray(bias)}}
    grads = {"dense": {"kernel": jnp.asarray(g), "bias": jnp.ones(20, jnp.float32)}}
    lr, wd = 0.1, 0.05
    tx = _muon(f"optim.weight_decay={wd}", lr=lr)
    updates, _ = tx.update(grads, tx.init(params), params)
    # The first momentum (plain or Nesterov) is a multiple of g, and Newton-Schulz starts from
    # the Frobenius-normalized matrix: the direction is that of g alone.
    expected = -lr * (0.2 * np.sqrt(48) * _newton_schulz64(g) + wd * w)
    np.testing.assert_allclose(updates["dense"]["kernel"], expected, rtol=2e-4, atol=1e-6)
    # The bias goes to AdamW (not decayed: the default no_decay mask): its first step is -lr * sign(g).
    np.testing.assert_allclose(updates["dense"]["bias"], -lr * np.ones(20), rtol=1e-4)


def test_equal_singular_values_follow_the_scalar_quintic_whatever_the_gradient_scale():
    # G = sigma * Q with orthonormal columns: after normalization every singular value is
    # 1/sqrt(B), and each iteration maps it through p(s) = a s + b s^3 + c s^5.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(32, 8)))
    s = 1 / np.sqrt(8)
    for _ in range(5):
        s = NS[0] * s + NS[1] * s**3 + NS[2] * s**5
    lr = 0.01
    tx = _muon("optim.weight_decay=0", lr=lr)
    params = {"kernel": jnp.zeros((32, 8), jnp.float32)}
    for sigma in (1e-3, 1.0, 1e3):
        updates, _ = tx.update({"kernel": jnp.asarray(sigma * q, jnp.float32)}, tx.init(params), params)
        np.testing.assert_allclose(updates["kernel"], -lr * 0.2 * np.sqrt(32) * s * q, rtol=1e-4, atol=1e-7)
    # p maps the starting 0.354 into the band Muon aims at (not exactly 1: the coefficients trade
    # accuracy near 1 for speed near 0).
    assert 0.6 < s < 1.25


def test_each_scanned_layer_is_its_own_matrix():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(3, 16, 24)).astype(np.float32)
    tx = _muon("optim.weight_decay=0")
    scanned = {"encoder": {"blocks": {"block": {"fc1": {"kernel": jnp.zeros((3, 16, 24))}}}}}
    updates, _ = tx.update({"encoder": {"blocks": {"block": {"fc1": {"kernel": jnp.asarray(g)}}}}},
                           tx.init(scanned), scanned)
    got = np.asarray(updates["encoder"]["blocks"]["block"]["fc1"]["kernel"])
    for i in range(3):
        np.testing.assert_allclose(got[i], -0.1 * 0.2 * np.sqrt(24) * _newton_schulz64(g[i]), rtol=2e-4, atol=1e-6)


def _dims_by_path(params, exclude=()):
    dims = muon_dimension_numbers(params, exclude)
    is_leaf = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)  # noqa: E731
    return {path_str(p): d for p, d in jax.tree_util.tree_leaves_with_path(dims, is_leaf=is_leaf)}


def test_dimension_numbers_of_the_quickstart_model():
    config = load_config("configs/quickstart.py", ["model.text.vocab_size=64"])
    params = build_training(config, jit=False).abstract_state.params
    dims = _dims_by_path(params)
    image = "image/encoder/blocks/block/"
    # Scanned: axis 0 is the layer; query/key/value [embed, heads, head_dim] output heads*head_dim,
    # attention's output [heads, head_dim, embed] reads heads*head_dim.
    assert dims[image + "attn/query/kernel"] == ((1,), (2, 3))
    assert dims[image + "attn/out/kernel"] == ((1, 2), (3,))
    assert dims[image + "mlp/fc2/kernel"] == ((1,), (2,))
    assert dims["image/stem_1/kernel"] == ((0, 1, 2), (3,))  # conv [kh, kw, c_in, c_out]
    assert dims["text_proj/kernel"] == ((0,), (1,))
    adamw = sorted(k for k, d in dims.items() if d is None)
    assert "text/token_embedding" in adamw and "text/pos_embedding" in adamw and "log_scale" in adamw
    assert all(not k.endswith("kernel") for k in adamw), adamw
    # Unscanned towers: block_i kernels have no layer axis.
    flat = load_config("configs/quickstart.py", ["model.text.vocab_size=64", "model.image.scan=False"])
    dims = _dims_by_path(build_training(flat, jit=False).abstract_state.params, exclude=(r".*_proj/kernel",))
    assert dims["image/encoder/block_0/attn/key/kernel"] == ((0,), (1, 2))
    assert dims["image_proj/kernel"] is None


def test_a_bad_muon_field_is_named():
    with pytest.raises(ValueError, match="optim.muon_beta"):
        load_config("configs/quickstart.py:tiny", ["optim.name=muon", "optim.muon_beta=1.5"])
