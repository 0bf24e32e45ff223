"""The on-device INT4 layout: jnp pack/unpack/quantize against the release's numpy helpers, bit for bit."""

import jax.numpy as jnp
import numpy as np
import pytest

from k25jax import quant
from pallas_kernels import int4_layout as L


def _release_weight(rng, out_dim, in_dim):
    """A release-format (packed, scale) pair made by the numpy release helpers."""
    w = rng.normal(size=(out_dim, in_dim)).astype(np.float32)
    q, scale = quant.quantize_release(w, 32, scale_dtype=jnp.bfloat16)
    return quant.pack_release(q), scale, q


@pytest.mark.parametrize("out_dim,in_dim", [(32, 96), (160, 256), (7, 32)])
def test_release_to_device_is_exact_both_ways(out_dim, in_dim):
    rng = np.random.default_rng(0)
    packed, scale, q = _release_weight(rng, out_dim, in_dim)
    dev_packed, dev_scales = quant.release_to_device(packed, scale)
    assert dev_packed.shape == (in_dim // 8, out_dim) and dev_scales.shape == (in_dim // 32, 1, out_dim)
    # the device words hold q^T, nibble j of word r = row 8r + j
    np.testing.assert_array_equal(np.asarray(L.unpack_device(jnp.asarray(dev_packed))), q.T)
    back_packed, back_scale = quant.device_to_release(dev_packed, dev_scales)
    np.testing.assert_array_equal(back_packed, packed)
    np.testing.assert_array_equal(back_scale.view(np.uint16), scale.view(np.uint16))
    # dequantization agrees with the release rule exactly (float32)
    want = quant.dequantize_release(quant.unpack_release(packed, in_dim), scale, 32).T
    got = np.asarray(L.dequantize_device(jnp.asarray(dev_packed), jnp.asarray(dev_scales)))
    np.testing.assert_array_equal(got, want)


def test_pack_unpack_roundtrip_with_leading_axes():
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, size=(3, 2, 64, 40)).astype(np.int8)
    packed = L.pack_device(jnp.asarray(q))
    assert packed.shape == (3, 2, 8, 40) and packed.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(L.unpack_device(packed)), q)


def test_quantize_matches_release_rule():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(128, 48)).astype(np.float32)  # [K, N]
    packed, scales = L.quantize_device(jnp.asarray(w))
    q_ref, s_ref = quant.quantize_release(w.T, 32, scale_dtype=jnp.bfloat16)  # release: [out, in]
    np.testing.assert_array_equal(np.asarray(L.unpack_device(packed)), q_ref.T)
    np.testing.assert_array_equal(np.asarray(scales)[:, 0, :].astype(np.float32), s_ref.T.astype(np.float32))


@pytest.mark.parametrize("jit", [False, True])
def test_quantize_matches_release_rule_on_ties(jit):
    """bf16 weights land exactly on a rounding tie (w / scale = n + 0.5) now and then; XLA's rewrite of a division
    by a broadcast into a reciprocal multiply used to move 9 of these 98,304 values."""
    import jax

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((2, 256, 192)) * 0.02, jnp.bfloat16)  # [E, K, N]
    packed, scales = (jax.jit(L.quantize_device) if jit else L.quantize_device)(w)
    q_ref, s_ref = quant.quantize_release(np.swapaxes(np.asarray(w), -1, -2), 32, scale_dtype=jnp.bfloat16)
    ties = np.abs(
        np.abs(np.asarray(w, np.float32) / np.repeat(np.swapaxes(s_ref, -1, -2), 32, 1).astype(np.float32)) % 1 - 0.5
    )
    assert (ties == 0).sum() > 100  # the case is exercised
    np.testing.assert_array_equal(np.asarray(L.unpack_device(packed)), np.swapaxes(q_ref, -1, -2))
    np.testing.assert_array_equal(np.asarray(scales)[..., 0, :], np.swapaxes(s_ref, -1, -2))


def test_interleave_roundtrip():
    x = jnp.arange(3 * 64, dtype=jnp.float32).reshape(3, 64)
    y = L.interleave_columns(x)
    assert y.shape == (8, 3, 8) and float(y[5, 1, 2]) == float(x[1, 8 * 2 + 5])
    np.testing.assert_array_equal(np.asarray(L.deinterleave_columns(y)), np.asarray(x))


def test_bad_operands_are_named():
    packed = jnp.zeros((12, 64), jnp.int32)
    with pytest.raises(ValueError, match=r"scales of shape \(3, 1, 64\)"):
        L.check_operands("probe", packed, jnp.zeros((3, 64), jnp.bfloat16))
    with pytest.raises(TypeError, match="must be int32"):
        L.check_operands("probe", packed.astype(jnp.int8), jnp.zeros((3, 1, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="width 95 but the INT4 weight has K=96"):
        L.check_operands("probe", packed, jnp.zeros((3, 1, 64), jnp.bfloat16), k=95)
