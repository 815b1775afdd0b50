"""contrastive_jax: contrastive pretraining in JAX/Flax.

``contrastive_jax.load(path)`` (see :mod:`contrastive_jax.api`) loads a training run, a model
directory or a PyTorch CLIP checkpoint for encoding; the packages (``losses``, ``models``,
``data``, ``train``, ``evaluate``, ``parallel``, ``interop``) are imported on use.
"""


def load(path, **kwargs):
    """See :func:`contrastive_jax.api.load` (imported lazily: ``import contrastive_jax`` stays cheap)."""
    from contrastive_jax.api import load as _load

    return _load(path, **kwargs)


def __getattr__(name):
    if name in ("Model", "ZeroShotClassifier"):
        from contrastive_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'contrastive_jax' has no attribute {name!r}")
