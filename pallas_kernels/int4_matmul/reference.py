"""``int4_matmul`` semantics in pure ``jnp``: dequantize the whole weight, then one dot (XLA's way)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import int4_layout as L


def precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def int4_matmul(
    x: jax.Array, packed: jax.Array, scales: jax.Array, *, out_dtype=None, transpose_rhs: bool = False
) -> jax.Array:
    """``x [M, K] @ W [K, N] -> [M, N]`` (or ``x [M, N] @ W^T -> [M, K]`` with ``transpose_rhs``).

    ``W = q * scale`` (see :mod:`pallas_kernels.int4_layout`) is formed in float32 and cast to the activation
    dtype; the dot accumulates in float32 and the result is cast to ``out_dtype`` (default: ``x.dtype``).
    """
    k, n = L.check_operands("int4_matmul", packed, scales)
    if x.ndim != 2 or x.shape[1] != (n if transpose_rhs else k):
        raise ValueError(f"int4_matmul: activations {x.shape} do not match the INT4 weight [K={k}, N={n}]")
    w = L.dequantize_device(packed, scales, x.dtype)
    if transpose_rhs:
        w = w.T
    out = jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision(x.dtype))
    return out.astype(out_dtype or x.dtype)
