"""The on-device INT4 weight layout shared by the ``int4_matmul`` and ``int4_gmm`` kernels, in pure ``jnp``.

A weight ``W [K, N]`` (``x @ W``: K input, N output), quantized symmetrically in groups of 32 along K, is two
plain arrays (leading axes such as experts or layers may precede ``K``):

- ``packed int32 [..., K/8, N]``: K-major. Word ``r`` of column ``n`` holds rows ``8r .. 8r+7`` of that column,
  row ``8r + j`` in bits ``4j .. 4j+3`` as a two's-complement nibble (``q`` in [-8, 7]). Bytes per value: 0.5.
- ``scales [..., K/32, 1, N]`` (bf16 in practice): ``W[k, n] = q[k, n] * scales[k // 32, 0, n]``.

Why this layout: it is the released packing (compressed-tensors, ``[N, K/8]`` with offset-binary nibbles)
transposed, with each nibble's top bit flipped, so the converter repacks with one transpose and one XOR. On TPU
``pltpu.bitcast(int32 [R, C] -> int4 [8R, C])`` places nibble ``j`` of word ``r`` at row ``8r + j``, exactly this
order, so a kernel gets the natural-order int4 tile without shuffles. The scales' unit dimension makes a scale
block ``(kb/32, 1, tn)`` legal on TPU (the last two block dims ``(1, tn)`` equal the full dim / divide by 128),
as the Mosaic tiling rules require; on GPU it is squeezed away for free. No dimension is padded: any ``K`` that
is a multiple of 32 works, and K-sharding in contiguous chunks of whole groups splits both arrays consistently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUP = 32  # values per scale (the release's group_size)
PACK = 8  # nibbles per int32 word
NIBBLE_BITS = 4


def logical_shape(packed_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``[..., K/8, N]`` -> ``[..., K, N]``."""
    return (*packed_shape[:-2], packed_shape[-2] * PACK, packed_shape[-1])


def check_operands(what: str, packed: jax.Array, scales: jax.Array, k: int | None = None) -> tuple[int, int]:
    """Validate a packed weight (and the activation width ``k`` if given); returns ``(K, N)``."""
    if packed.dtype != jnp.int32:
        raise TypeError(f"{what}: packed INT4 weights must be int32, got {packed.dtype}")
    if packed.ndim < 2:
        raise ValueError(f"{what}: packed INT4 weights must be [..., K/8, N], got shape {packed.shape}")
    kk, n = packed.shape[-2] * PACK, packed.shape[-1]
    expected = (*packed.shape[:-2], kk // GROUP, 1, n)
    if kk % GROUP or tuple(scales.shape) != expected:
        raise ValueError(
            f"{what}: packed {tuple(packed.shape)} (K={kk}, N={n}) needs K a multiple of {GROUP} and scales of "
            f"shape {expected}, got scales {tuple(scales.shape)}"
        )
    if not jnp.issubdtype(scales.dtype, jnp.floating):
        raise TypeError(f"{what}: scales must be floating point, got {scales.dtype}")
    if k is not None and k != kk:
        raise ValueError(f"{what}: activations have width {k} but the INT4 weight has K={kk}")
    return kk, n


def _nibbles(packed: jax.Array) -> jax.Array:
    """``int32 [..., K/8, N]`` -> ``int32 [..., K/8, 8, N]``: nibble ``j`` of word ``r`` at ``[r, j]``, in [-8, 7]."""
    shifts = jnp.arange(PACK, dtype=jnp.int32) * NIBBLE_BITS
    # Move nibble j to the top of the word, then an arithmetic right shift sign-extends it.
    up = jnp.left_shift(packed[..., :, None, :], (28 - shifts)[:, None])
    return jnp.right_shift(up, 28)  # arithmetic on int32


def unpack_device(packed: jax.Array) -> jax.Array:
    """``int32 [..., K/8, N]`` -> ``int8 [..., K, N]`` values in [-8, 7]."""
    return _nibbles(packed).reshape(logical_shape(packed.shape)).astype(jnp.int8)


def pack_device(values: jax.Array) -> jax.Array:
    """``int [..., K, N]`` values in [-8, 7] -> ``int32 [..., K/8, N]`` (the inverse of :func:`unpack_device`)."""
    *lead, k, n = values.shape
    if k % PACK:
        raise ValueError(f"pack: K={k} is not a multiple of {PACK}")
    nib = (values.astype(jnp.int32) & 0xF).reshape(*lead, k // PACK, PACK, n)
    shifts = (jnp.arange(PACK, dtype=jnp.int32) * NIBBLE_BITS)[:, None]
    words = jnp.left_shift(nib, shifts)
    out = words[..., 0, :]
    for j in range(1, PACK):
        out = out | words[..., j, :]
    return out


def dequantize_device(packed: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The weight ``W [..., K, N]`` in ``dtype``, computed as ``q * scale`` in float32 (exact), then cast.

    The nibbles go from int32 straight to float32: through :func:`unpack_device`'s int8 the XLA:CPU loop took 2.5x
    as long (12.9 against 5.2 us for a 256 x 128 expert matrix and its 4-row matmul, in a scan over experts; a
    one-off A/B in one process, not a repo benchmark: ``benchmarks/moe_cpu_bench.py`` times whole layers)."""
    *lead, k8, n = packed.shape
    q = _nibbles(packed).astype(jnp.float32).reshape(*lead, k8 * PACK // GROUP, GROUP, n)
    return (q * scales.astype(jnp.float32)).reshape(*lead, k8 * PACK, n).astype(dtype)


def quantize_device(w: jax.Array, scale_dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """Symmetric group-32 quantization of ``w [..., K, N]`` along K -> ``(packed, scales)``.

    The release rule: ``scale = max|w_group| / 7.5`` rounded to ``scale_dtype``, ``q = clamp(round(w / scale))``.
    """
    *lead, k, n = w.shape
    if k % GROUP:
        raise ValueError(f"quantize: K={k} is not a multiple of the group size {GROUP}")
    wf = w.astype(jnp.float32).reshape(*lead, k // GROUP, GROUP, n)
    scales = (jnp.max(jnp.abs(wf), axis=-2, keepdims=True) / 7.5).astype(scale_dtype)
    sf = scales.astype(jnp.float32)
    # XLA rewrites a division by a broadcast into a multiplication by the reciprocal, which is off by an ulp now and
    # then and moves values lying on a rounding tie; the barrier keeps the true IEEE division (the numpy rule).
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(sf == 0, 1.0, sf), wf.shape))
    q = jnp.clip(jnp.round(wf / divisor), -8, 7).astype(jnp.int32)
    return pack_device(q.reshape(*lead, k, n)), scales


def interleave_columns(x: jax.Array) -> jax.Array:
    """``x [M, K]`` -> ``[8, M, K/8]`` with ``out[j, m, r] = x[m, 8r + j]``.

    The GPU kernels unpack nibble ``j`` of a block of words as one slab of rows ``8r + j``; this puts the
    matching activation columns side by side so each slab meets a contiguous block of activations.
    """
    m, k = x.shape
    return x.reshape(m, k // PACK, PACK).transpose(2, 0, 1)


def deinterleave_columns(y: jax.Array) -> jax.Array:
    """The inverse of :func:`interleave_columns`: ``[8, M, K/8]`` -> ``[M, K]``."""
    _, m, r = y.shape
    return y.transpose(1, 2, 0).reshape(m, r * PACK)
