"""Test setup: 8 fake CPU devices, float32 matmuls at full precision, seeded RNGs, and one persistent XLA
compilation cache for the session.

The cache: every test module ends by dropping JAX's in-memory caches (below), and CLI, server and notebook tests
start fresh processes, so without it the same programs (the model's initialisers alone are 125) compile again in
every module and process. The directory is made per session (``JAX_COMPILATION_CACHE_DIR`` wins if set), handed
to subprocesses through the environment, and removed at the end; entries are keyed by the program and the
compiler options, so a hit is the program a compile would have produced.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="k25jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size bound turns on the cache's file lock: processes writing and reading it at once (multi-host tests, servers)
# never see a half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))
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
