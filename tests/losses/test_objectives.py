"""The objective family against float64 numpy references, hand-derived properties, and sharding.

Each reference below is written from the paper's formula on the dense [B, B] matrix in float64;
its gradients are central finite differences of that formula (float64, so ~1e-9 accurate), never
the library's own autodiff. Every objective is checked on ``dense``, single-device ``chunked``
(a block size that does not divide the batch) and ``chunked`` / ``ring`` over 8 devices: the
8-device results equal the unsharded reference for the same global batch.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax import losses as L
from contrastive_jax.losses import objectives as O
from test_losses import close

B, D = 16, 6
RTOL = 2e-5


def unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def data(seed=0, sharpen=1.0, b=B):
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((b, D)))
    y = unit(rng.standard_normal((b, D)) + sharpen * x)
    return x, y


def lse(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


# ------------------------------------------------------------------------------------------
# float64 references (values); gradients by central differences
# ------------------------------------------------------------------------------------------


def ref_dcl(x, y, s, sigma=0.0):
    l = s * x @ y.T
    off = np.where(np.eye(len(x)) > 0, -np.inf, l)
    c = np.sum(x * y, 1)
    w = 2 - len(x) * np.exp(c / sigma) / np.exp(c / sigma).sum() if sigma else np.ones(len(x))
    return np.mean(0.5 * (lse(off, 1) - w * s * c) + 0.5 * (lse(off, 0) - w * s * c))


def ref_hard_negative(x, y, s, beta, tau_plus, thr, frozen=None):
    """``frozen``: logits [B, B] the importance weights exp(beta l) are computed from instead of
    l (held fixed, finite differences of this give the constant-weights gradient)."""
    l = s * x @ y.T
    cos = x @ y.T
    fl = l if frozen is None else frozen
    n = len(x)
    out = 0.0
    for lm, cm, fm in ((l, cos, fl), (l.T, cos.T, fl.T)):  # text->image: same formula on the transpose
        for i in range(n):
            keep = [j for j in range(n) if j != i and cm[i, j] <= thr]
            neg = np.exp(lm[i, keep])
            imp = np.exp(beta * fm[i, keep])
            m = len(keep)
            reweight = np.sum(imp * neg) / np.mean(imp)
            pos = np.exp(lm[i, i])
            ng = max((-tau_plus * m * pos + reweight) / (1 - tau_plus), m * np.exp(-s))
            out += 0.5 * -np.log(pos / (pos + ng)) / n
    return out


def ref_weighted(x, y, s, W, exclude_self=False, bidirectional=True):
    """-sum_j W_ij log softmax(l_i.)_j / sum_j W_ij, rows (and columns) averaged."""
    l = s * x @ y.T
    if exclude_self:
        l = np.where(np.eye(len(x)) > 0, -np.inf, l)
        W = W * (1 - np.eye(len(x)))
    # An anchor without any positive has no target distribution and is left out.
    lr = l - lse(l, 1)[:, None]
    lr = np.where(W > 0, lr, 0.0)
    ok = W.sum(1) > 0
    row = np.mean(-np.sum(W * lr, 1)[ok] / W.sum(1)[ok])
    if not bidirectional:
        return row
    lc = l - lse(l, 0)[None, :]
    lc = np.where(W > 0, lc, 0.0)
    ok = W.sum(0) > 0
    col = np.mean(-np.sum(W * lc, 0)[ok] / W.sum(0)[ok])
    return 0.5 * (row + col)


def ref_sigmoid_groups(x, y, s, b, g):
    t = s * x @ y.T + b
    z = np.where(g[:, None] == g[None, :], 1.0, -1.0)
    return np.mean(np.sum(np.log1p(np.exp(-z * t)), 1))


def ref_symile(embs, s, negatives):
    n, m_ = len(embs[0]), len(embs)
    pos = s * np.sum(np.prod(np.stack(embs), 0), -1)
    total = 0.0
    for m in range(m_):
        a = embs[m]
        others = [e for k, e in enumerate(embs) if k != m]
        if negatives == "n":
            q = others[0].copy()
            for k, e in enumerate(others[1:], start=1):
                q = q * np.roll(e, k, axis=0)
            logits = s * a @ q.T
            logits[np.arange(n), np.arange(n)] = pos
        else:
            cols = [np.ones(D)]
            idx = [()]
            for e in others:
                cols = [c * e[j] for c in cols for j in range(n)]
                idx = [t + (j,) for t in idx for j in range(n)]
            logits = s * a @ np.stack(cols).T
        total += np.mean(lse(logits, 1) - pos)
    return total / m_


def ref_distill(x, y, tx, ty, s, ts):
    def logp(l, ax):
        return l - np.expand_dims(lse(l, ax), ax)
    ls, lt = s * x @ y.T, ts * tx @ ty.T
    out = 0.0
    for ax in (1, 0):
        pt = np.exp(logp(lt, ax))
        out += 0.5 * np.mean(np.sum(pt * (logp(lt, ax) - logp(ls, ax)), axis=ax))
    return out


def ref_uniformity(x, t):
    # Uniformity is defined for unit vectors, where ||x_i - x_j||^2 = 2 - 2 <x_i, x_j>; the
    # finite differences leave the sphere, so the reference uses the inner-product form (the
    # hand test below checks true distances on the sphere).
    d2 = 2.0 - 2.0 * x @ x.T
    n = len(x)
    return np.log(np.sum(np.where(np.eye(n) > 0, 0, np.exp(-t * d2))) / (n * (n - 1)))


def fd_grad(f, arrays, h=1e-6):
    """Central-difference gradients of a float64 scalar function w.r.t. each array."""
    grads = []
    for k, a in enumerate(arrays):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            args = [np.array(v, np.float64, copy=True) for v in arrays]
            args[k][idx] += h
            up = f(*args)
            args[k][idx] -= 2 * h
            g[idx] = (up - f(*args)) / (2 * h)
        grads.append(g)
    return grads


# ------------------------------------------------------------------------------------------
# cases: (library fn of (x, y, scale, impl kwargs) -> loss, numpy fn of (x, y, scale))
# ------------------------------------------------------------------------------------------

G = np.arange(B) // 3  # groups of 3 (the last of 1)
TX, TY = data(seed=7, sharpen=2.0)
Z3 = unit(np.random.default_rng(9).standard_normal((B, D)))
X1, Y1 = data(seed=1)  # the evaluation point of every case (reference() and run())


def _f(fn):
    return lambda x, y, s, **kw: fn(x, y, s, **kw)[0]


CASES = {
    "dcl": (_f(lambda x, y, s, **kw: O.decoupled_contrastive_loss(x, y, scale=s, **kw)),
            lambda x, y, s: ref_dcl(x, y, s)),
    "dclw": (_f(lambda x, y, s, **kw: O.decoupled_contrastive_loss(x, y, scale=s, sigma=0.5, **kw)),
             lambda x, y, s: ref_dcl(x, y, s, 0.5)),
    "hard_negative": (
        _f(lambda x, y, s, **kw: O.hard_negative_loss(x, y, scale=s, beta=0.7, tau_plus=0.1, fn_threshold=0.8, **kw)),
        lambda x, y, s: ref_hard_negative(x, y, s, 0.7, 0.1, 0.8)),
    # Importance weights constant in the backward pass: the same value at the evaluation point,
    # the gradient = finite differences with the weights frozen at that point's logits.
    "hard_negative_constant_weights": (
        _f(lambda x, y, s, **kw: O.hard_negative_loss(x, y, scale=s, beta=0.7, tau_plus=0.1, fn_threshold=0.8,
                                                      constant_weights=True, **kw)),
        lambda x, y, s: ref_hard_negative(x, y, s, 0.7, 0.1, 0.8, frozen=SCALE * X1 @ Y1.T)),
    "cwcl": (_f(lambda x, y, s, **kw: O.soft_target_loss(x, y, scale=s, targets=jnp.asarray(TX, jnp.float32), **kw)),
             lambda x, y, s: ref_weighted(x, y, s, 0.5 * (1 + TX @ TX.T))),
    "multi_positive": (
        _f(lambda x, y, s, **kw: O.multi_positive_loss(x, y, scale=s, groups=jnp.asarray(G), **kw)),
        lambda x, y, s: ref_weighted(x, y, s, (G[:, None] == G[None, :]).astype(float))),
    "supcon": (
        _f(lambda x, y, s, **kw: O.multi_positive_loss(x, x, scale=s, groups=jnp.asarray(G), exclude_self=True,
                                                       bidirectional=False, **kw)),
        lambda x, y, s: ref_weighted(x, x, s, (G[:, None] == G[None, :]).astype(float), True, False)),
    "sigmoid_multi_positive": (
        _f(lambda x, y, s, **kw: O.sigmoid_multi_positive_loss(x, y, scale=s, bias=-1.5, groups=jnp.asarray(G), **kw)),
        lambda x, y, s: ref_sigmoid_groups(x, y, s, -1.5, G)),
    "symile": (_f(lambda x, y, s, **kw: O.symile_loss([x, y, jnp.asarray(Z3, jnp.float32)], scale=s, **kw)),
               lambda x, y, s: ref_symile([x, y, Z3], s, "n")),
    "distill": (
        _f(lambda x, y, s, **kw: O.similarity_distillation_loss(
            x, y, jnp.asarray(TX, jnp.float32), jnp.asarray(TY, jnp.float32), scale=s, teacher_scale=8.0, **kw)),
        lambda x, y, s: ref_distill(x, y, TX, TY, s, 8.0)),
    "uniformity": (lambda x, y, s, **kw: O.uniformity(x, t=s / 4.0, **kw),
                   lambda x, y, s: ref_uniformity(x, s / 4.0)),
}
SCALE = 4.0
_REF_CACHE = {}


def reference(name):
    if name not in _REF_CACHE:
        x, y = data(seed=1)
        ref = CASES[name][1]
        val = ref(x, y, SCALE)
        gx, gy = fd_grad(lambda a, b: ref(a, b, SCALE), [x, y])
        (gs,) = fd_grad(lambda s: ref(x, y, float(s)), [np.array(SCALE)])
        _REF_CACHE[name] = (val, gx, gy, gs)
    return _REF_CACHE[name]


def run(name, impl, n, block):
    x, y = data(seed=1)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    mesh = None if n is None else Mesh(np.array(jax.devices()[:n]), ("data",))
    if mesh is not None:
        x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    fn = CASES[name][0]
    f = lambda x, y, s: fn(x, y, s, impl=impl, block_size=block, mesh=mesh)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, y, jnp.float32(SCALE))


# Every objective on every driver of the shared kernel would cost ~45 compilations; ring shares
# the tile code with chunked, so it runs for three objectives that use each kernel feature
# (masks, several temperatures + counts, row/column target weights).
GRID = [(name, *impl) for name in sorted(CASES)
        for impl in [("dense", None, 0), ("chunked", None, 5), ("chunked", 8, 1)]]
GRID += [(name, "ring", 8, 1) for name in ("hard_negative", "distill")]


@pytest.mark.parametrize("name,impl,n,block", GRID)
def test_objective_matches_float64_reference(name, impl, n, block):
    val, gx, gy, gs = reference(name)
    loss, (dx, dy, ds) = run(name, impl, n, block or 1024)
    close(loss, val, RTOL, name=f"{name} loss")
    close(dx, gx, 1e-4, name=f"{name} dx")
    close(dy, gy, 1e-4, name=f"{name} dy")
    close(ds, gs, 1e-4, name=f"{name} dscale")


def test_symile_n_squared_matches_reference():
    x, y = data(seed=3, b=6)
    z = unit(np.random.default_rng(4).standard_normal((6, D)))
    f = lambda x, y: O.symile_loss([x, y, jnp.asarray(z, jnp.float32)], scale=3.0, negatives="n_squared")[0]
    loss, (dx, dy) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*f32(x, y))
    ref = lambda a, b: ref_symile([a, b, z], 3.0, "n_squared")
    close(loss, ref(x, y), RTOL)
    gx, gy = fd_grad(ref, [x, y])
    close(dx, gx, 1e-4)
    close(dy, gy, 1e-4)


# ------------------------------------------------------------------------------------------
# hand-derived properties
# ------------------------------------------------------------------------------------------


def f32(*a):
    return [jnp.asarray(v, jnp.float32) for v in a]


def test_dcl_has_no_positive_in_denominator():
    # Orthonormal pairs x_i = y_i = e_i: every negative logit is 0, the positive s. DCL's row
    # is -s + log(B - 1); InfoNCE's would be log(e^s + B - 1) - s.
    s, n = 5.0, 4
    e = np.eye(n, D)
    for impl in ("dense", "chunked"):
        loss, _ = jax.jit(lambda a, b: O.decoupled_contrastive_loss(a, b, scale=s, impl=impl, block_size=3))(*f32(e, e))
        close(loss, -s + np.log(n - 1))


def test_dclw_equals_dcl_when_all_positives_agree():
    # Equal positive cosines give vMF weights 2 - 1 = 1 for every pair.
    e = np.eye(4, D)
    y = unit(e + 0.5 * np.roll(np.eye(4, D), 1, axis=1))
    a, _ = O.decoupled_contrastive_loss(*f32(e, y), scale=3.0, sigma=0.3)
    b, _ = O.decoupled_contrastive_loss(*f32(e, y), scale=3.0)
    close(a, b)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_hard_negative_beta0_is_infonce(impl):
    x, y = f32(*data(seed=2))
    a, _ = jax.jit(lambda x, y: O.hard_negative_loss(x, y, scale=6.0, beta=0.0, impl=impl, block_size=5))(x, y)
    b = jax.jit(lambda x, y: L.softmax_contrastive_loss(x, y, scale=6.0))(x, y)
    close(a, b, RTOL)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_hard_negative_constant_weights_repel_every_negative(impl):
    # x = identity rows makes the logits l_ij = s * y[j, i], so dL/dy[j, i] = s * dL/dl_ij. With
    # constant weights dL/dl_ij = c_i * softmax((1 + beta) l_i.)_j + (the same for column j) > 0
    # for every negative; the paper's form, d log R / dl_ij = (1 + beta) w1_ij - beta w0_ij, is
    # negative for the easier negatives: it pulls them closer. Same value either way.
    n = 8
    x = np.eye(n)
    y = np.random.default_rng(3).standard_normal((n, n)) * 0.5 + 1.5 * np.eye(n)
    f = lambda const: jax.jit(jax.value_and_grad(lambda a, b: O.hard_negative_loss(
        a, b, scale=3.0, beta=1.0, constant_weights=const, impl=impl, block_size=3)[0], argnums=1))
    v_paper, g_paper = f(False)(*f32(x, y))
    v_const, g_const = f(True)(*f32(x, y))
    close(v_const, v_paper, RTOL)
    off = ~np.eye(n, dtype=bool)
    assert np.all(np.asarray(g_const)[off] > 0)
    assert np.sum(np.asarray(g_paper)[off] < 0) >= n  # several negatives attracted


def test_hard_negative_false_negative_mask_removes_the_duplicate():
    # Example 1 duplicates example 0, so its text is as close to image 0 as text 0 is. A threshold
    # just below that cosine drops the pairs (0, 1) and (1, 0) (and any other pair above it)
    # from the negatives, which lowers the loss; the masked fraction is counted by hand.
    x, y = data(seed=5, b=6)
    x[1], y[1] = x[0], y[0]
    thr = float(x[0] @ y[0]) - 1e-3
    cos = x @ y.T
    expected_frac = np.sum((cos > thr) & (np.eye(6) == 0)) / 30
    hn = jax.jit(lambda a, b, t: O.hard_negative_loss(a, b, scale=5.0, beta=0.0, fn_threshold=t), static_argnums=2)
    masked, met = hn(*f32(x, y), thr)
    close(masked, ref_hard_negative(x, y, 5.0, 0.0, 0.0, thr), RTOL)
    unmasked, _ = hn(*f32(x, y), 1.0)
    assert float(masked) < float(unmasked)
    assert expected_frac >= 2 / 30
    close(met["fn_masked_frac"], expected_frac)


def test_cwcl_with_identity_targets_is_infonce():
    x, y = f32(*data(seed=3))
    a, _ = O.soft_target_loss(x, y, scale=7.0, targets=x, target_fn="identity", impl="chunked", block_size=5)
    close(a, L.softmax_contrastive_loss(x, y, scale=7.0), RTOL)


def test_multi_positive_with_unique_groups_is_infonce_and_sigmoid_is_siglip():
    x, y = f32(*data(seed=4))
    g = jnp.arange(B)
    a, _ = O.multi_positive_loss(x, y, scale=7.0, groups=g, impl="chunked", block_size=5)
    close(a, L.softmax_contrastive_loss(x, y, scale=7.0), RTOL)
    b, _ = O.sigmoid_multi_positive_loss(x, y, scale=7.0, bias=-2.0, groups=g, impl="chunked", block_size=5)
    close(b, L.sigmoid_contrastive_loss(x, y, scale=7.0, bias=-2.0), RTOL)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_nt_xent_two_identical_views_of_orthogonal_examples(impl):
    # Views a, a, b, b with a _|_ b: each anchor has one positive (logit s) and two negatives
    # (logit 0) after removing itself: loss = log(e^s + 2) - s.
    s = 3.0
    views = jnp.asarray(np.repeat(np.eye(2, D)[:, None], 2, axis=1), jnp.float32)
    loss, _ = O.nt_xent_loss(views, scale=s, impl=impl, block_size=3)
    close(loss, np.log(np.exp(s) + 2) - s)


def test_nt_xent_three_views_matches_reference():
    rng = np.random.default_rng(0)
    v = unit(rng.standard_normal((4, 3, D)))
    g = np.repeat(np.arange(4), 3)
    ref = ref_weighted(v.reshape(12, D), v.reshape(12, D), 2.0, (g[:, None] == g[None]).astype(float), True, False)
    loss, _ = O.nt_xent_loss(jnp.asarray(v, jnp.float32), scale=2.0, impl="chunked", block_size=5)
    close(loss, ref, RTOL)


def test_symile_with_two_modalities_is_clip():
    # MIP of two vectors is their dot product; with no other modality to shuffle, the O(N) and
    # O(N^2) negatives are both the batch, and averaging the two anchors is symmetric InfoNCE.
    x, y = f32(*data(seed=6, b=8))
    clip = L.softmax_contrastive_loss(x, y, scale=5.0)
    for neg, impl in (("n", "chunked"), ("n_squared", "dense")):
        f = jax.jit(lambda x, y: O.symile_loss([x, y], scale=5.0, negatives=neg, impl=impl, block_size=3)[0])
        close(f(x, y), clip, RTOL)


def test_distillation_from_itself_is_zero_with_zero_gradient():
    x, y = f32(*data(seed=8))
    f = lambda x, y: O.similarity_distillation_loss(x, y, x, y, scale=6.0, teacher_scale=6.0, impl="chunked",
                                                    block_size=5)[0]
    loss, (dx, dy) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, y)
    assert abs(float(loss)) < 1e-6
    assert float(jnp.max(jnp.abs(dx))) < 1e-5 and float(jnp.max(jnp.abs(dy))) < 1e-5


def test_alignment_and_uniformity_by_hand():
    e = np.eye(2, D)
    x = np.stack([e[0], -e[0]])  # antipodal: ||x_0 - x_1||^2 = 4
    close(O.uniformity(*f32(x), t=2.0, impl="chunked", block_size=1), -8.0)
    close(O.alignment(*f32(x, x)), 0.0)
    # pairs (e0, e0) and (e1, -e0): squared distances 0 and 2.
    close(O.alignment(*f32(e, x)), 1.0)


def test_matryoshka_one_full_prefix_equals_base_and_prefixes_renormalize():
    x, y = data(seed=9)
    (p,) = O.matryoshka_prefixes(jnp.asarray(x, jnp.float32), [3])
    close(jnp.linalg.norm(p, axis=1), np.ones(B))
    close(p, unit(x[:, :3]))
