"""Argument handling shared by every loss of the package: embedding shapes and ``impl``, per-row
scalars, and the per-example mask ``valid`` (with ``weights=``, its deprecated former name on the
softmax and sigmoid losses)."""
from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax.losses.streaming import check_impl

F32 = jnp.float32


def check_pair(x, y, impl: str) -> None:
    """``impl`` known (:func:`.streaming.check_impl`) and x, y both ``[B, D]`` of one shape."""
    check_impl(impl)
    if x.ndim != 2 or y.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be [B, D] with equal shapes; got {x.shape} and {y.shape}")


def per_row(v: Any, batch: int, name: str) -> jax.Array:
    """A float scalar or ``[B]`` vector as a float32 ``[B]`` vector (autodiff sums a broadcast)."""
    v = jnp.asarray(v, F32)
    if v.ndim == 0:
        return jnp.broadcast_to(v, (batch,))
    if v.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or a [B]={batch} vector; got shape {v.shape}")
    return v


def renamed_mask(valid: Any, weights: Any, where: str) -> Any:
    """``valid``, or the value passed under its deprecated name ``weights`` (with a
    DeprecationWarning); both at once is a TypeError."""
    if weights is None:
        return valid
    if valid is not None:
        raise TypeError(f"{where}: pass valid= only (weights= is its deprecated name)")
    warnings.warn(f"{where}(weights=...) is deprecated; pass valid=... (same meaning: [B] bool mask or "
                  "non-negative per-example weights)", DeprecationWarning, stacklevel=3)
    return weights


def example_weights(valid: Any, batch: int) -> tuple[jax.Array, jax.Array]:
    """(w, mask): float32 ``[B]`` non-negative per-example weights (constants for the gradient;
    all 1 when ``valid`` is None) and the bool ``[B]`` mask ``w > 0``."""
    if valid is None:
        w = jnp.ones((batch,), F32)
    else:
        w = jax.lax.stop_gradient(jnp.asarray(valid).astype(F32))
        if w.shape != (batch,):
            raise ValueError(f"valid must be [B]={batch}; got shape {w.shape}")
    return w, w > 0


def example_mask(valid: Any, batch: int) -> jax.Array:
    """The bool ``[B]`` mask (all True when ``valid`` is None; non-zero numbers count as True)."""
    v = jnp.ones((batch,), bool) if valid is None else jnp.asarray(valid).astype(bool)
    if v.shape != (batch,):
        raise ValueError(f"valid must be [B]={batch}; got shape {v.shape}")
    return v
