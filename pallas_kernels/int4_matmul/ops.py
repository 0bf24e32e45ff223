"""``int4_matmul``: the single entry point (``impl``, block sizes, dispatch, gradient).

``int4_matmul(x, packed, scales, impl="pallas")`` computes ``x [M, K] @ W [K, N]`` for an INT4 weight in the
layout of :mod:`pallas_kernels.int4_layout`. It has a ``custom_vjp``: the gradient with respect to ``x`` is
``dy @ W^T``, computed by the same implementation (the kernels have a transposed mode), never by
materializing ``W``. The INT4 weight is a constant for differentiation (as under ``jax.lax.stop_gradient``):
its cotangents are zero. QAT trains a float copy; LoRA trains adapters beside a frozen INT4 base.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import int4_layout as L
from pallas_kernels.dispatch import check_impl, dispatch
from pallas_kernels.int4_matmul import reference

GPU_ONLY = ("split_k", "num_warps", "num_stages")


@dataclasses.dataclass(frozen=True)
class Setting:
    impl: str
    out_dtype: np.dtype | None
    blocks: tuple[tuple[str, int], ...]  # block sizes given by the caller (absent ones: kernel defaults)
    interpret: bool | None


def _kernel(flavor: str, setting: Setting, transpose: bool, out_dtype):
    # Imported on use: a jax without one backend's Pallas module still imports this package.
    if flavor == "gpu":
        from pallas_kernels.int4_matmul.gpu import int4_matmul as fn
    else:
        from pallas_kernels.int4_matmul.tpu import int4_matmul as fn
    blocks = {k: v for k, v in setting.blocks if flavor == "gpu" or k not in GPU_ONLY}
    return functools.partial(fn, out_dtype=out_dtype, transpose_rhs=transpose, **blocks)


def _run(setting: Setting, x, packed, scales, transpose: bool, out_dtype):
    ref = functools.partial(reference.int4_matmul, out_dtype=out_dtype, transpose_rhs=transpose)
    kernels = {f: _kernel(f, setting, transpose, out_dtype) for f in ("gpu", "tpu")}
    return dispatch(setting.impl, ref, kernels, setting.interpret, x, packed, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul(setting: Setting, x, packed, scales):
    return _run(setting, x, packed, scales, False, setting.out_dtype or x.dtype)


def _matmul_fwd(setting, x, packed, scales):
    dtype_carrier = jnp.zeros((0,), x.dtype)  # residuals must be arrays; this one carries x's dtype
    return _matmul(setting, x, packed, scales), (packed, scales, dtype_carrier)


def _matmul_bwd(setting, residuals, dy):
    packed, scales, dtype_carrier = residuals
    dx = _run(setting, dy.astype(dtype_carrier.dtype), packed, scales, True, dtype_carrier.dtype)
    return dx, np.zeros(packed.shape, jax.dtypes.float0), jnp.zeros_like(scales)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def int4_matmul(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    *,
    impl: str = "pallas",
    out_dtype=None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``x [M, K] @ dequant(packed [K/8, N], scales [K/32, 1, N]) -> [M, N]`` in ``out_dtype`` (default x's).

    Args:
      impl: ``"xla"`` | ``"pallas"`` | ``"pallas:gpu"`` | ``"pallas:tpu"`` (see :mod:`pallas_kernels.dispatch`).
      block_m, block_n, block_k: tile sizes (rows, output columns, weight rows); None: the kernel's default.
      split_k: GPU only: split the contraction across programs (decode shapes with one row block).
      interpret: force interpret mode on or off for ``"pallas:*"`` (default: on when the backend is CPU).
    The activations' dtype is the compute dtype (bf16 or float32); accumulation is float32.
    """
    check_impl(impl)
    k, n = L.check_operands("int4_matmul", packed, scales)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"int4_matmul: activations {x.shape} do not match the INT4 weight [K={k}, N={n}]")
    given = dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k)
    setting = Setting(
        impl,
        None if out_dtype is None else jnp.dtype(out_dtype),
        tuple((k, v) for k, v in given.items() if v is not None),
        interpret,
    )
    return _matmul(setting, x, packed, scales)
