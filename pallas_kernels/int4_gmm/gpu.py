"""``int4_gmm`` on GPU: Pallas with the Triton lowering, grouped matmul over INT4 expert weights.

Grid ``(visits, N/tn)`` (transposed: ``(visits, K/tk)``) over the static-length visit schedule of
:mod:`pallas_kernels.int4_gmm.schedule`; the Triton lowering has no scalar prefetch, so each program reads
its visit (expert, row tile, row range) from a small int32 table and indexes the expert's weights itself.
Padding visits (an empty row range) return at once. The inner loop is that of ``int4_matmul``'s GPU kernel:
8 nibble slabs per block of words, each dequantized in registers and fed to one MMA. A visit stores only the
rows it owns (masked stores), so visits sharing a row tile never write the same row and all run in parallel.
For decode (a handful of rows per active expert) the grid is ``active experts x N/tn`` programs, and the
experts nobody routed to are never read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import int4_layout as L
from pallas_kernels.int4_gmm.schedule import visit_schedule, zero_uncovered_rows
from pallas_kernels.int4_matmul.gpu import dot_precision, nibble, offset_words, pow2_block


def _words(w_ref, g, r0, rb, n0, tn, n_rows, n_cols):
    r = r0 + jnp.arange(rb)
    c = n0 + jnp.arange(tn)
    mask = (r < n_rows)[:, None] & (c < n_cols)[None, :]
    return plgpu.load(w_ref.at[g, pl.ds(r0, rb), pl.ds(n0, tn)], mask=mask, other=0)


def _scales(s_ref, g, r0, rb, n0, tn, n_groups, n_cols):
    groups = rb // 4
    g0 = r0 // 4
    gi = g0 + jnp.arange(groups)
    c = n0 + jnp.arange(tn)
    mask = (gi < n_groups)[:, None] & (c < n_cols)[None, :]
    s = plgpu.load(s_ref.at[g, pl.ds(g0, groups), pl.ds(n0, tn)], mask=mask, other=0.0).astype(jnp.float32)
    return jnp.broadcast_to(s[:, None, :], (groups, L.GROUP // L.PACK, tn)).reshape(rb, tn)


def _forward_kernel(meta_ref, x_ref, w_ref, s_ref, o_ref, *, m, k, n, tm, tn, rb, cdt):
    v, jn = pl.program_id(0), pl.program_id(1)
    g, tile, lo, hi = meta_ref[0, v], meta_ref[1, v], meta_ref[2, v], meta_ref[3, v]
    m0, n0 = tile * tm, jn * tn
    rows = m0 + jnp.arange(tm)
    k8 = k // L.PACK
    prec = dot_precision(cdt)

    @pl.when(lo < hi)
    def _():
        def step(kb, acc):
            r0 = kb * rb
            words = offset_words(_words(w_ref, g, r0, rb, n0, tn, k8, n))
            scale = _scales(s_ref, g, r0, rb, n0, tn, k // L.GROUP, n)
            xmask = (rows < m)[:, None] & ((r0 + jnp.arange(rb)) < k8)[None, :]
            for j in range(L.PACK):
                xj = plgpu.load(x_ref.at[jnp.int32(j), pl.ds(m0, tm), pl.ds(r0, rb)], mask=xmask, other=0.0)
                wj = (nibble(words, j) * scale).astype(cdt)
                acc += jnp.dot(xj.astype(cdt), wj, preferred_element_type=jnp.float32, precision=prec)
            return acc

        acc = jax.lax.fori_loop(0, pl.cdiv(k8, rb), step, jnp.zeros((tm, tn), jnp.float32))
        mine = (rows >= lo) & (rows < hi)
        omask = mine[:, None] & ((n0 + jnp.arange(tn)) < n)[None, :]
        plgpu.store(o_ref.at[pl.ds(m0, tm), pl.ds(n0, tn)], acc.astype(o_ref.dtype), mask=omask)


def _transposed_kernel(meta_ref, g_ref, w_ref, s_ref, o_ref, *, m, k, n, tm, tn, rb, cdt):
    v, jr = pl.program_id(0), pl.program_id(1)
    g, tile, lo, hi = meta_ref[0, v], meta_ref[1, v], meta_ref[2, v], meta_ref[3, v]
    m0, r0 = tile * tm, jr * rb
    rows = m0 + jnp.arange(tm)
    k8 = k // L.PACK
    prec = dot_precision(cdt)

    @pl.when(lo < hi)
    def _():
        def step(nb, accs):
            n0 = nb * tn
            words = offset_words(_words(w_ref, g, r0, rb, n0, tn, k8, n))
            scale = _scales(s_ref, g, r0, rb, n0, tn, k // L.GROUP, n)
            gmask = (rows < m)[:, None] & ((n0 + jnp.arange(tn)) < n)[None, :]
            dy = plgpu.load(g_ref.at[pl.ds(m0, tm), pl.ds(n0, tn)], mask=gmask, other=0.0).astype(cdt)
            out = []
            for j in range(L.PACK):
                wj = (nibble(words, j) * scale).astype(cdt)
                out.append(accs[j] + jnp.dot(dy, wj.T, preferred_element_type=jnp.float32, precision=prec))
            return tuple(out)

        zeros = tuple(jnp.zeros((tm, rb), jnp.float32) for _ in range(L.PACK))
        accs = jax.lax.fori_loop(0, pl.cdiv(n, tn), step, zeros)
        mine = (rows >= lo) & (rows < hi)
        omask = mine[:, None] & ((r0 + jnp.arange(rb)) < k8)[None, :]
        for j in range(L.PACK):
            plgpu.store(o_ref.at[jnp.int32(j), pl.ds(m0, tm), pl.ds(r0, rb)], accs[j].astype(o_ref.dtype), mask=omask)


def int4_gmm(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype=None,
    transpose_rhs: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int = 256,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """Rows of ``x [M, K]`` grouped by ``group_sizes [E]`` times their expert's ``W[e] [K, N]`` -> ``[M, N]``.

    With ``transpose_rhs``: ``x [M, N]`` times ``W[e]^T`` -> ``[M, K]``. Rows past ``sum(group_sizes)`` are 0.
    Defaults (untuned on hardware): 16-row tiles while experts average under 64 rows (decode), else 64.
    """
    if packed.ndim != 3:
        raise ValueError(f"int4_gmm (gpu): packed expert weights must be [E, K/8, N], got {packed.shape}")
    k, n = L.check_operands("int4_gmm (gpu)", packed, scales)
    e = packed.shape[0]
    if group_sizes.shape != (e,):
        raise ValueError(f"int4_gmm (gpu): group_sizes must have shape ({e},), got {group_sizes.shape}")
    m = x.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    cdt = x.dtype
    prefill = m >= 64 * e
    tm = pow2_block(m, block_m or (64 if prefill else 16))
    rb = pow2_block(k // L.PACK, block_k // L.PACK)
    tn = pow2_block(n, block_n or (128 if prefill else 64))
    sched = visit_schedule(group_sizes, m, tm)
    meta = jnp.stack([sched.group_ids, sched.tile_ids, sched.lo, sched.hi])
    s3 = scales.reshape(e, k // L.GROUP, n)
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    visits = meta.shape[1]
    if not transpose_rhs:
        if x.shape[1] != k:
            raise ValueError(f"int4_gmm (gpu): activations have width {x.shape[1]}, weights K={k}")
        kernel = functools.partial(_forward_kernel, m=m, k=k, n=n, tm=tm, tn=tn, rb=rb, cdt=cdt)
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
            grid=(visits, pl.cdiv(n, tn)),
            compiler_params=params,
            interpret=interpret,
            name="int4_gmm_gpu",
        )(meta, L.interleave_columns(x), packed, s3)
    else:
        if x.shape[1] != n:
            raise ValueError(f"int4_gmm (gpu, transposed): cotangent width {x.shape[1]} != N={n}")
        kernel = functools.partial(_transposed_kernel, m=m, k=k, n=n, tm=tm, tn=tn, rb=rb, cdt=cdt)
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((L.PACK, m, k // L.PACK), out_dtype),
            grid=(visits, pl.cdiv(k // L.PACK, rb)),
            compiler_params=params,
            interpret=interpret,
            name="int4_gmm_t_gpu",
        )(meta, x, packed, s3)
        out = L.deinterleave_columns(out)
    return zero_uncovered_rows(out, sched.total_rows)
