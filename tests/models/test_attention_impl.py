"""Attention implementations (models/layers.py ``attention_impl``): 'xla' (jax.nn.dot_product_attention)
and the cuDNN path's mask handling against the hand-written 'einsum' reference, in values and
gradients; the 'auto' choice; the mixed-precision policy ``model.dtype='auto'``.

cuDNN itself needs an NVIDIA GPU; on CPU its code path is run with XLA's kernel standing in (same
call: causal flag + key lengths), which checks what this package adds — the mask conversion.
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.models import config as model_config_lib
from contrastive_jax.models import layers
from contrastive_jax.models.layers import MultiHeadAttention, resolve_attention_impl
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.vit import VisionTransformer

# The module, not the function `models.build` that the package re-exports under the same name.
build_lib = importlib.import_module("contrastive_jax.models.build")

B, L, W, HEADS = 3, 8, 32, 4


def _inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, L, W)), dtype)
    # Example 0: no padding; 1: the last 3 keys padded; 2: every key padded (a fully masked row).
    valid = np.ones((B, L), bool)
    valid[1, 5:] = False
    valid[2, :] = False
    return x, jnp.asarray(valid)[:, None, None, :]


def _value_and_grad(module, params, *args):
    """(output, d(sum(out * fixed random weights)) / d(params[, first arg if float])) in float32."""
    out = jax.jit(module.apply)(params, *args)  # jitted: one compile beats hundreds of eager ops
    w = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)

    def loss(p, x0):
        return jnp.sum(module.apply(p, x0, *args[1:]).astype(jnp.float32) * w)

    argnums = (0, 1) if jnp.issubdtype(args[0].dtype, jnp.inexact) else 0
    grads = jax.jit(jax.grad(loss, argnums=argnums))(params, args[0])
    return out, grads


def _max_diff(a, b) -> float:
    """Largest per-leaf ``max|a - b| / max(1, max|a|)``: relative for large leaves (embedding
    gradients reach ~1e2), absolute for small ones (key-bias gradients are 0 up to rounding)."""
    def one(u, v):
        u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
        return float(np.max(np.abs(u - v))) / max(1.0, float(np.max(np.abs(u))))
    return max(jax.tree.leaves(jax.tree.map(one, a, b)))


def _compare(make, args, impl, tol):
    """Applies ``make('einsum')`` and ``make(impl)`` with the same params; asserts values and
    gradients agree within ``tol`` (see _max_diff). Returns both outputs."""
    ref_mod, mod = make("einsum"), make(impl)
    params = ref_mod.init(jax.random.key(0), *args)
    ref_out, ref_grads = _value_and_grad(ref_mod, params, *args)
    out, grads = _value_and_grad(mod, params, *args)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert _max_diff(ref_out, out) <= tol, _max_diff(ref_out, out)
    assert _max_diff(ref_grads, grads) <= tol, _max_diff(ref_grads, grads)
    return ref_out, out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_self_attention_xla_equals_einsum(causal, dtype, tol):
    x, mask = _inputs(dtype)
    make = lambda impl: MultiHeadAttention(HEADS, causal=causal, attention_impl=impl, dtype=dtype)
    ref, out = _compare(make, (x, mask), "xla", tol)
    assert out.dtype == dtype
    # The fully masked example (2) gets a uniform softmax in both (finite mask value), not NaN;
    # without causal, every query row of it is the mean of the values, so all rows are equal.
    if not causal:
        np.testing.assert_allclose(np.asarray(out[2], np.float32), np.asarray(out[2, :1], np.float32).repeat(L, 0),
                                   atol=tol)


def test_cross_attention_xla_equals_einsum():
    """The MAP head's shape: one query attending over padded keys (kv=)."""
    x, mask = _inputs()
    q = jnp.asarray(np.random.default_rng(2).normal(size=(B, 1, W)), jnp.float32)
    make = lambda impl: MultiHeadAttention(HEADS, attention_impl=impl)

    ref_mod, mod = make("einsum"), make("xla")
    params = ref_mod.init(jax.random.key(0), q, mask, x)
    grad = lambda m: jax.grad(lambda p, kv: jnp.sum(m.apply(p, q, mask, kv) ** 2), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(mod.apply(params, q, mask, x), ref_mod.apply(params, q, mask, x), atol=2e-6)
    assert _max_diff(grad(ref_mod), grad(mod)) <= 2e-5
    # Padded keys get no gradient in either.
    assert float(jnp.max(jnp.abs(grad(mod)[1][1, 5:]))) == 0.0


def _text(impl, scan=False, pool="eos", remat="none", dtype=jnp.float32):
    return TextTransformer(vocab_size=50, width=W, depth=2, num_heads=HEADS, mlp_dim=64, pool=pool,
                           causal=pool == "eos", scan=scan, remat=remat, attention_impl=impl, dtype=dtype)


def _tokens():
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 50, size=(4, 10))
    tokens[1, 6:] = 0  # padding at the end
    tokens[2, 2:] = 0
    return jnp.asarray(tokens, jnp.int32)


@pytest.mark.parametrize("scan,pool,remat", [(False, "eos", "none"), (True, "map", "dots_saveable")])
def test_text_tower_xla_equals_einsum(scan, pool, remat):
    """Causal + padding masks (pool 'eos') and bidirectional + MAP pooling, scanned and remat."""
    _compare(functools.partial(_text, scan=scan, pool=pool, remat=remat), (_tokens(),), "xla", 3e-6)


def test_text_tower_bf16_close_to_einsum():
    _compare(functools.partial(_text, dtype=jnp.bfloat16), (_tokens(),), "xla", 5e-2)


def test_vit_xla_equals_einsum():
    """Unmasked self-attention, scanned + remat layers, and the MAP head's cross-attention."""
    images = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 16, 16, 3)), jnp.float32)
    make = lambda impl: VisionTransformer(patch_size=4, width=W, depth=2, num_heads=HEADS, mlp_dim=64, pool="map",
                                          scan=True, remat="full", attention_impl=impl)
    _compare(make, (images,), "xla", 3e-6)


def test_cudnn_mask_conversion_equals_einsum(monkeypatch):
    """The cuDNN path (causal flag + key lengths from the padding mask) on XLA's kernel."""
    real = jax.nn.dot_product_attention
    calls = []

    def stand_in(*args, implementation=None, **kwargs):
        calls.append((implementation, kwargs.get("is_causal"), kwargs.get("key_value_seq_lengths")))
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    monkeypatch.setattr(layers, "resolve_attention_impl", lambda impl, *a, **k: "cudnn" if impl == "cudnn" else impl)
    tokens = _tokens()[:2]  # prefix padding, at least one valid key per example
    _compare(_text, (tokens,), "cudnn", 3e-6)
    # Eagerly once more, to read the lengths the cuDNN call received.
    calls.clear()
    module = _text("cudnn")
    module.apply(module.init(jax.random.key(0), tokens), tokens)
    assert calls and calls[0][0] == "cudnn" and calls[0][1] is True
    np.testing.assert_array_equal(np.asarray(calls[0][2]), [10, 6])
    # A dense (non key-padding) mask is refused with a message, not silently mis-applied.
    x, _ = _inputs()
    mha = MultiHeadAttention(HEADS, attention_impl="cudnn")
    dense = jnp.ones((B, 1, L, L), bool)
    with pytest.raises(ValueError, match=r"key-padding mask \[B, 1, 1, Lk\]"):
        mha.init(jax.random.key(0), x, dense)


def test_resolve_attention_impl():
    assert resolve_attention_impl("auto", jnp.float32, 64) == "xla"  # this CPU
    assert resolve_attention_impl("auto", jnp.bfloat16, 64, platform="gpu") == "cudnn"
    assert resolve_attention_impl("auto", jnp.float32, 64, platform="gpu") == "xla"
    assert resolve_attention_impl("auto", jnp.bfloat16, 160, platform="gpu") == "xla"
    assert resolve_attention_impl("auto", jnp.bfloat16, 64, platform="tpu") == "xla"
    assert resolve_attention_impl("einsum", jnp.bfloat16, 64, platform="gpu") == "einsum"
    with pytest.raises(ValueError, match="attention_impl='cudnn' is not possible here: it needs an NVIDIA GPU"):
        resolve_attention_impl("cudnn", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match="attention_impl='flash'; known: auto, xla, cudnn, einsum"):
        resolve_attention_impl("flash", jnp.float32, 64)


def test_config_fields_and_dtype_policy():
    c = model_config_lib.defaults()
    assert c.image.attention_impl == "auto" and c.text.attention_impl == "auto" and c.dtype == "auto"
    c.text.vocab_size = 50
    model = build_lib.build(c)
    assert model.image.attention_impl == "auto" and model.image.dtype == jnp.float32  # 'auto' on CPU
    c.image.attention_impl = "einsum"
    assert build_lib.build(c).image.attention_impl == "einsum"
    c.image.attention_impl = "flash"
    with pytest.raises(ValueError, match=r"model.image.attention_impl='flash'; known: auto, xla, cudnn, einsum"):
        build_lib.build(c)
    assert build_lib.resolve_dtype("auto", platform="gpu") == jnp.bfloat16
    assert build_lib.resolve_dtype("auto", platform="tpu") == jnp.bfloat16
    assert build_lib.resolve_dtype("auto", platform="cpu") == jnp.float32
    assert build_lib.resolve_dtype("float32", platform="gpu") == jnp.float32
    with pytest.raises(ValueError, match=r"unknown model.dtype 'float16'; known: auto, float32, bfloat16"):
        build_lib.resolve_dtype("float16")


def test_bf16_params_stay_float32():
    """The policy's other half: bf16 compute never makes bf16 params (so optimizer state is f32)."""
    params = _text("xla", dtype=jnp.bfloat16).init(jax.random.key(0), _tokens())
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_bf16_first_moment_option():
    """optim.mu_dtype='bfloat16' (train/optim.py): AdamW's first moment in bf16, the second in f32."""
    from contrastive_jax.train.config import default_config
    from contrastive_jax.train.optim import make_optimizer

    params = {"w": jnp.ones((4, 3), jnp.float32)}
    optim = default_config().optim
    dtypes = {}
    for mu in ("float32", "bfloat16"):
        optim.mu_dtype = mu
        state = make_optimizer(optim, total_steps=10).tx.init(params)
        dtypes[mu] = {str(x.dtype) for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 2}
    assert dtypes == {"float32": {"float32"}, "bfloat16": {"bfloat16", "float32"}}


def test_run_config_rejects_unknown_impl_and_moment_dtype():
    """Typos are one-line config errors at load time (train/config.py check_config), before any build."""
    from contrastive_jax.train.config import ConfigError, check_config, default_config

    cfg = default_config()
    cfg.model.text.attention_impl = "flash"
    cfg.optim.mu_dtype = "float16"
    with pytest.raises(ConfigError) as err:
        check_config(cfg, warn=False)
    assert "config.model.text.attention_impl='flash' is unknown; valid: auto, xla, cudnn, einsum" in str(err.value)
    assert "config.optim.mu_dtype='float16' is unknown; valid: float32, bfloat16" in str(err.value)
    assert "\n" not in str(err.value)
