"""FLOP counts and peak FLOP/s for model-FLOPs-utilization (MFU) logging.

MFU = (FLOPs of one train step) / (step time) / (peak FLOP/s of the devices). The step's FLOPs come
from XLA's cost analysis of the compiled program (per device, so comparable with a per-device
peak); with rematerialization on they include the recomputed forward passes, i.e. the figure is
then hardware-FLOPs utilization.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device from vendor datasheets (no sparsity).
KNOWN_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled (AOT) function per device, from XLA's cost analysis; 0 when
    the backend does not report them."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement cost analysis
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Measured FLOP/s of a float32 ``[n, n] @ [n, n]`` matmul on the first local device (best of
    ``repeats``)."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops_per_device(configured: float = -1.0) -> float:
    """Peak FLOP/s of one device: ``configured`` if > 0, else the datasheet value for a known
    accelerator, else (CPU) a measured matmul rate shared among the simulated local devices."""
    if configured and configured > 0:
        return float(configured)
    kind = jax.devices()[0].device_kind
    for name, value in KNOWN_PEAK_FLOPS.items():
        if kind.startswith(name):
            return value
    if jax.devices()[0].platform == "cpu":
        # Simulated CPU devices share the same cores: each gets a share of the machine's peak.
        return measure_matmul_peak() / max(jax.local_device_count(), 1)
    return 0.0
