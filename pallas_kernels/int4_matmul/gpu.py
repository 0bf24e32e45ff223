"""``int4_matmul`` on GPU: Pallas with the Triton lowering (runs under ``interpret=True`` on CPU).

One program computes a ``[block_m, block_n]`` output tile (or, transposed, a ``[block_m, block_k]`` tile of
``dy @ W^T``) and walks the contraction dimension in a loop. Per K-block of ``block_k`` rows it loads
``block_k/8`` int32 words per column, splits them into 8 nibble slabs (slab ``j`` = rows ``8r + j``; see
:mod:`pallas_kernels.int4_layout`), turns each nibble into a float by bit operations (:func:`nibble`),
scales in float32 and runs one MMA per slab against the matching interleaved activation block. Triton's dot
needs both operands in one dtype, so the weight is dequantized to the activation dtype in registers right
before the MMA. ``split_k`` splits the contraction across programs (partial sums in float32, summed by XLA)
so decode shapes, with a single row block, still occupy every SM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import int4_layout as L

MIN_DOT = 16  # Triton needs >= 16 along every dot dimension
TARGET_PROGRAMS = 264  # ~2 per SM on an H100/H200 (132 SMs)


def dot_precision(dtype):
    """float32 operands run as true float32 (IEEE) so that parity tests hold; bf16 is native."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def expanded_scales(s_ref, g0, groups: int, n0, tn: int, n_groups: int, n_cols: int):
    """Scales for a slab of ``4 * groups`` word rows: ``[4 * groups, tn]`` float32, row ``r`` -> group ``r // 4``.

    Rows beyond ``n_groups`` and columns beyond ``n_cols`` read as 0 (masked), so ragged edges contribute nothing.
    """
    g = g0 + jnp.arange(groups)
    n = n0 + jnp.arange(tn)
    mask = (g < n_groups)[:, None] & (n < n_cols)[None, :]
    s = plgpu.load(s_ref.at[pl.ds(g0, groups), pl.ds(n0, tn)], mask=mask, other=0.0).astype(jnp.float32)
    # Each group covers 32 rows = 4 words of one column: repeat every scale row 4 times.
    return jnp.broadcast_to(s[:, None, :], (groups, L.GROUP // L.PACK, tn)).reshape(groups * 4, tn)


OFFSET_WORDS = -0x77777778  # 0x88888888 as int32: XOR flips two's-complement nibbles to offset binary u = q + 8
MAGIC_BITS = 0x4B000000  # float32 2**23: OR-ing u < 2**23 into its mantissa gives exactly 2**23 + u
MAGIC_VALUE = float(2**23 + 8)


def offset_words(words: jax.Array) -> jax.Array:
    """Once per block of words: nibbles to offset binary, so each value needs no sign extension."""
    return words ^ jnp.int32(OFFSET_WORDS)


def nibble(offset: jax.Array, j: int) -> jax.Array:
    """Nibble ``j`` of :func:`offset_words` output as the float32 value ``q`` in [-8, 7], exactly.

    Built from bits (shift, mask, OR into the mantissa of 2**23, one subtract) rather than an int-to-float
    conversion: conversions run at a fraction of the ALU rate on NVIDIA GPUs, and decode must dequantize
    ~10^13 values/s to keep up with HBM.
    """
    u = jax.lax.shift_right_logical(offset, jnp.int32(L.NIBBLE_BITS * j)) & jnp.int32(0xF)
    return jax.lax.bitcast_convert_type(u | jnp.int32(MAGIC_BITS), jnp.float32) - jnp.float32(MAGIC_VALUE)


def load_words(w_ref, r0, rb: int, n0, tn: int, n_rows: int, n_cols: int):
    r = r0 + jnp.arange(rb)
    n = n0 + jnp.arange(tn)
    mask = (r < n_rows)[:, None] & (n < n_cols)[None, :]
    return plgpu.load(w_ref.at[pl.ds(r0, rb), pl.ds(n0, tn)], mask=mask, other=0)


def _forward_kernel(x_ref, w_ref, s_ref, o_ref, *, m, k, n, tm, tn, rb, steps_per_split, cdt):
    """``o[split, m-tile, n-tile] = sum_k x[m, k] W[k, n]`` over this program's share of K."""
    i, jn, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * tm, jn * tn
    rows = m0 + jnp.arange(tm)
    k8 = k // L.PACK
    prec = dot_precision(cdt)

    def step(kb, acc):
        r0 = (split * steps_per_split + kb) * rb
        words = offset_words(load_words(w_ref, r0, rb, n0, tn, k8, n))
        scale = expanded_scales(s_ref, r0 // 4, rb // 4, n0, tn, k // L.GROUP, n)
        cols = r0 + jnp.arange(rb)
        xmask = (rows < m)[:, None] & (cols < k8)[None, :]
        for j in range(L.PACK):
            xj = plgpu.load(x_ref.at[jnp.int32(j), pl.ds(m0, tm), pl.ds(r0, rb)], mask=xmask, other=0.0)
            wj = (nibble(words, j) * scale).astype(cdt)
            acc += jnp.dot(xj.astype(cdt), wj, preferred_element_type=jnp.float32, precision=prec)
        return acc

    acc = jax.lax.fori_loop(0, steps_per_split, step, jnp.zeros((tm, tn), jnp.float32))
    omask = (rows < m)[:, None] & ((n0 + jnp.arange(tn)) < n)[None, :]
    plgpu.store(o_ref.at[split, pl.ds(m0, tm), pl.ds(n0, tn)], acc.astype(o_ref.dtype), mask=omask)


def _transposed_kernel(g_ref, w_ref, s_ref, o_ref, *, m, k, n, tm, tn, rb, steps_per_split, cdt):
    """``o[split, j, m-tile, r-tile] = sum_n g[m, n] W[8r + j, n]``: ``dy @ W^T`` in interleaved column order."""
    i, jr, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, r0 = i * tm, jr * rb
    rows = m0 + jnp.arange(tm)
    k8 = k // L.PACK
    prec = dot_precision(cdt)

    def step(nb, accs):
        n0 = (split * steps_per_split + nb) * tn
        words = offset_words(load_words(w_ref, r0, rb, n0, tn, k8, n))
        scale = expanded_scales(s_ref, r0 // 4, rb // 4, n0, tn, k // L.GROUP, n)
        gmask = (rows < m)[:, None] & ((n0 + jnp.arange(tn)) < n)[None, :]
        g = plgpu.load(g_ref.at[pl.ds(m0, tm), pl.ds(n0, tn)], mask=gmask, other=0.0).astype(cdt)
        out = []
        for j in range(L.PACK):
            wj = (nibble(words, j) * scale).astype(cdt)
            out.append(accs[j] + jnp.dot(g, wj.T, preferred_element_type=jnp.float32, precision=prec))
        return tuple(out)

    zeros = tuple(jnp.zeros((tm, rb), jnp.float32) for _ in range(L.PACK))
    accs = jax.lax.fori_loop(0, steps_per_split, step, zeros)
    omask = (rows < m)[:, None] & ((r0 + jnp.arange(rb)) < k8)[None, :]
    for j in range(L.PACK):
        plgpu.store(
            o_ref.at[split, jnp.int32(j), pl.ds(m0, tm), pl.ds(r0, rb)], accs[j].astype(o_ref.dtype), mask=omask
        )


def pow2_block(dim: int, cap: int, floor: int = MIN_DOT) -> int:
    """The power-of-two block (Triton's rule) for a dimension of ``dim``: ``cap``, shrunk while it overhangs."""
    b = max(floor, cap)
    while b > floor and b // 2 >= dim:
        b //= 2
    return b


def int4_matmul(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    *,
    out_dtype=None,
    transpose_rhs: bool = False,
    block_m: int | None = None,
    block_n: int = 128,
    block_k: int = 256,
    split_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """``x [M, K] @ W [K, N]`` (or, with ``transpose_rhs``, ``x [M, N] @ W^T``) on GPU.

    ``block_k`` counts weight rows (a multiple of 128: 16 words per MMA); blocks are powers of two and edges
    are masked, so any ``M`` and any ``K``, ``N`` that are multiples of 32 / 16 work. Defaults (untuned on
    hardware; ``bench.py --sweep`` measures alternatives): 16 rows per block for decode, 64 for prefill, and
    for decode enough K-splits to give about :data:`TARGET_PROGRAMS` programs.
    """
    k, n = L.check_operands("int4_matmul (gpu)", packed, scales)
    m = x.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    cdt = x.dtype
    tm = pow2_block(m, block_m or (16 if m <= 32 else 64))
    rb = pow2_block(k // L.PACK, block_k // L.PACK)
    s2 = scales.reshape(k // L.GROUP, n)
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if not transpose_rhs:
        tn = pow2_block(n, block_n)
        steps = pl.cdiv(k // L.PACK, rb)
        if split_k is None:  # decode: one row block leaves most SMs idle unless K is split
            split_k = pl.cdiv(TARGET_PROGRAMS, pl.cdiv(m, tm) * pl.cdiv(n, tn)) if m <= 64 else 1
        split_k = max(1, min(split_k, steps))
        per_split = pl.cdiv(steps, split_k)
        split_k = pl.cdiv(steps, per_split)  # no split left without work
        kernel = functools.partial(
            _forward_kernel, m=m, k=k, n=n, tm=tm, tn=tn, rb=rb, steps_per_split=per_split, cdt=cdt
        )
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((split_k, m, n), jnp.float32 if split_k > 1 else out_dtype),
            grid=(pl.cdiv(m, tm), pl.cdiv(n, tn), split_k),
            compiler_params=params,
            interpret=interpret,
            name="int4_matmul_gpu",
        )(L.interleave_columns(x), packed, s2)
        return out[0] if split_k == 1 else out.sum(0).astype(out_dtype)
    if x.shape[1] != n:
        raise ValueError(f"int4_matmul (gpu, transposed): cotangent width {x.shape[1]} != N={n}")
    tn = pow2_block(n, block_n)
    steps = pl.cdiv(n, tn)
    if split_k is None:
        split_k = pl.cdiv(TARGET_PROGRAMS, pl.cdiv(m, tm) * pl.cdiv(k // L.PACK, rb)) if m <= 64 else 1
    split_k = max(1, min(split_k, steps))
    per_split = pl.cdiv(steps, split_k)
    split_k = pl.cdiv(steps, per_split)
    kernel = functools.partial(
        _transposed_kernel, m=m, k=k, n=n, tm=tm, tn=tn, rb=rb, steps_per_split=per_split, cdt=cdt
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split_k, L.PACK, m, k // L.PACK), jnp.float32 if split_k > 1 else out_dtype),
        grid=(pl.cdiv(m, tm), pl.cdiv(k // L.PACK, rb), split_k),
        compiler_params=params,
        interpret=interpret,
        name="int4_matmul_t_gpu",
    )(x, packed, s2)
    out = out[0] if split_k == 1 else out.sum(0).astype(out_dtype)
    return L.deinterleave_columns(out)
