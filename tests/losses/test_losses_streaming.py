"""chunked / ring (and dense under sharding) against the float64 numpy reference.

Meshes of 1, 2, 4 and 8 simulated devices (and no mesh at all), block sizes that do and do not
divide the (per-device) batch, every option, metrics, bf16, the closed forms of all-equal
logits (dense too), the driver's own checks, and a compiled-HLO check that no [B, B] array
exists.
"""
import functools
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.losses import sigmoid_contrastive_loss, softmax_contrastive_loss
from contrastive_jax.losses import kernels, streaming
from contrastive_jax.losses.streaming import resolve_mesh
from test_losses import close, embeddings, np_sigmoid, np_softmax

B, D = 128, 16  # per-device batch 128, 64, 32, 16 on 1, 2, 4, 8 devices


def make_mesh(n):
    return None if n is None else Mesh(np.array(jax.devices()[:n]), ("data",))


def place(mesh, *arrays):
    if mesh is None:
        return arrays
    sh = NamedSharding(mesh, P("data"))
    return tuple(jax.device_put(a, sh) for a in arrays)


def softmax_grads(impl, mesh, block, x, y, s, **kw):
    f = lambda x, y, s: softmax_contrastive_loss(x, y, scale=s, impl=impl, block_size=block, mesh=mesh, **kw)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*place(mesh, x, y), s)


def sigmoid_grads(impl, mesh, block, x, y, s, b, **kw):
    f = lambda x, y, s, b: sigmoid_contrastive_loss(x, y, scale=s, bias=b, impl=impl, block_size=block, mesh=mesh, **kw)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*place(mesh, x, y), s, b)


# 16 divides every per-device batch (128/n); 12 divides none of them. Dense (no blocks) runs
# unsharded and on 8 devices (XLA inserts the all-gather).
IMPL_GRID = [(i, n, blk) for i in ("chunked", "ring") for n in (None, 1, 2, 4, 8) for blk in (16, 12)]
IMPL_GRID += [("dense", None, 16), ("dense", 8, 16)]


@pytest.mark.parametrize("impl,n,block", IMPL_GRID)
def test_softmax_impls_match_numpy(impl, n, block):
    x, y = embeddings(B, D, seed=1, sharpen=1.0)
    s = np.float32(12.0)
    loss, (gx, gy, gs) = softmax_grads(impl, make_mesh(n), block, x, y, s)
    rl, rdx, rdy, rds, _ = np_softmax(x, y, s)
    close(loss, rl, name="loss")
    close(gx, rdx, name="dx")
    close(gy, rdy, name="dy")
    close(gs, rds.sum(), name="dscale")


@pytest.mark.parametrize("impl,n,block", IMPL_GRID)
def test_sigmoid_impls_match_numpy(impl, n, block):
    x, y = embeddings(B, D, seed=2, sharpen=1.0)
    s, b = np.float32(10.0), np.float32(-4.0)
    loss, (gx, gy, gs, gb) = sigmoid_grads(impl, make_mesh(n), block, x, y, s, b)
    rl, rdx, rdy, rds, rdb, _ = np_sigmoid(x, y, s, b)
    close(loss, rl, name="loss")
    close(gx, rdx, name="dx")
    close(gy, rdy, name="dy")
    close(gs, rds.sum(), name="dscale")
    close(gb, rdb.sum(), name="dbias")


# ------------------------------------------------------------------------------------------
# options: weights / validity mask, label smoothing, one direction, per-row scale, metrics
# ------------------------------------------------------------------------------------------

def check_metrics(metrics, ref, logit_scale):
    assert set(metrics) == set(ref)
    for k, v in ref.items():
        # Mean logits can cancel to ~0: compare them on the scale of the logits themselves.
        atol = 1e-5 * logit_scale if k.endswith("logit") else 1e-7
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=atol, err_msg=k)


def option_weights(kind):
    w = np.ones(B, np.float32)
    if kind == "mask":  # padded examples scattered over every device's shard
        w[::5] = 0.0
        w[-3:] = 0.0
    elif kind == "weights":
        w = np.linspace(0.2, 3.0, B).astype(np.float32)
        w[7::9] = 0.0
    return w


IMPL_MESH = [("dense", None, 16), ("chunked", None, 24), ("ring", None, 24), ("chunked", 8, 5), ("ring", 8, 5)]


@pytest.mark.parametrize("impl,n,block", IMPL_MESH)
@pytest.mark.parametrize(
    "opts",
    [
        dict(weights="mask"),
        dict(weights="weights", label_smoothing=0.1),
        dict(bidirectional=False),
        dict(bidirectional=False, weights="mask", label_smoothing=0.2),
        dict(per_row_scale=True, weights="mask"),
    ],
    ids=["mask", "weights+smooth", "one-dir", "one-dir+mask+smooth", "per-row-scale+mask"],
)
def test_softmax_options_match_numpy(impl, n, block, opts):
    opts = dict(opts)
    x, y = embeddings(B, D, seed=3, sharpen=1.5)
    s = np.linspace(4.0, 16.0, B).astype(np.float32) if opts.pop("per_row_scale", False) else np.float32(9.0)
    w = option_weights(opts.pop("weights", None))
    eps = opts.get("label_smoothing", 0.0)
    bidir = opts.get("bidirectional", True)
    (loss, metrics), grads = jax.jit(
        jax.value_and_grad(
            lambda x, y, s: softmax_contrastive_loss(
                x, y, scale=s, impl=impl, block_size=block, mesh=make_mesh(n), valid=w,
                return_metrics=True, **opts),
            argnums=(0, 1, 2), has_aux=True,
        )
    )(*place(make_mesh(n), x, y), s)
    rl, rdx, rdy, rds, rm = np_softmax(x, y, s, weights=w, eps=eps, bidirectional=bidir)
    close(loss, rl, name="loss")
    close(grads[0], rdx, name="dx")
    close(grads[1], rdy, name="dy")
    close(grads[2], rds if np.ndim(s) else rds.sum(), name="dscale")
    check_metrics(metrics, rm, logit_scale=np.max(s))
    if w.min() == 0:  # padded examples get exactly zero gradient
        assert np.all(np.asarray(grads[0])[w == 0] == 0) and np.all(np.asarray(grads[1])[w == 0] == 0)


@pytest.mark.parametrize("impl,n,block", IMPL_MESH)
@pytest.mark.parametrize("opts", ["mask", "weights", "per-row"])
def test_sigmoid_options_match_numpy(impl, n, block, opts):
    x, y = embeddings(B, D, seed=4, sharpen=1.5)
    if opts == "per-row":
        s = np.linspace(4.0, 16.0, B).astype(np.float32)
        b = np.linspace(-6.0, 1.0, B).astype(np.float32)
    else:
        s, b = np.float32(10.0), np.float32(-3.0)
    w = option_weights(opts) if opts in ("mask", "weights") else None
    (loss, metrics), grads = jax.jit(
        jax.value_and_grad(
            lambda x, y, s, b: sigmoid_contrastive_loss(
                x, y, scale=s, bias=b, impl=impl, block_size=block, mesh=make_mesh(n), valid=w,
                return_metrics=True),
            argnums=(0, 1, 2, 3), has_aux=True,
        )
    )(*place(make_mesh(n), x, y), s, b)
    rl, rdx, rdy, rds, rdb, rm = np_sigmoid(x, y, s, b, weights=w)
    close(loss, rl, name="loss")
    close(grads[0], rdx, name="dx")
    close(grads[1], rdy, name="dy")
    close(grads[2], rds if np.ndim(s) else rds.sum(), name="dscale")
    close(grads[3], rdb if np.ndim(b) else rdb.sum(), name="dbias")
    check_metrics(metrics, rm, logit_scale=np.max(s) + np.max(np.abs(b)))


def test_metrics_are_informative():
    # Perfectly aligned pairs: every retrieval is right and positives beat negatives; the
    # reference and every impl agree on 1.0, so a broken accuracy would show up here.
    x, _ = embeddings(64, 32, seed=5)
    for impl in ["dense", "chunked", "ring"]:
        f = jax.jit(lambda x: softmax_contrastive_loss(x, x, scale=10.0, impl=impl, block_size=24, return_metrics=True))
        _, m = f(x)
        assert float(m["i2t_top1"]) == 1.0 and float(m["t2i_top1"]) == 1.0
        assert float(m["pos_logit"]) == pytest.approx(10.0, rel=1e-5)
        assert float(m["neg_logit"]) < 5.0


# ------------------------------------------------------------------------------------------
# sharding invariance, ambient meshes, hand-derived properties, bf16, errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["chunked", "ring"])
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_eight_device_gradient_equals_single_device(impl, loss):
    x, y = embeddings(256, 32, seed=6, sharpen=1.0)
    s, b = np.float32(10.0), np.float32(-5.0)
    if loss == "softmax":
        one = softmax_grads(impl, None, 48, x, y, s)
        eight = softmax_grads(impl, make_mesh(8), 48, x, y, s)
    else:
        one = sigmoid_grads(impl, None, 48, x, y, s, b)
        eight = sigmoid_grads(impl, make_mesh(8), 48, x, y, s, b)
    close(eight[0], one[0], name="loss")
    for g8, g1 in zip(eight[1], one[1]):
        close(g8, g1, name="grad")  # a lost (or extra) factor of 8 would fail here
    assert eight[1][0].sharding.spec[0] == "data"  # gradients stay batch-sharded


@pytest.mark.parametrize("impl", ["chunked", "ring"])
@pytest.mark.parametrize("how", ["set_mesh", "with_mesh", "explicit_2d", "input_sharding"])
def test_mesh_sources(impl, how):
    """Inside the user's jit: explicit mesh, ambient (set_mesh / legacy `with mesh:`), 2-D
    meshes with batch_axes, and a concrete input's sharding outside jit."""
    x, y = embeddings(B, D, seed=7, sharpen=1.0)
    s, b = np.float32(10.0), np.float32(-5.0)
    rl, rdx, _, _, _ = np_softmax(x, y, s)
    sl, sdx, _, _, _, _ = np_sigmoid(x, y, s, b)

    def run(mesh_arg, batch_axes, xs, ys):
        def f(x, y):
            l1 = softmax_contrastive_loss(x, y, scale=s, impl=impl, block_size=12, mesh=mesh_arg, batch_axes=batch_axes)
            l2 = sigmoid_contrastive_loss(x, y, scale=s, bias=b, impl=impl, block_size=12, mesh=mesh_arg, batch_axes=batch_axes)
            return l1 + 1000.0 * l2
        return jax.jit(jax.value_and_grad(f))(xs, ys)

    if how == "explicit_2d":
        mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
        xs, ys = place_spec(mesh, P("data"), x, y)
        out = run(mesh, "data", xs, ys)
        mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
        xs2, ys2 = place_spec(mesh2, P(("data", "fsdp")), x, y)
        out2 = run(mesh2, ("data", "fsdp"), xs2, ys2)
        close(out2[0], out[0], name="2-axis loss")
        close(out2[1], out[1], name="2-axis grad")
    else:
        mesh = make_mesh(8)
        xs, ys = place(mesh, x, y)
        # The values would also be right on the single-device fallback, so check that the
        # mesh really is picked up.
        if how == "set_mesh":
            with jax.set_mesh(mesh):
                assert resolve_mesh(None, None, x)[0].axis_names == ("data",)
                out = run(None, None, xs, ys)
        elif how == "with_mesh":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                with mesh:
                    assert resolve_mesh(None, None, x) == (mesh, ("data",))
                    out = run(None, None, xs, ys)
        else:  # outside jit: the mesh comes from the concrete inputs' NamedSharding
            assert resolve_mesh(None, None, xs) == (mesh, ("data",))
            assert resolve_mesh(None, None, x) == (None, None)
            l1 = softmax_contrastive_loss(xs, ys, scale=s, impl=impl, block_size=12)
            l2 = sigmoid_contrastive_loss(xs, ys, scale=s, bias=b, impl=impl, block_size=12)
            close(l1, rl, name="softmax loss")
            close(l2, sl, name="sigmoid loss")
            return
    close(out[0], rl + 1000.0 * sl, name="loss")
    # d/dx of (softmax + 1000 sigmoid) is the sum of the two reference gradients.
    close(out[1], rdx + 1000.0 * sdx, name="dx")


def place_spec(mesh, spec, *arrays):
    return tuple(jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays)


# Dense runs eagerly (as a user would call it), the streamed impls jitted on and off a mesh.
ALL_EQUAL_SOFTMAX = [("dense", None, Bq, 16) for Bq in (1, 7, 128)]
ALL_EQUAL_SOFTMAX += [(i, n, Bq, blk) for i in ("chunked", "ring")
                      for n, Bq, blk in [(None, 7, 3), (None, 1, 4), (8, 128, 5)]]


@pytest.mark.parametrize("impl,n,Bq,block", ALL_EQUAL_SOFTMAX)
def test_softmax_all_equal_is_log_b(impl, n, Bq, block):
    # Every logit equals the scale, so each row/column softmax is uniform: loss = log B exactly.
    x = np.tile(np.eye(1, 16, 3, dtype=np.float32), (Bq, 1))
    mesh = make_mesh(n)
    f = lambda x: softmax_contrastive_loss(x, x, scale=7.0, impl=impl, block_size=block, mesh=mesh)
    loss = (f if impl == "dense" else jax.jit(f))(*place(mesh, x))
    np.testing.assert_allclose(float(loss), math.log(Bq), rtol=1e-6, atol=1e-6)


ALL_EQUAL_SIGMOID = [("dense", None, Bq, s, b, 16, 1e-6)
                     for Bq, s, b in [(1, 10.0, -10.0), (9, 10.0, -10.0), (128, 3.0, 1.5)]]
ALL_EQUAL_SIGMOID += [(i, n, Bq, s, b, 7, 1e-5) for i in ("chunked", "ring")
                      for n, Bq, s, b in [(None, 9, 10.0, -10.0), (8, 128, 3.0, 1.5)]]


@pytest.mark.parametrize("impl,n,Bq,s,b,block,rtol", ALL_EQUAL_SIGMOID)
def test_sigmoid_all_equal_closed_form(impl, n, Bq, s, b, block, rtol):
    # All logits equal t = s + b: one positive and B-1 negatives per row.
    x = np.tile(np.eye(1, 16, 5, dtype=np.float32), (Bq, 1))
    t = s + b
    expected = np.logaddexp(0, -t) + (Bq - 1) * np.logaddexp(0, t)
    mesh = make_mesh(n)
    f = lambda x: sigmoid_contrastive_loss(x, x, scale=s, bias=b, impl=impl, block_size=block, mesh=mesh)
    loss = (f if impl == "dense" else jax.jit(f))(*place(mesh, x))
    np.testing.assert_allclose(float(loss), expected, rtol=rtol)


@pytest.mark.parametrize("impl,n", [("dense", None), ("chunked", 4), ("ring", 4)])
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_bf16_close_to_fp32(impl, loss, n):
    x, y = embeddings(B, 64, seed=8, sharpen=1.0)
    mesh = make_mesh(n)
    if loss == "softmax":
        f = lambda x, y: softmax_contrastive_loss(x, y, scale=10.0, impl=impl, block_size=24, mesh=mesh)
    else:
        f = lambda x, y: sigmoid_contrastive_loss(x, y, scale=10.0, bias=-5.0, impl=impl, block_size=24, mesh=mesh)
    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    l32, (gx32, gy32) = g(*place(mesh, x, y))
    l16, (gx16, gy16) = g(*place(mesh, x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)))
    assert l16.dtype == jnp.float32 and gx16.dtype == jnp.bfloat16
    close(l16, l32, rtol=2e-2, name="loss")
    close(gx16, gx32, rtol=5e-2, name="dx")
    close(gy16, gy32, rtol=5e-2, name="dy")


def test_indivisible_batch_on_mesh_is_an_error():
    x, y = embeddings(12, 8)
    with pytest.raises(ValueError, match="not divisible"):
        softmax_contrastive_loss(x, y, scale=1.0, impl="ring", mesh=make_mesh(8))
    with pytest.raises(ValueError, match="unknown impl"):
        softmax_contrastive_loss(x, y, scale=1.0, impl="flash")


def test_pair_stats_dense_and_streamed_agree_and_reserved_names_are_refused():
    # The driver's own checks, below the losses: pair_stats' dense reference (with metrics) is
    # the streamed kernel's, and names the driver or the kernel use cannot be extras.
    x, y = embeddings(24, 8, seed=9, sharpen=1.0)
    s = np.full(24, 5.0, np.float32)
    valid = np.arange(24) % 7 != 3
    kw = dict(alphas=(1.0, 0.5), mask_fn=lambda r, c, cos: cos < 0.9, with_metrics=True,
              weight_fn=lambda r, c, cos: (jnp.exp(cos), jnp.exp(cos)))
    dense = kernels.pair_stats(x, y, s, valid, impl="dense", **kw)
    for impl, n in (("chunked", None), ("ring", 4)):
        mesh = make_mesh(n)
        out = jax.jit(lambda x, y: kernels.pair_stats(x, y, s, valid, impl=impl, block_size=5, mesh=mesh, **kw))(
            *place(mesh, x, y))
        assert set(out) == set(dense)
        for k in dense:
            close(out[k], dense[k], name=f"{impl} {k}")
    for bad in ("_g0", "gid", "b"):
        with pytest.raises(ValueError, match="reserved"):
            kernels.pair_stats(x, y, s, valid, row_extra={bad: s})
    with pytest.raises(ValueError, match="chunked"):
        streaming.stream(None, x, y, s, valid, impl="dense", block_size=4)


# ------------------------------------------------------------------------------------------
# memory: no [B, B] array in the compiled forward+backward
# ------------------------------------------------------------------------------------------

_SHAPE = re.compile(r"\b(?:f32|bf16|f64|s32|pred)\[([0-9,]+)\]")


def _big_2d_arrays(hlo_text, limit):
    """Shapes in the HLO with at least two dimensions > limit."""
    bad = set()
    for m in _SHAPE.finditer(hlo_text):
        dims = [int(d) for d in m.group(1).split(",") if d]
        if sum(d > limit for d in dims) >= 2:
            bad.add(m.group(0))
    return bad


def _compiled(loss, impl, n, Bq, block, Dq=32):
    mesh = make_mesh(n)
    x = jax.ShapeDtypeStruct((Bq, Dq), jnp.float32,
                             sharding=None if mesh is None else NamedSharding(mesh, P("data")))
    if loss == "softmax":
        f = lambda x, y, s: softmax_contrastive_loss(x, y, scale=s, impl=impl, block_size=block, mesh=mesh)
    else:
        f = lambda x, y, s: sigmoid_contrastive_loss(x, y, scale=s, bias=-1.0, impl=impl, block_size=block, mesh=mesh)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(x, x, jnp.float32(1.0)).compile()


@pytest.mark.parametrize("impl,loss,n", [
    ("dense", "softmax", 4),  # control: the check does see a [B, B] array when there is one
    *[(i, l, n) for i in ("chunked", "ring") for l in ("softmax", "sigmoid") for n in (None, 4)],
])
def test_no_b_by_b_array_in_hlo(impl, loss, n):
    Bq, block = 4096, 256
    text = _compiled(loss, impl, n, Bq, block).as_text()
    bad = _big_2d_arrays(text, block)
    if impl == "dense":
        assert bad, "the check must be able to see the dense [B, B] logits"
    else:
        assert not bad, f"{impl} holds arrays with two dims > block_size={block}: {sorted(bad)[:5]}"


@pytest.mark.parametrize("impl", ["chunked", "ring"])
def test_temp_memory_scales_subquadratically(impl):
    # 4x the batch: [B, B] temporaries would grow 16x; O(B*D + block^2) ones at most ~4x.
    small = _temp_bytes(impl, 1024)
    large = _temp_bytes(impl, 4096)
    dense_large = _temp_bytes("dense", 4096)
    assert large < 6 * small, (small, large)
    assert large < dense_large / 4, (large, dense_large)


@functools.lru_cache(maxsize=None)
def _temp_bytes(impl, Bq):
    return _compiled("softmax", impl, 4, Bq, 128).memory_analysis().temp_size_in_bytes
