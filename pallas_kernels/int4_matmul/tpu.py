"""``int4_matmul`` on TPU: Pallas / Mosaic (runs under ``interpret=True`` on CPU).

Grid ``(M/tm, N/tn, K/tk)`` (transposed: ``(M/tm, K/tk, N/tn)``), contraction innermost with a float32 VMEM
accumulator. Each step DMAs a ``(tk/8, tn)`` int32 block of packed weights and a ``(tk/32, 1, tn)`` block of
scales, bitcasts the words to an int4 ``(tk, tn)`` tile (``pltpu.bitcast`` puts nibble ``j`` of word ``r`` at
row ``8r + j``: the natural row order of :mod:`pallas_kernels.int4_layout`), and dequantizes the tile in VMEM
before one MXU dot (the group of 32 is narrower than the MXU, so scaling the accumulator per group would cost a
dot per group). Block rules (Mosaic): the last two dims of every block divide (8, 128) or equal the array's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import int4_layout as L

LANE, SUBLANE = 128, 8


def dot_precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dequantized_tile(w_ref, s_ref, cdt) -> jax.Array:
    """``(tk/8, tn)`` int32 words and ``(tk/32, 1, tn)`` scales -> the ``(tk, tn)`` weight tile in ``cdt``."""
    words = w_ref[...]
    q = pltpu.bitcast(words, jnp.int4).astype(jnp.int32).astype(jnp.float32)  # [tk, tn]
    tk, tn = q.shape
    w = q.reshape(tk // L.GROUP, L.GROUP, tn) * s_ref[...].astype(jnp.float32)
    return w.reshape(tk, tn).astype(cdt)


def interpret_guard(packed: jax.Array, interpret) -> jax.Array:
    """In interpret mode, hide constant weights from XLA:CPU's constant folding.

    XLA:CPU folds ``bitcast_convert_type(int32 -> int4)`` of a constant wrongly (seen with jax 0.10.2), and
    interpret mode emulates ``pltpu.bitcast`` with exactly that op, so a model whose weights are closed over
    by ``jax.jit`` would compute garbage. An optimization barrier keeps the weights non-constant.
    """
    return jax.lax.optimization_barrier(packed) if interpret else packed


def lane_block(dim: int, cap: int) -> int:
    """A block for a lane (last) dimension: a multiple of 128 dividing ``dim`` and <= ``cap``, else all of it."""
    b = (min(cap, dim) // LANE) * LANE
    while b >= LANE:
        if dim % b == 0:
            return b
        b -= LANE
    return dim


def k_block(k: int, cap: int) -> int:
    """A block of weight rows: a multiple of 512 (64 words: int32 and int4 tiles both align) dividing ``k``."""
    unit = 4 * LANE
    b = (min(cap, k) // unit) * unit
    while b >= unit:
        if k % b == 0:
            return b
        b -= unit
    return k


def row_block(m: int, cap: int, dtype) -> int:
    """Rows per block: ``m`` rounded up to the dtype's sublane tile (8 rows of 32-bit, 16 of bf16), capped."""
    tile = SUBLANE * max(1, 4 // jnp.dtype(dtype).itemsize)
    return max(tile, (min(cap, pl.cdiv(m, tile) * tile) // tile) * tile)


def _forward_kernel(x_ref, w_ref, s_ref, o_ref, acc_ref, *, cdt):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w = dequantized_tile(w_ref, s_ref, cdt)
    acc_ref[...] += jnp.dot(x_ref[...].astype(cdt), w, preferred_element_type=jnp.float32, precision=dot_precision(cdt))

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _transposed_kernel(g_ref, w_ref, s_ref, o_ref, acc_ref, *, cdt):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w = dequantized_tile(w_ref, s_ref, cdt)  # [tk, tn]
    acc_ref[...] += jax.lax.dot_general(
        g_ref[...].astype(cdt),
        w,
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
        precision=dot_precision(cdt),
    )

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def int4_matmul(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    *,
    out_dtype=None,
    transpose_rhs: bool = False,
    block_m: int = 256,
    block_n: int = 512,
    block_k: int = 2048,
    interpret: bool = False,
) -> jax.Array:
    """``x [M, K] @ W [K, N]`` (or, with ``transpose_rhs``, ``x [M, N] @ W^T``) on TPU.

    ``M`` is padded to the row block (activations are small next to weights); ``K`` and ``N`` blocks divide
    the dimension (``block_k`` in weight rows, a multiple of 512, or all of K).
    """
    k, n = L.check_operands("int4_matmul (tpu)", packed, scales)
    m = x.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    cdt = x.dtype
    tm = row_block(m, block_m, x.dtype)
    mp = pl.cdiv(m, tm) * tm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    tk, tn = k_block(k, block_k), lane_block(n, block_n)
    w_spec = lambda kk, nn: (kk, nn)  # noqa: E731
    if not transpose_rhs:
        grid = (mp // tm, n // tn, k // tk)
        in_specs = [
            pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((tk // L.PACK, tn), lambda i, j, kk: w_spec(kk, j)),
            pl.BlockSpec((tk // L.GROUP, 1, tn), lambda i, j, kk: (kk, 0, j)),
        ]
        out_spec = pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j))
        out_shape, acc = (mp, n), (tm, tn)
        kernel = functools.partial(_forward_kernel, cdt=cdt)
    else:
        if x.shape[1] != n:
            raise ValueError(f"int4_matmul (tpu, transposed): cotangent width {x.shape[1]} != N={n}")
        grid = (mp // tm, k // tk, n // tn)
        in_specs = [
            pl.BlockSpec((tm, tn), lambda i, kk, j: (i, j)),
            pl.BlockSpec((tk // L.PACK, tn), lambda i, kk, j: w_spec(kk, j)),
            pl.BlockSpec((tk // L.GROUP, 1, tn), lambda i, kk, j: (kk, 0, j)),
        ]
        out_spec = pl.BlockSpec((tm, tk), lambda i, kk, j: (i, kk))
        out_shape, acc = (mp, k), (tm, tk)
        kernel = functools.partial(_transposed_kernel, cdt=cdt)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM(acc, jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="int4_matmul_t_tpu" if transpose_rhs else "int4_matmul_tpu",
    )(xp, interpret_guard(packed, interpret), scales)
    return out[:m] if mp != m else out
