"""Test configuration: 8 simulated CPU devices, float64 available for references.

XLA_FLAGS must be set before jax is imported anywhere, so this module does it at import time
(pytest imports conftest.py before any test module).

Compilation dominates the suite's time (a tiny model's train step takes seconds to compile on a
2-core machine, its steps milliseconds), so XLA compiles cheaply (-O0 and the flags below) and
the suite shares one persistent XLA compilation cache for the session: the pytest-xdist workers
and the training subprocesses some tests start inherit it through the environment, so an
identical program (the same init of the tiny model, the same train step re-run after a resume or
a SIGKILL) is compiled once. The cache is keyed on the program, the compile options and the
jax/XLA version, so a hit is the very executable a fresh compile would give. It is a fresh
directory per session (removed at exit), so a timing of the suite never depends on an earlier
run; set CONTRASTIVE_JAX_TEST_XLA_CACHE to a directory to keep one across sessions, or to
``off`` to compile everything afresh.
"""
import atexit
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    # LLVM -O0 for the CPU code: a tiny model's init and train step compile about 3x faster and
    # run a little slower, a clear win at test sizes. Only XLA's code generation changes (no
    # fast-math either way); every comparison in the suite runs both sides under these flags
    # (subprocesses inherit them: tests/train/test_resilience.py: _env).
    _flags += " --xla_backend_optimization_level=0"
if "--xla_cpu_use_fusion_emitters" not in _flags:
    # XLA's older elemental emitters for CPU fusions, and LLVM without its expensive passes:
    # a tiny train step compiles in ~0.6x the time (siglip2:tiny on 8 devices, 2-core VM:
    # 14.6 -> 9.3 s; the suite ~25% faster). Same IEEE arithmetic (no fast-math either way); as
    # with -O0, both sides of every comparison compile under these flags.
    _flags += " --xla_cpu_use_fusion_emitters=false --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests must never reach the network (tfds would otherwise try GCS for dataset metadata).
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")

# The session's compilation cache: created by the first process that imports this file (the
# xdist controller, or the only process without xdist) and inherited by the workers it spawns.
if not os.environ.get("CONTRASTIVE_JAX_TEST_XLA_CACHE"):
    _cache_dir = tempfile.mkdtemp(prefix="contrastive_jax_test_xla_cache_")
    os.environ["CONTRASTIVE_JAX_TEST_XLA_CACHE"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
if os.environ["CONTRASTIVE_JAX_TEST_XLA_CACHE"] != "off":
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["CONTRASTIVE_JAX_TEST_XLA_CACHE"]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"
# A scratch directory shared by the session's processes, for runs that several tests only read
# (see tests/train/test_resilience.py: shared_run).
if not os.environ.get("CONTRASTIVE_JAX_TEST_SHARED"):
    _shared_dir = tempfile.mkdtemp(prefix="contrastive_jax_test_shared_")
    os.environ["CONTRASTIVE_JAX_TEST_SHARED"] = _shared_dir
    atexit.register(shutil.rmtree, _shared_dir, ignore_errors=True)

import jax  # noqa: E402

assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def moto_s3():
    """An S3-compatible endpoint: moto's server on 127.0.0.1 (real HTTP; nothing leaves the
    machine), with dummy credentials and ``AWS_ENDPOINT_URL_S3`` in the environment for the
    module (trainer subprocesses inherit them). Yields a ``pytest.MonkeyPatch`` for further
    environment changes of the module's own; stopped after the module."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is needed for the s3:// tests")
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        fsspec.filesystem("s3").clear_instance_cache()  # none made for another endpoint
        yield mp
        fsspec.filesystem("s3").clear_instance_cache()
    server.stop()


# The longest files first. pytest-xdist hands tests out in collection order, and these
# end-to-end files (trainers killed and resumed, two-process runs, the notebook: 40-140 s per
# test, most of them in tests/train/, collected last) would otherwise start near the end and
# leave one worker running alone while the other idles.
_LONG_FIRST = ("train/test_stateful_resume.py", "examples/test_notebook.py", "train/test_resilience.py",
               "train/test_preemption.py", "train/test_object_storage.py", "models/test_coca.py",
               "train/test_checkpoint_faults.py", "models/test_coca_distill.py", "data/test_streaming.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return next((i for i, name in enumerate(_LONG_FIRST) if path.endswith(name)), len(_LONG_FIRST))

    items.sort(key=rank)  # stable: the order within a file and among the rest is unchanged
