"""Test configuration: 8 simulated CPU devices, float64 available for references.

XLA_FLAGS must be set before jax is imported anywhere, so this module does it at import time
(pytest imports conftest.py before any test module).
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests must never reach the network (tfds would otherwise try GCS for dataset metadata).
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402

assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"
