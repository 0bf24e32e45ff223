"""``int4_matmul``: both Pallas kernels (interpret mode) against the pure-jnp reference, and the custom_vjp.

Tolerances: outputs in float32, max |diff| <= 1e-5 x max |ref| (the kernels and the reference form the same
dequantized weight and differ only in summation order); gradients in the activation dtype, 1e-5 (float32) or
8e-3 (bf16: one rounding of the result).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_layout as L
from pallas_kernels.int4_matmul import ops, reference

TOL = 1e-5
GRAD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3}
FLAVORS = ["pallas:gpu", "pallas:tpu"]


def _weight(k, n, seed=0):
    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    return L.quantize_device(jnp.asarray(w))


def _x(m, k, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(m, k)), dtype)


def _close(got, want, tol, what=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= tol * scale, f"{what}: max |diff| {err:.3e} > {tol} x max |ref| {scale:.3e}"


# (M, K, N): M over decode and prefill sizes; K, N over a non-power-of-two multiple of 32 and other widths.
SMALL = [(m, k, n) for m in (1, 7, 64, 300) for k, n in ((96, 160), (512, 256))]
# K2.5 expert sizes: gate/up are 7168 -> 2048, down is 2048 -> 7168.
K25 = [(1, 7168, 2048), (7, 2048, 7168), (64, 2048, 7168), (300, 7168, 2048)]


@pytest.mark.parametrize("impl", FLAVORS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m,k,n", SMALL)
def test_kernel_matches_reference(impl, dtype, m, k, n):
    packed, scales = _weight(k, n)
    x = _x(m, k, dtype)
    want = reference.int4_matmul(x, packed, scales, out_dtype=jnp.float32)
    got = ops.int4_matmul(x, packed, scales, impl=impl, out_dtype=jnp.float32)
    assert got.shape == (m, n)
    _close(got, want, TOL, f"{impl} {m}x{k}x{n}")


@pytest.mark.parametrize("impl", FLAVORS)
@pytest.mark.parametrize("m,k,n", K25)
def test_kernel_matches_reference_k25_sizes(impl, m, k, n):
    dtype = jnp.float32 if m == 7 else jnp.bfloat16
    packed, scales = _weight(k, n)
    x = _x(m, k, dtype)
    want = reference.int4_matmul(x, packed, scales, out_dtype=jnp.float32)
    _close(ops.int4_matmul(x, packed, scales, impl=impl, out_dtype=jnp.float32), want, TOL, f"{impl} {m}x{k}x{n}")


@pytest.mark.parametrize(
    "impl,blocks",
    [
        ("pallas:gpu", dict(block_m=16, block_n=32, block_k=128, split_k=3)),
        ("pallas:tpu", dict(block_m=8, block_n=128, block_k=512)),
    ],
)
def test_non_default_blocks(impl, blocks):
    """Several row, column and contraction blocks (and a GPU split-K) accumulate to the same result."""
    packed, scales = _weight(2048, 384)
    x = _x(20, 2048, jnp.float32)
    want = reference.int4_matmul(x, packed, scales)
    _close(ops.int4_matmul(x, packed, scales, impl=impl, **blocks), want, TOL, str(blocks))


@pytest.mark.parametrize("impl", ["xla", "pallas", *FLAVORS])
def test_default_output_dtype_is_activation_dtype(impl):
    packed, scales = _weight(256, 128)
    x = _x(9, 256, jnp.bfloat16)
    got = ops.int4_matmul(x, packed, scales, impl=impl)
    want = reference.int4_matmul(x, packed, scales)
    assert got.dtype == jnp.bfloat16
    _close(got, want, 8e-3, impl)  # one bf16 rounding of each output


@pytest.mark.parametrize("impl", ["xla", *FLAVORS])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m,k,n", [(7, 96, 160), (64, 512, 256), (1, 2048, 7168)])
def test_gradient_matches_reference_grad(impl, dtype, m, k, n):
    packed, scales = _weight(k, n)
    x = _x(m, k, dtype)
    cot = jnp.asarray(np.random.default_rng(3).normal(size=(m, n)), jnp.float32)

    def loss(fn):
        return lambda x: jnp.sum(fn(x, packed, scales, out_dtype=jnp.float32) * cot)

    want = jax.grad(loss(reference.int4_matmul))(x)
    got = jax.jit(jax.grad(loss(lambda *a, **kw: ops.int4_matmul(*a, impl=impl, **kw))))(x)
    assert got.dtype == dtype
    _close(got, want, GRAD_TOL[dtype], f"grad {impl}")


def test_weights_are_constants_for_differentiation():
    packed, scales = _weight(64, 32)
    x = _x(3, 64, jnp.float32)
    g = jax.grad(lambda s: ops.int4_matmul(x, packed, s, impl="xla").sum())(scales)
    assert float(jnp.abs(g).max()) == 0.0


def test_closed_over_weights_under_jit():
    """Weights baked into a jitted function as constants (interpret mode must not constant-fold them wrongly)."""
    packed, scales = _weight(256, 128)
    x = _x(5, 256, jnp.float32)
    want = reference.int4_matmul(x, packed, scales)
    for impl in FLAVORS:
        _close(jax.jit(lambda x: ops.int4_matmul(x, packed, scales, impl=impl))(x), want, TOL, impl)


def test_bad_input_raises():
    packed, scales = _weight(64, 32)
    with pytest.raises(ValueError, match="not one of"):
        ops.int4_matmul(_x(2, 64, jnp.float32), packed, scales, impl="cuda")
    with pytest.raises(ValueError, match=r"activations \(2, 96\) do not match the INT4 weight \[K=64, N=32\]"):
        ops.int4_matmul(_x(2, 96, jnp.float32), packed, scales, impl="xla")
