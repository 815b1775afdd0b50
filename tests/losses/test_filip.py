"""FILIP token-wise loss: float64 numpy reference (value, finite-difference gradients), properties
derived by hand, dense == chunked, and the memory bound of the streamed version."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.losses.contrastive import softmax_contrastive_loss
from contrastive_jax.losses.filip import filip_loss


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _reference(x, y, t, xm, ym, valid):
    """The paper's loss in float64, loops over pairs (independent of the implementation)."""
    B = x.shape[0]
    si2t = np.zeros((B, B))
    st2i = np.zeros((B, B))
    for i in range(B):
        for j in range(B):
            sim = x[i][xm[i]] @ y[j][ym[j]].T  # [Li_valid, Lt_valid]
            si2t[i, j] = sim.max(axis=1).mean()
            st2i[i, j] = sim.max(axis=0).mean()
    idx = np.flatnonzero(valid)
    total = 0.0
    for i in idx:
        row = t * si2t[i, idx]
        col = t * st2i[idx, i]
        lse_r = np.log(np.exp(row - row.max()).sum()) + row.max()
        lse_c = np.log(np.exp(col - col.max()).sum()) + col.max()
        total += 0.5 * (lse_r - t * si2t[i, i]) + 0.5 * (lse_c - t * st2i[i, i])
    return total / len(idx)


def _case(seed, B=5, Li=4, Lt=3, D=6):
    rng = np.random.default_rng(seed)
    x = _unit(rng.normal(size=(B, Li, D)))
    y = _unit(rng.normal(size=(B, Lt, D)))
    xm = rng.random((B, Li)) > 0.25
    ym = np.ones((B, Lt), bool)
    ym[:, -1] = rng.random(B) > 0.5  # trailing text padding on some rows
    xm[:, 0] = True
    valid = np.ones(B, bool)
    valid[-1] = False
    return x, y, xm, ym, valid


@pytest.mark.parametrize("impl,block", [("dense", 0), ("chunked", 2), ("chunked", 8)])
def test_value_and_gradients_match_a_float64_reference(impl, block):
    x, y, xm, ym, valid = _case(0)
    t = 3.0
    kw = dict(scale=t, image_mask=xm, text_mask=ym, valid=valid, impl=impl, block_size=max(block, 1))
    loss, (gx, gy) = jax.value_and_grad(lambda a, b: filip_loss(a, b, **kw), argnums=(0, 1))(
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(float(loss), _reference(x, y, t, xm, ym, valid), rtol=2e-6, atol=2e-6)
    # Central differences of the float64 reference on a few coordinates of each input.
    rng = np.random.default_rng(1)
    h = 1e-6
    for arr, g, which in ((x, gx, 0), (y, gy, 1)):
        for _ in range(6):
            idx = tuple(rng.integers(0, n) for n in arr.shape)
            up, down = arr.copy(), arr.copy()
            up[idx] += h
            down[idx] -= h
            args_up = (up, y) if which == 0 else (x, up)
            args_dn = (down, y) if which == 0 else (x, down)
            fd = (_reference(*args_up, t, xm, ym, valid) - _reference(*args_dn, t, xm, ym, valid)) / (2 * h)
            np.testing.assert_allclose(float(g[idx]), fd, rtol=1e-3, atol=2e-5)


def test_identical_tokens_give_log_batch_and_single_tokens_give_clip():
    B = 6
    rng = np.random.default_rng(2)
    # Every token of every image equal, every token of every text equal: all pair scores tie, so
    # each softmax is uniform over B and the loss is exactly log B.
    u, v = _unit(rng.normal(size=(2, 8)))
    x = np.broadcast_to(u, (B, 5, 8))
    y = np.broadcast_to(v, (B, 3, 8))
    for impl in ("dense", "chunked"):
        got = filip_loss(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), scale=7.0, impl=impl, block_size=4)
        np.testing.assert_allclose(float(got), np.log(B), rtol=1e-6)
    # One token per side: max and mean are the identity, FILIP is the CLIP softmax loss.
    a = _unit(rng.normal(size=(B, 8))).astype(np.float32)
    b = _unit(rng.normal(size=(B, 8))).astype(np.float32)
    filip = filip_loss(jnp.asarray(a[:, None]), jnp.asarray(b[:, None]), scale=5.0, impl="chunked", block_size=4)
    clip = softmax_contrastive_loss(jnp.asarray(a), jnp.asarray(b), scale=5.0)
    np.testing.assert_allclose(float(filip), float(clip), rtol=1e-6)
    # Masked tokens are ignored: appending garbage tokens masked out changes nothing.
    x2 = np.concatenate([np.asarray(x), _unit(rng.normal(size=(B, 2, 8)))], axis=1)
    mask = np.concatenate([np.ones((B, 5), bool), np.zeros((B, 2), bool)], axis=1)
    got = filip_loss(jnp.asarray(x2, jnp.float32), jnp.asarray(y, jnp.float32), scale=7.0, image_mask=mask)
    np.testing.assert_allclose(float(got), np.log(B), rtol=1e-6)


def test_chunked_equals_dense_with_a_ragged_last_block():
    x, y, xm, ym, valid = _case(3, B=11, Li=5, Lt=4, D=8)
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    kw = dict(scale=jnp.linspace(2.0, 4.0, 11), image_mask=xm, text_mask=ym, valid=valid)
    dense, gd = jax.value_and_grad(lambda a, b: filip_loss(a, b, impl="dense", **kw), argnums=(0, 1))(*args)
    chunk, gc = jax.value_and_grad(lambda a, b: filip_loss(a, b, impl="chunked", block_size=4, **kw), argnums=(0, 1))(*args)
    np.testing.assert_allclose(float(chunk), float(dense), rtol=1e-6)
    for a, b in zip(gc, gd):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_streamed_fwd_bwd_at_b2048_fits_2gib_where_dense_similarities_alone_are_32gib():
    """The issue's bound: B=2048, 64 image and 32 text tokens, D=128, fwd+bwd on one device. The
    dense [B, B, 64, 32] float32 similarities alone would be 2048^2*64*32*4 B = 32 GiB."""
    B, Li, Lt, D = 2048, 64, 32, 128
    x = jax.ShapeDtypeStruct((B, Li, D), jnp.float32)
    y = jax.ShapeDtypeStruct((B, Lt, D), jnp.float32)
    grad = jax.jit(jax.grad(lambda a, b: filip_loss(a, b, scale=10.0, impl="chunked", block_size=128), argnums=(0, 1)))
    mem = grad.lower(x, y).compile().memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    print(f"FILIP chunked fwd+bwd at B={B}: temp {mem.temp_size_in_bytes / 2**30:.3f} GiB, total {total / 2**30:.3f} GiB")
    assert total < 2 * 2**30, total
    assert B * B * Li * Lt * 4 == 32 * 2**30
    # The control: the dense implementation's compiled temporaries grow with B^2 (checked at a
    # small B, where compiling it is cheap) while the chunked one's grow linearly.
    def temp(impl, b):
        xs = jax.ShapeDtypeStruct((b, Li, D), jnp.float32)
        ys = jax.ShapeDtypeStruct((b, Lt, D), jnp.float32)
        f = jax.jit(jax.grad(lambda a, c: filip_loss(a, c, scale=10.0, impl=impl, block_size=64), argnums=(0, 1)))
        return f.lower(xs, ys).compile().memory_analysis().temp_size_in_bytes
    assert temp("dense", 256) > 3.5 * temp("dense", 128)
    assert temp("chunked", 256) < 2.5 * temp("chunked", 128)
    assert temp("chunked", 256) < temp("dense", 256) / 4
