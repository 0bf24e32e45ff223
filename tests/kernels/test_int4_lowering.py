"""The real GPU (Triton) and TPU (Mosaic) lowerings of both INT4 ops, run on CPU at K2.5 shapes.

Interpret mode checks numbers but not hardware rules; lowering for ``("cuda",)`` and ``("tpu",)`` runs the
Pallas-to-Triton and Pallas-to-Mosaic passes, which reject illegal block shapes, dtypes and dots. (Triton's
and Mosaic's own compilers run later, on the device: ``scripts/gpu_check.sh`` covers the GPU side.)
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.int4_gmm import ops as gmm_ops
from pallas_kernels.int4_matmul import ops as matmul_ops

CALL = {"cuda": "xla.gpu.triton", "tpu": "tpu_custom_call"}
E, D, F = 384, 7168, 2048  # K2.5 experts


def _weight(k, n, *lead):
    return (
        jax.ShapeDtypeStruct((*lead, k // 8, n), jnp.int32),
        jax.ShapeDtypeStruct((*lead, k // 32, 1, n), jnp.bfloat16),
    )


def _lowered_text(fn, *args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("m,k,n", [(1, D, F), (16, F, D), (512, D, F)])
def test_int4_matmul_lowers(platform, m, k, n):
    packed, scales = _weight(k, n)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)

    def fwd_and_grad(x, packed, scales):
        out, vjp = jax.vjp(lambda x: matmul_ops.int4_matmul(x, packed, scales, impl="pallas"), x)
        return out, vjp(out)[0]

    text = _lowered_text(fwd_and_grad, x, packed, scales, platform=platform)
    assert text.count(CALL[platform]) >= 2  # forward and transposed kernels, chosen by the lowering platform


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("m,k,n", [(8, D, F), (8, F, D), (4096, D, F)])
def test_int4_gmm_lowers(platform, m, k, n):
    packed, scales = _weight(k, n, E)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((E,), jnp.int32)

    def fwd_and_grad(x, packed, scales, sizes):
        out, vjp = jax.vjp(lambda x: gmm_ops.int4_gmm(x, packed, scales, sizes, impl="pallas"), x)
        return out, vjp(out)[0]

    text = _lowered_text(fwd_and_grad, x, packed, scales, sizes, platform=platform)
    assert text.count(CALL[platform]) >= 2


def test_cpu_lowering_interprets():
    packed, scales = _weight(256, 128)
    x = jax.ShapeDtypeStruct((4, 256), jnp.float32)
    text = _lowered_text(
        lambda x, p, s: matmul_ops.int4_matmul(x, p, s, impl="pallas"), x, packed, scales, platform="cpu"
    )
    assert CALL["cuda"] not in text and CALL["tpu"] not in text and "while" in text
