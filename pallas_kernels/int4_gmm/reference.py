"""``int4_gmm`` semantics in pure ``jnp``: dequantize every expert, then ``jax.lax.ragged_dot`` (XLA's way)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import int4_layout as L
from pallas_kernels.int4_matmul.reference import precision


def int4_gmm(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype=None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """Grouped matmul: rows of ``x [M, K]`` sorted by expert, ``group_sizes [E]`` rows each (zeros allowed).

    Row block ``e`` is multiplied by expert ``e``'s ``W[e] [K, N]`` (``packed [E, K/8, N]``,
    ``scales [E, K/32, 1, N]``), or by ``W[e]^T`` with ``transpose_rhs`` (``x [M, N] -> [M, K]``). Rows past
    ``sum(group_sizes)`` are zero. float32 accumulation, result in ``out_dtype`` (default ``x.dtype``).
    """
    k, n = L.check_operands("int4_gmm", packed, scales)
    e = packed.shape[0] if packed.ndim == 3 else -1
    if packed.ndim != 3 or group_sizes.shape != (e,):
        raise ValueError(
            f"int4_gmm: expects packed [E, K/8, N] and group_sizes [E], got {packed.shape} and {group_sizes.shape}"
        )
    if x.ndim != 2 or x.shape[1] != (n if transpose_rhs else k):
        raise ValueError(f"int4_gmm: activations {x.shape} do not match the INT4 experts [E={e}, K={k}, N={n}]")
    w = L.dequantize_device(packed, scales, x.dtype)
    if transpose_rhs:
        w = jnp.swapaxes(w, 1, 2)
    out = jax.lax.ragged_dot(
        x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32, precision=precision(x.dtype)
    )
    return out.astype(out_dtype or x.dtype)
