"""Native kernel runs (compiled Triton on GPU, Mosaic on TPU) against the references: skipped on CPU.

On a GPU machine: ``JAX_PLATFORMS=cuda python -m pytest tests/kernels/test_int4_native.py -m gpu``
(``scripts/gpu_check.sh`` runs the same cases without pytest when pytest is absent).
"""

import jax
import pytest

from pallas_kernels import selfcheck

CASES = selfcheck.cases()


def _run(case):
    err, tol = selfcheck.run(case, impl="pallas")
    assert err <= tol, f"{case.name}: max |diff| / max |ref| = {err:.2e} > {tol}"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_native_gpu(case):
    _run(case)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_native_tpu(case):
    _run(case)


def test_selfcheck_logic_in_interpret_mode():
    """The self-check itself, run here through the interpreted kernels on its small cases."""
    small = [c for c in CASES if c.k == 96]
    assert len(small) >= 4
    for case in small[:2] + [c for c in small if c.op == "gmm"][:1]:
        for impl in ("pallas:gpu", "pallas:tpu"):
            err, tol = selfcheck.run(case, impl=impl)
            assert err <= tol, (case.name, impl, err)
    err, tol = selfcheck.run(selfcheck.Case("matmul", 7, 96, 160, "float32"), impl="xla")
    assert err == 0.0
