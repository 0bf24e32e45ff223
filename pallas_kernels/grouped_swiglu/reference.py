"""The grouped SwiGLU as three grouped matmuls over the whole row buffer (the accelerators' way, and the reference).

A weight is a plain array ``[E, in, out]`` (``jax.lax.ragged_dot``) or any value type with a
``grouped_matmul(rows, group_sizes, *, impl) -> float32`` method (the INT4 type, whose method runs ``int4_gmm``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(rows: jax.Array, weight, group_sizes: jax.Array, *, dtype, impl: str) -> jax.Array:
    """``rows [M, in]`` (sorted by expert, ``group_sizes [E]``) x ``weight [E, in, out]`` -> ``[M, out]`` float32."""
    rows = rows.astype(dtype)
    method = getattr(weight, "grouped_matmul", None)
    if method is not None:
        return method(rows, group_sizes, impl=impl)
    return jax.lax.ragged_dot(rows, weight.astype(dtype), group_sizes, preferred_element_type=jnp.float32)


def grouped_swiglu(rows: jax.Array, group_sizes: jax.Array, gate, up, down, *, dtype, impl: str = "xla") -> jax.Array:
    """``down(silu(gate x) * up x)`` per row with the row's expert -> ``[M, D]`` float32 (rows past
    ``sum(group_sizes)`` are zero)."""
    hidden = jax.nn.silu(grouped_matmul(rows, gate, group_sizes, dtype=dtype, impl=impl))
    hidden = hidden * grouped_matmul(rows, up, group_sizes, dtype=dtype, impl=impl)
    return grouped_matmul(hidden, down, group_sizes, dtype=dtype, impl=impl)
