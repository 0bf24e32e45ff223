"""Native (compiled, not interpreted) checks of the INT4 kernels against their references, on a GPU or TPU.

Used by ``tests/kernels/test_int4_native.py`` (markers ``gpu`` / ``tpu``) and by ``scripts/gpu_check.py`` on
machines that may lack pytest. Needs only jax and numpy. Each case returns its max |diff| / max |ref| and
the tolerance it must meet: 1e-5 for float32 outputs (same dequantized weights, float32 accumulation; only
the summation order differs), 8e-3 for gradients in bf16 (one bf16 rounding).
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import int4_layout as L
from pallas_kernels.int4_gmm import ops as gmm_ops
from pallas_kernels.int4_gmm import reference as gmm_ref
from pallas_kernels.int4_matmul import ops as matmul_ops
from pallas_kernels.int4_matmul import reference as matmul_ref

TOL = {"float32": 1e-5, "bfloat16": 1e-5}
GRAD_TOL = {"float32": 1e-5, "bfloat16": 8e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "matmul" | "gmm"
    m: int
    k: int
    n: int
    dtype: str
    experts: int = 0
    grad: bool = False

    @property
    def name(self) -> str:
        e = f"-E{self.experts}" if self.op == "gmm" else ""
        return f"{self.op}{e}-M{self.m}-K{self.k}-N{self.n}-{self.dtype}{'-grad' if self.grad else ''}"


def cases() -> list[Case]:
    """Decode and prefill rows, K2.5 widths and a ragged width (96 x 160), both dtypes, grouped with empty
    experts, gradients. Kept to ~20 cases: each is a separate Triton compilation on the device."""
    out = []
    for m in (1, 7, 64, 300):
        out.append(Case("matmul", m, 96, 160, "float32"))
        out.append(Case("matmul", m, 7168, 2048, "bfloat16"))
        out.append(Case("matmul", m, 2048, 7168, "bfloat16"))
    out += [Case("matmul", 16, 7168, 2048, "float32"), Case("matmul", 300, 96, 160, "bfloat16")]
    out += [Case("gmm", 8, 7168, 2048, "bfloat16", 64), Case("gmm", 64, 2048, 7168, "bfloat16", 64)]
    out += [Case("gmm", 300, 96, 160, "float32", 64), Case("gmm", 300, 96, 160, "bfloat16", 8)]
    out += [Case("matmul", 16, 7168, 2048, "bfloat16", grad=True), Case("gmm", 64, 2048, 7168, "bfloat16", 64, True)]
    out += [Case("matmul", 7, 96, 160, "float32", grad=True), Case("gmm", 7, 96, 160, "float32", 8, True)]
    return out


def _group_sizes(m: int, e: int, seed: int) -> jax.Array:
    """Uneven sizes with about a quarter of the experts empty."""
    rng = np.random.default_rng(seed)
    live = np.sort(rng.choice(e, size=max(1, (3 * e) // 4), replace=False))
    cuts = np.sort(rng.integers(0, m + 1, size=len(live) - 1))
    sizes = np.zeros(e, np.int32)
    sizes[live] = np.diff(np.concatenate([[0], cuts, [m]]))
    return jnp.asarray(sizes)


def random_int4(key, lead: tuple[int, ...], k: int, n: int) -> tuple[jax.Array, jax.Array]:
    """Random INT4 weights made on device (random words = random nibbles; scales ~ 0.02 / 7.5)."""
    kw, ks = jax.random.split(key)
    packed = jax.random.bits(kw, (*lead, k // L.PACK, n), jnp.uint32).view(jnp.int32)
    scales = (jax.random.uniform(ks, (*lead, k // L.GROUP, 1, n), minval=0.5, maxval=1.5) * 0.02 / 7.5).astype(
        jnp.bfloat16
    )
    return packed, scales


def run(case: Case, impl: str = "pallas") -> tuple[float, float]:
    """``(max |diff| / max |ref|, tolerance)`` of ``impl`` against the reference for ``case``."""
    dtype = jnp.dtype(case.dtype)
    key = jax.random.key(zlib.crc32(case.name.encode()))  # stable across processes, unlike hash()
    kx, kw, kc = jax.random.split(key, 3)
    lead = (case.experts,) if case.op == "gmm" else ()
    packed, scales = random_int4(kw, lead, case.k, case.n)
    x = jax.random.normal(kx, (case.m, case.k), jnp.float32).astype(dtype)
    if case.op == "gmm":
        sizes = _group_sizes(case.m, case.experts, case.m + case.k)
        fn = lambda x, impl: gmm_ops.int4_gmm(x, packed, scales, sizes, impl=impl, out_dtype=jnp.float32)  # noqa: E731
        ref = lambda x: gmm_ref.int4_gmm(x, packed, scales, sizes, out_dtype=jnp.float32)  # noqa: E731
    else:
        fn = lambda x, impl: matmul_ops.int4_matmul(x, packed, scales, impl=impl, out_dtype=jnp.float32)  # noqa: E731
        ref = lambda x: matmul_ref.int4_matmul(x, packed, scales, out_dtype=jnp.float32)  # noqa: E731
    if case.grad:
        cot = jax.random.normal(kc, (case.m, case.n), jnp.float32)
        got = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, impl) * cot)))(x)
        want = jax.jit(jax.grad(lambda x: jnp.sum(ref(x) * cot)))(x)
        tol = GRAD_TOL[case.dtype]
    else:
        got, want = jax.jit(lambda x: fn(x, impl))(x), jax.jit(ref)(x)
        tol = TOL[case.dtype]
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return float("inf"), tol
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)), tol
