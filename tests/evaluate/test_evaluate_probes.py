"""Probes and representation diagnostics against independent references (numpy formulas,
brute force, scikit-learn)."""
import jax
import numpy as np
import pytest

from contrastive_jax.evaluate import diagnostics as diag
from contrastive_jax.evaluate import probes
from contrastive_jax.parallel.mesh import make_mesh


def blobs(rng, n, d=12, c=5, spread=1.6):
    """Gaussian class clusters, overlapping enough that accuracy is well below 1."""
    centers = rng.normal(size=(c, d))
    y = rng.integers(0, c, size=n)
    return (centers[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def test_ridge_solver_matches_direct_solve():
    rng = np.random.default_rng(0)
    x, y = blobs(rng, 80)
    onehot = np.eye(5)[y]
    x64 = x.astype(np.float64)
    xc, yc = x64 - x64.mean(0), onehot - onehot.mean(0)
    for alpha in (1e-4, 0.3):
        w_ref = np.linalg.solve(xc.T @ xc + alpha * 80 * np.eye(12), xc.T @ yc)
        w, b = probes._RidgeSolver(x, y, 5).weights(alpha)
        np.testing.assert_allclose(w, w_ref, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(b, onehot.mean(0) - x64.mean(0) @ w_ref, atol=1e-9)


def test_ridge_probe_sweep_picks_the_best_validation_alpha():
    rng = np.random.default_rng(1)
    x, y = blobs(rng, 300)
    tx, ty = blobs(np.random.default_rng(1), 200)  # same centers (same seed), fresh noise
    alphas = (1e-6, 1e-2, 10.0, 1e3)
    out = probes.ridge_probe(x, y, tx, ty, alphas=alphas, val_fraction=0.25, seed=3)
    fit, val = probes._split_validation(300, 0.25, 3)
    accs = [probes._accuracy(x[val], y[val], *probes._RidgeSolver(x[fit], y[fit], 5).weights(a)) for a in alphas]
    assert out["val_top1"] == max(accs)
    assert accs[alphas.index(out["alpha"])] == max(accs)
    assert 0.4 < out["top1"] < 1.0
    # A huge penalty shrinks W to 0: predictions follow the class prior (argmax of mean one-hot).
    huge = probes.ridge_probe(x, y, tx, ty, alphas=(1e9,))
    assert huge["top1"] == pytest.approx(np.mean(ty == np.bincount(y).argmax()))


def test_logistic_probe_matches_sklearn_within_one_point():
    sklearn_lm = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is the test-only reference")
    rng = np.random.default_rng(2)
    x, y = blobs(rng, 600, d=16, c=6, spread=2.0)
    tx, ty = blobs(np.random.default_rng(2), 400, d=16, c=6, spread=2.0)
    l2 = 1e-3
    ours = probes.logistic_probe(x, y, tx, ty, l2_values=(l2,))
    ref = sklearn_lm.LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=2000, tol=1e-8).fit(x, y)
    ref_acc = float(np.mean(ref.predict(tx) == ty))
    assert abs(ours["top1"] - ref_acc) <= 0.01, (ours, ref_acc)
    assert 0.5 < ref_acc < 0.99  # neither trivial nor hopeless
    # Same convex objective, so the solutions agree too, not just the accuracy.
    w, b, grad_norm = probes.fit_logistic(x, y, l2=l2, num_classes=6)
    assert grad_norm < 1e-3
    np.testing.assert_allclose(w.T, ref.coef_, atol=2e-2)


def brute_knn(train_x, train_y, test_x, k, temperature, c):
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    s = unit(test_x.astype(np.float64)) @ unit(train_x.astype(np.float64)).T
    preds = []
    for row in s:
        nn = np.lexsort((np.arange(len(row)), -row))[:k]
        votes = np.zeros(c)
        for j in nn:
            votes[train_y[j]] += 1.0 if temperature is None else np.exp(row[j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


@pytest.mark.parametrize("temperature", [None, 0.1])
@pytest.mark.parametrize("devices", [1, 8])
def test_knn_matches_bruteforce(temperature, devices):
    rng = np.random.default_rng(4)
    x, y = blobs(rng, 101)
    tx, _ = blobs(np.random.default_rng(4), 43)
    mesh = make_mesh([("data", devices)], jax.devices()[:devices]) if devices > 1 else None
    got = probes.knn_classify(x, y, tx, k=7, temperature=temperature, num_classes=5,
                              mesh=mesh, axes=("data",) if mesh else None)
    np.testing.assert_array_equal(got, brute_knn(x, y, tx, 7, temperature, 5))


def test_k_shot_sampling_and_separable_one_shot():
    y = np.array([0] * 10 + [1] * 3 + [2] * 7)
    idx = probes.sample_k_shot(y, 5, seed=0)
    assert np.bincount(y[idx]).tolist() == [5, 3, 5]  # class 1 has only 3
    assert len(set(idx)) == len(idx)
    assert not np.array_equal(idx, probes.sample_k_shot(y, 5, seed=1))
    # Far-apart clusters: one example per class already classifies perfectly.
    rng = np.random.default_rng(5)
    x, y = blobs(rng, 200, spread=0.01)
    tx, ty = blobs(np.random.default_rng(5), 100, spread=0.01)
    out = probes.few_shot_probe(x, y, tx, ty, shots=(1, 3), seeds=2)
    assert out["1shot/top1"] == 1.0 and out["3shot/top1"] == 1.0 and out["1shot/top1_std"] == 0.0


def test_rankme_formula_and_hand_cases():
    rng = np.random.default_rng(6)
    z = rng.normal(size=(50, 8))
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert diag.rankme(z) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    # r equal singular values -> RankMe = r (up to the 1e-7 smoothing).
    q, _ = np.linalg.qr(rng.normal(size=(50, 8)))
    for r in (1, 3, 8):
        assert diag.rankme(q[:, :r] @ np.eye(r, 8)) == pytest.approx(r, rel=1e-4)


def test_alignment_uniformity_against_formulas():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(30, 5)); x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.normal(size=(30, 5)); y /= np.linalg.norm(y, axis=1, keepdims=True)
    assert diag.alignment(x, y) == pytest.approx(np.mean(np.sum((x - y) ** 2, axis=1)))
    pairs = [np.sum((x[i] - x[j]) ** 2) for i in range(30) for j in range(i + 1, 30)]
    assert diag.uniformity(x, block=7) == pytest.approx(np.log(np.mean(np.exp(-2 * np.array(pairs)))))
    # Hand cases: identical pairs align perfectly; two antipodal points: log exp(-2·4) = -8.
    assert diag.alignment(x, x) == 0.0
    e = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert diag.uniformity(e) == pytest.approx(-8.0)
    assert diag.alignment(e, -e) == pytest.approx(4.0)


def test_modality_gap_norms_and_matryoshka():
    x = np.array([[1.0, 0.0], [1.0, 0.0]])
    y = np.array([[0.0, 1.0], [0.0, 1.0]])
    assert diag.modality_gap(x, y) == pytest.approx(np.sqrt(2))
    stats = diag.norm_stats(np.array([[3.0, 4.0], [0.0, 1.0]]))
    assert stats == pytest.approx({"norm_mean": 3.0, "norm_std": 2.0, "norm_min": 1.0, "norm_max": 5.0})
    p = diag.matryoshka_prefix(np.array([[3.0, 4.0, 12.0]]), 2)
    np.testing.assert_allclose(p, [[0.6, 0.8]], rtol=1e-6)
    with pytest.raises(ValueError, match="matryoshka_dims"):
        diag.matryoshka_prefix(np.ones((2, 3)), 4)
    out = diag.representation_diagnostics(x / 1.0, y)
    assert out["modality_gap"] == pytest.approx(np.sqrt(2)) and out["alignment"] == pytest.approx(2.0)
