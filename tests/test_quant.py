"""INT4 weights (``k25jax.quant``): the release packing, quantize/dequantize, the Int4Array / Int4Weight types.

The device layout against the release helpers bit for bit is ``tests/kernels/test_int4_layout.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax import quant
from k25jax.quant import Int4Array, Int4Packed, Int4Scales, Int4Weight


def _close(a, b, tol):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


def _weight(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_release_packing_bit_layout():
    # Column k is nibble k % 8 (low nibble first) of word k // 8, stored offset-binary as q + 8.
    values = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [-8, -7, -6, -5, -4, -3, -2, -1]], np.int8)
    words = quant.pack_release(values)
    assert words.dtype == np.int32 and words.shape == (2, 1)
    assert words.view(np.uint32)[:, 0].tolist() == [0xFEDCBA98, 0x76543210]
    np.testing.assert_array_equal(quant.unpack_release(words, 8), values)


def test_pack_unpack_roundtrip_pads_the_last_word():
    q = np.random.default_rng(1).integers(-8, 8, size=(3, 5, 12)).astype(np.int8)
    words = quant.pack_release(q)
    assert words.shape == (3, 5, 2)
    assert (words.view(np.uint32)[..., 1] >> 16 == 0).all()  # the 4 padding nibbles are zero
    np.testing.assert_array_equal(quant.unpack_release(words, 12), q)
    with pytest.raises(ValueError, match=r"INT4 values must lie in \[-8, 7\], got \[-8, 8\]"):
        quant.pack_release(np.array([-8, 8], np.int8))
    with pytest.raises(ValueError, match="packed INT4 words must be int32, got int64"):
        quant.unpack_release(words.astype(np.int64), 12)


def test_quantize_dequantize_error_is_half_a_step():
    w = np.random.default_rng(2).normal(size=(16, 96)).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero group quantizes to zeros, scale 0
    q, scale = quant.quantize_release(w, 32)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (16, 3) and scale.dtype == np.float32
    assert q.min() >= -8 and q.max() <= 7
    np.testing.assert_array_equal(scale, np.abs(w.reshape(16, 3, 32)).max(-1) / np.float32(7.5))
    assert scale[3, 0] == 0 and not q[3, :32].any()
    back = quant.dequantize_release(q, scale, 32)
    step = np.repeat(scale, 32, axis=-1)
    assert (np.abs(back - w) <= 0.5 * step * (1 + 1e-6)).all()  # round to nearest; +7.5 steps clamps to 7
    with pytest.raises(ValueError, match="input width 40 is not a multiple of the group size 32"):
        quant.quantize_release(w[:, :40], 32)


def test_release_to_device_checks_and_flip_is_an_involution():
    words = quant.pack_release(np.random.default_rng(3).integers(-8, 8, size=(4, 64)).astype(np.int8))
    np.testing.assert_array_equal(quant.flip_nibbles(quant.flip_nibbles(words)), words)
    # offset-binary q + 8 -> two's-complement q & 0xF: nibble 8 (q = 0) becomes 0
    assert quant.flip_nibbles(quant.pack_release(np.zeros((1, 8), np.int8)))[0, 0] == 0
    with pytest.raises(ValueError, match=r"INT4 scales of shape \[4, 3\] do not fit packed words \[4, 8\]"):
        quant.release_to_device(words, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="packed INT4 words must be int32, got uint32"):
        quant.release_to_device(words.view(np.uint32), np.zeros((4, 2), np.float32))


def test_int4_array_release_roundtrip_is_bit_exact():
    q, scale = quant.quantize_release(np.asarray(_weight((48, 64), seed=4)), 32, scale_dtype=jnp.bfloat16)  # W^T [O, I]
    packed = quant.pack_release(q)
    value = Int4Array.from_release(packed, scale)
    assert value.shape == (64, 48) and value.packed.shape == (8, 48) and value.scales.shape == (2, 1, 48)
    np.testing.assert_array_equal(np.asarray(value.dequantize()), quant.dequantize_release(q, scale, 32).T)
    back_packed, back_scale = value.to_release()
    np.testing.assert_array_equal(back_packed, packed)
    np.testing.assert_array_equal(back_scale.view(np.uint16), scale.view(np.uint16))
    with pytest.raises(ValueError, match=r"to_release converts one \[K, N\] weight at a time"):
        Int4Array(value.packed[None], value.scales[None]).to_release()


def test_int4_array_shape_size_bytes_and_indexing():
    # The full-size K2.5 expert stack, abstractly: 0.5 bytes per value plus a bf16 scale per 32.
    packed = jax.ShapeDtypeStruct((60, 384, 896, 2048), jnp.int32)
    scales = jax.ShapeDtypeStruct((60, 384, 224, 1, 2048), jnp.bfloat16)
    value = Int4Array(packed, scales)
    assert value.shape == (60, 384, 7168, 2048) and value.ndim == 4 and value.size == 60 * 384 * 7168 * 2048
    assert value.nbytes / value.size == pytest.approx(0.5625)
    small = Int4Array.from_float(_weight((3, 2, 64, 16)))
    assert small[1].shape == (2, 64, 16) and small[:, 0].shape == (3, 64, 16) and small[2, 1].shape == (64, 16)
    np.testing.assert_array_equal(np.asarray(small[2, 1].dequantize()), np.asarray(small.dequantize())[2, 1])
    for bad in [(0, 1, 2), (Ellipsis,), (None,)]:
        with pytest.raises(IndexError, match="only its leading axes can be indexed"):
            small[bad]


def test_int4_array_slices_under_scan():
    # jax.lax.scan over a stacked layer axis slices every leaf of the INT4 value (one layer of 8 experts).
    value = Int4Array.from_float(_weight((1, 8, 32, 64), seed=5))

    seen = []

    def body(carry, layer):
        seen.append((layer.shape, layer.packed.shape, layer.scales.shape))
        return carry + layer.dequantize().sum(), layer.dequantize()[0, 0]

    total, firsts = jax.lax.scan(body, jnp.float32(0), value)
    assert seen == [((8, 32, 64), (8, 4, 64), (8, 1, 1, 64))]
    _close(total, value.dequantize().sum(), 1e-6)
    _close(firsts, value.dequantize()[:, 0, 0], 0.0)


def test_quantize_error_and_dequantize_dtype():
    w = _weight((2, 64, 24), seed=6)
    value = Int4Array.from_float(w)
    assert value.packed.dtype == jnp.int32 and value.scales.dtype == jnp.bfloat16
    assert value.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
    step = np.repeat(np.asarray(value.scales, np.float32)[..., 0, :], 32, axis=-2)
    # Half a step, plus what rounding the scale to bf16 (relative 2^-9) can push a group's largest value past +7.
    assert (np.abs(np.asarray(value.dequantize()) - np.asarray(w)) <= (0.5 + 7.5 * 2**-8) * step).all()


def test_int4_weight_parameters_axes_and_errors():
    weight = Int4Weight.from_float(_weight((2, 64, 16)), ("experts", "expert_embed", "expert_mlp"))
    assert weight.shape == (2, 64, 16)
    assert isinstance(weight.packed, Int4Packed) and isinstance(weight.scales, Int4Scales)
    assert weight.packed.get_metadata()["out_sharding"] == ("experts", "expert_embed", "expert_mlp")
    assert weight.scales.get_metadata()["out_sharding"] == ("experts", "expert_embed", None, "expert_mlp")
    assert weight.packed.logical_size == 2 * 64 * 16 and weight.scales.logical_size == 0
    value = weight[...]
    assert isinstance(value, Int4Array) and value.shape == (2, 64, 16)
    with pytest.raises(IndexError, match=r"use weight\[\.\.\.\]"):
        weight[0]
    with pytest.raises(ValueError, match="w: INT4 weights need shape .* with K a multiple of 32, got"):
        Int4Weight.from_float(_weight((2, 40, 16)), ("experts", "expert_embed", "expert_mlp"), what="w")
