"""Probes on frozen features: ridge (closed form, regularization sweep), logistic regression
(optax L-BFGS), cosine k-NN and k-shot evaluation.

All take ``train_x [N, D]`` float features with int labels ``train_y [N]`` in ``[0, C)`` and
report accuracy (fraction in [0, 1]) on ``test_x`` / ``test_y``. Features are used as given (the
callers pass L2-normalized embeddings).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from contrastive_jax.evaluate.retrieval import shard_gallery, streaming_retrieval

DEFAULT_RIDGE_ALPHAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_LOGISTIC_L2 = (1e-5, 1e-4, 1e-3, 1e-2)


def _check(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float32)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: features must be [N, D] with N labels, got {x.shape} and {y.shape}")
    if y.size and y.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {y.min()}")
    return x, y


def _split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint (fit, validation) index sets; validation is ``fraction`` of n (>= 1)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(round(n * fraction))), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ----------------------------------------------------------------------------------------------
# Ridge
# ----------------------------------------------------------------------------------------------


class _RidgeSolver:
    """Ridge regression onto one-hot targets for many penalties from ONE eigendecomposition.

    With centred ``X`` (N x D) and ``Y`` (N x C): ``W(λ) = V diag(1/(e + λ)) Vᵀ XᵀY`` where
    ``XᵀX = V diag(e) Vᵀ``; the intercept is ``mean(Y) - mean(X) W``. Float64 throughout.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int, block: int = 65536):
        n, d = x.shape
        self.mean_x = x.astype(np.float64).mean(axis=0)
        onehot = np.zeros((n, num_classes))
        onehot[np.arange(n), y] = 1.0
        self.mean_y = onehot.mean(axis=0)
        gram, xty = np.zeros((d, d)), np.zeros((d, num_classes))
        for s in range(0, n, block):  # blocked so a large N never needs a float64 copy of X
            xb = x[s:s + block].astype(np.float64) - self.mean_x
            gram += xb.T @ xb
            xty += xb.T @ (onehot[s:s + block] - self.mean_y)
        self.eig, self.vec = np.linalg.eigh(gram)
        self.proj = self.vec.T @ xty
        self.n = n

    def weights(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        lam = float(alpha) * self.n  # penalty per example: comparable across N
        w = self.vec @ (self.proj / (np.maximum(self.eig, 0.0) + lam)[:, None])
        return w, self.mean_y - self.mean_x @ w


def _accuracy(x, y, w, b) -> float:
    pred = np.argmax(np.asarray(x, np.float64) @ w + b, axis=1)
    return float(np.mean(pred == y)) if y.size else float("nan")


def ridge_probe(
    train_x, train_y, test_x, test_y, *,
    alphas: Sequence[float] = DEFAULT_RIDGE_ALPHAS,
    val_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Closed-form ridge-regression classifier with the penalty chosen on held-out train data.

    ``alpha`` is the penalty per training example: the objective is
    ``||X W + b - Y||² + alpha · N · ||W||²`` with one-hot ``Y``. Each alpha is fit on
    ``1 - val_fraction`` of the train set and scored on the rest; the best (ties: the larger
    penalty) is refit on the whole train set and scored on the test set.

    Returns:
      ``{'top1': test accuracy, 'alpha': chosen alpha, 'val_top1': its validation accuracy}``.
    """
    train_x, train_y = _check(train_x, train_y, "ridge_probe train")
    test_x, test_y = _check(test_x, test_y, "ridge_probe test")
    c = int(num_classes or max(train_y.max(), test_y.max() if test_y.size else 0) + 1)
    alphas = sorted(float(a) for a in alphas)
    if not alphas:
        raise ValueError("ridge_probe: alphas is empty")
    fit_idx, val_idx = _split_validation(len(train_y), val_fraction, seed)
    solver = _RidgeSolver(train_x[fit_idx], train_y[fit_idx], c)
    val = [_accuracy(train_x[val_idx], train_y[val_idx], *solver.weights(a)) for a in alphas]
    best = max(range(len(alphas)), key=lambda i: (val[i], alphas[i]))
    w, b = _RidgeSolver(train_x, train_y, c).weights(alphas[best])
    return {"top1": _accuracy(test_x, test_y, w, b), "alpha": alphas[best], "val_top1": val[best]}


# ----------------------------------------------------------------------------------------------
# Logistic regression
# ----------------------------------------------------------------------------------------------


def _logistic_loss(params, x, y, weight, class_mask, l2):
    logits = jnp.where(class_mask, x @ params["w"] + params["b"], -1e30)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(weight * ce) / jnp.sum(weight) + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_logistic(x, y, weight, class_mask, l2, tol, *, steps: int):
    c = class_mask.shape[0]
    params = {"w": jnp.zeros((x.shape[1], c), jnp.float32), "b": jnp.zeros((c,), jnp.float32)}
    loss = lambda p: _logistic_loss(p, x, y, weight, class_mask, l2)  # noqa: E731
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def cond(carry):
        _, _, i, grad_norm = carry
        return (i < steps) & (grad_norm > tol)

    def body(carry):
        p, state, i, _ = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state, i + 1, optax.tree.norm(grad)

    init = (params, opt.init(params), jnp.int32(0), jnp.float32(jnp.inf))
    params, _, iters, _ = jax.lax.while_loop(cond, body, init)
    grad_norm = optax.tree.norm(jax.grad(loss)(params))
    return params, grad_norm, iters


def fit_logistic(train_x, train_y, *, l2: float, num_classes: int, steps: int = 300, tol: float = 1e-5):
    """Multinomial logistic regression, ``mean CE + l2/2 · ||W||²`` (bias unpenalized), solved
    full-batch with optax's L-BFGS (zoom line search), until the gradient norm is below ``tol``
    or after ``steps`` iterations.

    Equivalent to scikit-learn's ``LogisticRegression(C=1 / (l2 · N))``. Rows are padded to a
    multiple of 1024 (weight 0), features to a multiple of 128 (zero columns keep zero weights
    under the L2 penalty) and classes to a multiple of 8 (logits masked out), so the fits of one
    evaluation share one compiled program (compiling L-BFGS costs seconds; running it, less).

    Returns:
      ``(w [D, C] float32, b [C] float32, gradient norm at the solution)``.
    """
    x, y = _check(train_x, train_y, "fit_logistic")
    n, c = x.shape[0], int(num_classes)
    d = x.shape[1]
    n_pad, d_pad, c_pad = -(-n // 1024) * 1024, -(-d // 128) * 128, -(-c // 8) * 8
    xp = np.zeros((n_pad, d_pad), np.float32)
    xp[:n, :d] = x
    yp = np.zeros(n_pad, np.int32)
    yp[:n] = y
    weight = (np.arange(n_pad) < n).astype(np.float32)
    params, grad_norm, _ = _fit_logistic(jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(weight),
                                         jnp.asarray(np.arange(c_pad) < c), jnp.float32(l2), jnp.float32(tol),
                                         steps=int(steps))
    return np.asarray(params["w"])[:d, :c], np.asarray(params["b"])[:c], float(grad_norm)


def logistic_probe(
    train_x, train_y, test_x, test_y, *,
    l2_values: Sequence[float] = DEFAULT_LOGISTIC_L2,
    val_fraction: float = 0.2,
    seed: int = 0,
    steps: int = 300,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Logistic-regression probe; the L2 penalty is chosen on held-out train data as in
    :func:`ridge_probe`, then refit on the whole train set.

    Returns:
      ``{'top1', 'l2', 'val_top1'}``.
    """
    train_x, train_y = _check(train_x, train_y, "logistic_probe train")
    test_x, test_y = _check(test_x, test_y, "logistic_probe test")
    c = int(num_classes or max(train_y.max(), test_y.max() if test_y.size else 0) + 1)
    l2_values = sorted(float(v) for v in l2_values)
    if not l2_values:
        raise ValueError("logistic_probe: l2_values is empty")
    if len(l2_values) == 1:
        best_l2, best_val = l2_values[0], float("nan")
    else:
        fit_idx, val_idx = _split_validation(len(train_y), val_fraction, seed)
        val = []
        for l2 in l2_values:
            w, b, _ = fit_logistic(train_x[fit_idx], train_y[fit_idx], l2=l2, num_classes=c, steps=steps)
            val.append(_accuracy(train_x[val_idx], train_y[val_idx], w, b))
        i = max(range(len(l2_values)), key=lambda j: (val[j], l2_values[j]))
        best_l2, best_val = l2_values[i], val[i]
    w, b, _ = fit_logistic(train_x, train_y, l2=best_l2, num_classes=c, steps=steps)
    return {"top1": _accuracy(test_x, test_y, w, b), "l2": best_l2, "val_top1": best_val}


# ----------------------------------------------------------------------------------------------
# k-NN and k-shot
# ----------------------------------------------------------------------------------------------


def knn_classify(
    train_x, train_y, test_x, *,
    k: int = 20,
    temperature: float | None = 0.07,
    num_classes: int | None = None,
    mesh=None,
    axes=None,
) -> np.ndarray:
    """Cosine k-NN: each test row votes over its ``k`` most similar train rows.

    Votes are weighted by ``exp(cos / temperature)`` (Wu et al. 2018, as used by DINO), or
    counted equally when ``temperature`` is None; ties in the vote go to the lower class id.
    The neighbour search is :func:`~contrastive_jax.evaluate.retrieval.streaming_retrieval`
    (sharded over ``mesh``/``axes``, ties broken by the lower train index).

    Returns:
      ``[Nt]`` int64 predicted classes.
    """
    train_x, train_y = _check(train_x, train_y, "knn train")
    test_x = np.asarray(test_x, np.float32)
    c = int(num_classes or train_y.max() + 1)
    gallery = shard_gallery(_unit(train_x), mesh=mesh, axes=axes)
    top = streaming_retrieval(_unit(test_x), gallery, k=k)
    sims, idx = top["topk_scores"].astype(np.float64), top["topk_indices"]
    weights = np.ones_like(sims) if temperature is None else np.exp((sims - 1.0) / float(temperature))
    votes = np.zeros((test_x.shape[0], c))
    np.add.at(votes, (np.arange(test_x.shape[0])[:, None].repeat(idx.shape[1], 1), train_y[idx]), weights)
    return np.argmax(votes, axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.sqrt(np.sum(x * x, axis=1, keepdims=True) + 1e-12)


def knn_probe(train_x, train_y, test_x, test_y, *, k: int = 20, temperature: float | None = 0.07,
              num_classes: int | None = None, mesh=None, axes=None) -> dict[str, float]:
    """``{'top1': k-NN accuracy}`` (see :func:`knn_classify`)."""
    test_y = np.asarray(test_y).astype(np.int64)
    pred = knn_classify(train_x, train_y, test_x, k=k, temperature=temperature,
                        num_classes=num_classes, mesh=mesh, axes=axes)
    return {"top1": float(np.mean(pred == test_y))}


def sample_k_shot(labels, shots: int, seed: int) -> np.ndarray:
    """Indices of ``shots`` examples per class (all of a class's examples when it has fewer),
    drawn without replacement with a seeded generator; sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def few_shot_probe(
    train_x, train_y, test_x, test_y, *,
    shots: Sequence[int] = (1, 5, 10),
    seeds: int = 3,
    alpha: float = 1e-3,
    num_classes: int | None = None,
) -> dict[str, float]:
    """k-shot evaluation: for each k, a ridge classifier (fixed ``alpha``, no validation — there
    is too little data to hold any out) on k sampled examples per class, scored on the whole
    test set; mean and standard deviation over ``seeds`` draws.

    Returns:
      ``{'{k}shot/top1': mean, '{k}shot/top1_std': std}`` for each k.
    """
    train_x, train_y = _check(train_x, train_y, "few_shot train")
    test_x, test_y = _check(test_x, test_y, "few_shot test")
    c = int(num_classes or max(train_y.max(), test_y.max() if test_y.size else 0) + 1)
    out = {}
    for k in shots:
        accs = []
        for seed in range(int(seeds)):
            idx = sample_k_shot(train_y, int(k), seed)
            w, b = _RidgeSolver(train_x[idx], train_y[idx], c).weights(alpha)
            accs.append(_accuracy(test_x, test_y, w, b))
        out[f"{k}shot/top1"] = float(np.mean(accs))
        out[f"{k}shot/top1_std"] = float(np.std(accs))
    return out
