"""Test setup: 8 fake CPU devices, float32 matmuls at full precision, seeded RNGs."""

import atexit
import os
import shutil
import sys
import tempfile

# XLA's LLVM backend at optimization level 0: the tests' programs are tiny and each is compiled once, so compile
# time is most of their time (the engine tests take 27% less wall time this way); HLO passes (fusion, layout,
# sharding) run as ever. K25JAX_TEST_XLA_OPT=1 keeps XLA's default backend optimization.
_opt = "" if os.environ.get("K25JAX_TEST_XLA_OPT") == "1" else " --xla_backend_optimization_level=0"
if "PYTEST_XDIST_WORKER" not in os.environ:  # an xdist worker inherits the controller's flags and cache (below)
    _flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + _opt
    os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent XLA compilation cache for this pytest session (a fresh temporary folder, removed at exit): many tests
# build the same tiny models and compile the same programs, and jax.clear_caches() between modules (below) would
# otherwise recompile them. Set in the environment so the CLI subprocesses share it; the notebooks' kernels do not
# (tests/test_notebooks.py), so their time limits are a cold user's. K25JAX_TEST_COMPILE_CACHE=0 turns it off;
# K25JAX_TEST_COMPILE_CACHE=<dir> keeps the cache in <dir> across runs.
_cache = os.environ.get("K25JAX_TEST_COMPILE_CACHE", "")
if "PYTEST_XDIST_WORKER" in os.environ:
    pass  # the controller's cache (set in the environment it started this worker with), shared by the workers
elif _cache != "0":
    if not _cache:
        _cache = tempfile.mkdtemp(prefix="k25jax-test-xla-cache-")
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
sys.path.insert(0, os.path.dirname(__file__))  # the helper modules beside the tests (oracle.py, ...)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass
    yield


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module: one pytest process compiles thousands of programs
    (every engine test adds its own steps), and kept to the end they exhausted memory in full-suite runs
    (XLA aborted mid-compile at ~47%)."""
    yield
    from k25jax.serve import steps

    steps.compiled.cache_clear()
    jax.clear_caches()
    import gc

    gc.collect()
