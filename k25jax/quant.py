"""INT4 weights: the release packing (compressed-tensors ``pack-quantized``), quantize and dequantize.

Release packing (``shared/docs/k25-architecture.md`` section 4): a weight ``W [O, I]`` is stored as
``weight_packed int32 [O, I/8]`` and ``weight_scale [O, I/group]``. Value ``q`` in [-8, 7] is stored as the
nibble ``u = q + 8``; input column ``k`` lives in word ``k // 8`` at bits ``4 * (k % 8)`` (low nibble first).
``W[o, k] = (u - 8) * scale[o, k // group]``. Quantizing uses ``scale = max|w_group| / 7.5`` and
``q = clamp(round(w / scale), -8, 7)``.

These host-side (numpy) helpers serve the loader and converters.
"""

from __future__ import annotations

import numpy as np

NIBBLES_PER_WORD = 8
QMIN, QMAX = -8, 7


def unpack_int4(packed: np.ndarray, in_features: int) -> np.ndarray:
    """``int32 [..., I/8]`` release words -> ``int8 [..., I]`` values in [-8, 7]."""
    if packed.dtype != np.int32:
        raise ValueError(f"packed INT4 words must be int32, got {packed.dtype}")
    words = packed.view(np.uint32)
    shifts = 4 * np.arange(NIBBLES_PER_WORD, dtype=np.uint32)
    nibbles = (words[..., :, None] >> shifts) & np.uint32(0xF)
    values = nibbles.reshape(*packed.shape[:-1], packed.shape[-1] * NIBBLES_PER_WORD)[..., :in_features]
    return (values.astype(np.int8) - np.int8(8)).astype(np.int8)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """``int8 [..., I]`` values in [-8, 7] -> ``int32 [..., ceil(I/8)]`` release words."""
    if values.size and (values.min() < QMIN or values.max() > QMAX):
        raise ValueError(f"INT4 values must lie in [{QMIN}, {QMAX}], got [{values.min()}, {values.max()}]")
    in_features = values.shape[-1]
    pad = (-in_features) % NIBBLES_PER_WORD
    u = (values.astype(np.int32) + 8).astype(np.uint32)
    if pad:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], pad), np.uint32)], axis=-1)
    u = u.reshape(*u.shape[:-1], -1, NIBBLES_PER_WORD)
    shifts = 4 * np.arange(NIBBLES_PER_WORD, dtype=np.uint32)
    words = np.bitwise_or.reduce(u << shifts, axis=-1)
    return words.astype(np.uint32).view(np.int32)


def dequantize(values: np.ndarray, scale: np.ndarray, group_size: int, dtype=np.float32) -> np.ndarray:
    """``int8 values [..., I]`` and ``scale [..., I/group]`` -> ``W [..., I]`` (computed in float32)."""
    s = np.repeat(scale.astype(np.float32), group_size, axis=-1)[..., : values.shape[-1]]
    return (values.astype(np.float32) * s).astype(dtype)


def quantize(w: np.ndarray, group_size: int, scale_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric group quantization of ``w [..., I]`` -> ``(int8 values [..., I], scale [..., I/group])``.

    ``scale = max|w_group| / 7.5`` (rounded to ``scale_dtype``, default ``w.dtype``), ``q = clamp(round(w/scale))``.
    """
    if w.shape[-1] % group_size:
        raise ValueError(f"input width {w.shape[-1]} is not a multiple of the group size {group_size}")
    scale_dtype = scale_dtype or w.dtype
    wf = w.astype(np.float32).reshape(*w.shape[:-1], -1, group_size)
    scale = (np.abs(wf).max(-1) / 7.5).astype(scale_dtype)
    sf = scale.astype(np.float32)
    safe = np.where(sf == 0, 1.0, sf)
    q = np.clip(np.round(wf / safe[..., None]), QMIN, QMAX).astype(np.int8)
    return q.reshape(w.shape), scale
