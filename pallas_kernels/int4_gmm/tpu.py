"""``int4_gmm`` on TPU: Pallas / Mosaic grouped matmul over INT4 expert weights (``interpret=True`` on CPU).

Grid ``(N/tn, visits, K/tk)`` (transposed: ``(K/tk, visits, N/tn)``) with the visit schedule of
:mod:`pallas_kernels.int4_gmm.schedule` in scalar-prefetch memory: each visit's index maps pick its row tile
and its expert's weight blocks, so only experts that own rows are ever read. The visit axis is sized by the
traced visit count (a dynamic grid, as megablox does), so decode with 8 active experts runs 8 visits whatever
the number of experts. The weight tile is dequantized in VMEM exactly as in ``int4_matmul``; at the last
contraction step the visit writes only its own rows of the output tile, which stays resident across the
tile's consecutive visits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import int4_layout as L
from pallas_kernels.int4_gmm.schedule import visit_schedule, zero_uncovered_rows
from pallas_kernels.int4_matmul.tpu import (
    dequantized_tile,
    dot_precision,
    interpret_guard,
    k_block,
    lane_block,
    row_block,
)


def _kernel(gids, tids, lo, hi, x_ref, w_ref, s_ref, o_ref, acc_ref, *, cdt, tm, transpose):
    v, step = pl.program_id(1), pl.program_id(2)

    @pl.when(step == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w = dequantized_tile(w_ref, s_ref, cdt)  # [tk, tn]
    lhs = x_ref[...].astype(cdt)
    dims = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))
    acc_ref[...] += jax.lax.dot_general(lhs, w, dims, preferred_element_type=jnp.float32, precision=dot_precision(cdt))

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        rows = tids[v] * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= lo[v]) & (rows < hi[v])
        o_ref[...] = jnp.where(mine, acc_ref[...], o_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def int4_gmm(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype=None,
    transpose_rhs: bool = False,
    block_m: int = 128,
    block_n: int = 512,
    block_k: int = 2048,
    interpret: bool = False,
) -> jax.Array:
    """Rows of ``x [M, K]`` grouped by ``group_sizes [E]`` times their expert's ``W[e] [K, N]`` -> ``[M, N]``.

    With ``transpose_rhs``: ``x [M, N]`` times ``W[e]^T`` -> ``[M, K]``. Rows past ``sum(group_sizes)`` are 0.
    """
    if packed.ndim != 3:
        raise ValueError(f"int4_gmm (tpu): packed expert weights must be [E, K/8, N], got {packed.shape}")
    k, n = L.check_operands("int4_gmm (tpu)", packed, scales)
    e = packed.shape[0]
    if group_sizes.shape != (e,):
        raise ValueError(f"int4_gmm (tpu): group_sizes must have shape ({e},), got {group_sizes.shape}")
    m = x.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    cdt = x.dtype
    tm = row_block(m, block_m, x.dtype)
    mp = pl.cdiv(m, tm) * tm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    tk, tn = k_block(k, block_k), lane_block(n, block_n)
    sched = visit_schedule(group_sizes, m, tm)

    def w_map(g, kk, nn):
        return (g, kk, nn)

    if not transpose_rhs:
        if x.shape[1] != k:
            raise ValueError(f"int4_gmm (tpu): activations have width {x.shape[1]}, weights K={k}")
        grid = (n // tn, sched.num_visits, k // tk)
        in_specs = [
            pl.BlockSpec((tm, tk), lambda j, v, kk, gi, ti, lo, hi: (ti[v], kk)),
            pl.BlockSpec((None, tk // L.PACK, tn), lambda j, v, kk, gi, ti, lo, hi: w_map(gi[v], kk, j)),
            pl.BlockSpec((None, tk // L.GROUP, 1, tn), lambda j, v, kk, gi, ti, lo, hi: (gi[v], kk, 0, j)),
        ]
        out_spec = pl.BlockSpec((tm, tn), lambda j, v, kk, gi, ti, lo, hi: (ti[v], j))
        out_cols, acc = n, (tm, tn)
    else:
        if x.shape[1] != n:
            raise ValueError(f"int4_gmm (tpu, transposed): cotangent width {x.shape[1]} != N={n}")
        grid = (k // tk, sched.num_visits, n // tn)
        in_specs = [
            pl.BlockSpec((tm, tn), lambda kk, v, j, gi, ti, lo, hi: (ti[v], j)),
            pl.BlockSpec((None, tk // L.PACK, tn), lambda kk, v, j, gi, ti, lo, hi: w_map(gi[v], kk, j)),
            pl.BlockSpec((None, tk // L.GROUP, 1, tn), lambda kk, v, j, gi, ti, lo, hi: (gi[v], kk, 0, j)),
        ]
        out_spec = pl.BlockSpec((tm, tk), lambda kk, v, j, gi, ti, lo, hi: (ti[v], kk))
        out_cols, acc = k, (tm, tk)
    out = pl.pallas_call(
        functools.partial(_kernel, cdt=cdt, tm=tm, transpose=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((mp, out_cols), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM(acc, jnp.float32)],
        ),
        # The visit axis revisits output tiles, so it (and the contraction) must run in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="int4_gmm_t_tpu" if transpose_rhs else "int4_gmm_tpu",
    )(sched.group_ids, sched.tile_ids, sched.lo, sched.hi, xp, interpret_guard(packed, interpret), scales)
    return zero_uncovered_rows(out[:m], sched.total_rows)
