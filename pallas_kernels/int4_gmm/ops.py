"""``int4_gmm``: the single entry point (``impl``, block sizes, dispatch, gradient) of the INT4 grouped matmul.

``int4_gmm(x, packed, scales, group_sizes, impl="pallas")`` multiplies rows sorted by expert with their
expert's INT4 weight (layout: :mod:`pallas_kernels.int4_layout`, with a leading expert axis). Its
``custom_vjp`` gives the gradient with respect to the rows, ``dy @ W[e]^T`` per group, through the same
implementation (transposed kernels). The weights and ``group_sizes`` are constants for differentiation
(zero cotangents), as for ``int4_matmul``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import int4_layout as L
from pallas_kernels.dispatch import check_impl, dispatch
from pallas_kernels.int4_gmm import reference

GPU_ONLY = ("num_warps", "num_stages")


@dataclasses.dataclass(frozen=True)
class Setting:
    impl: str
    out_dtype: np.dtype | None
    blocks: tuple[tuple[str, int], ...]
    interpret: bool | None


def _kernel(flavor: str, setting: Setting, transpose: bool, out_dtype):
    # Imported on use: a jax without one backend's Pallas module still imports this package.
    if flavor == "gpu":
        from pallas_kernels.int4_gmm.gpu import int4_gmm as fn
    else:
        from pallas_kernels.int4_gmm.tpu import int4_gmm as fn
    blocks = {k: v for k, v in setting.blocks if flavor == "gpu" or k not in GPU_ONLY}
    return functools.partial(fn, out_dtype=out_dtype, transpose_rhs=transpose, **blocks)


def _run(setting: Setting, x, packed, scales, group_sizes, transpose: bool, out_dtype):
    ref = functools.partial(reference.int4_gmm, out_dtype=out_dtype, transpose_rhs=transpose)
    kernels = {f: _kernel(f, setting, transpose, out_dtype) for f in ("gpu", "tpu")}
    return dispatch(setting.impl, ref, kernels, setting.interpret, x, packed, scales, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(setting: Setting, x, packed, scales, group_sizes):
    return _run(setting, x, packed, scales, group_sizes, False, setting.out_dtype or x.dtype)


def _gmm_fwd(setting, x, packed, scales, group_sizes):
    dtype_carrier = jnp.zeros((0,), x.dtype)
    return _gmm(setting, x, packed, scales, group_sizes), (packed, scales, group_sizes, dtype_carrier)


def _gmm_bwd(setting, residuals, dy):
    packed, scales, group_sizes, dtype_carrier = residuals
    dx = _run(setting, dy.astype(dtype_carrier.dtype), packed, scales, group_sizes, True, dtype_carrier.dtype)
    float0 = jax.dtypes.float0
    return dx, np.zeros(packed.shape, float0), jnp.zeros_like(scales), np.zeros(group_sizes.shape, float0)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def int4_gmm(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: str = "pallas",
    out_dtype=None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Rows ``x [M, K]`` grouped by ``group_sizes [E]`` (int32, zeros allowed) times ``W[e] [K, N]`` -> ``[M, N]``.

    ``packed [E, K/8, N]`` int32, ``scales [E, K/32, 1, N]``. Rows past ``sum(group_sizes)`` come out zero.
    Args as for :func:`pallas_kernels.int4_matmul.ops.int4_matmul`.
    """
    check_impl(impl)
    k, n = L.check_operands("int4_gmm", packed, scales)
    if packed.ndim != 3 or group_sizes.shape != (packed.shape[0],):
        raise ValueError(
            f"int4_gmm: expects packed [E, K/8, N] and group_sizes [E], got {packed.shape} and {group_sizes.shape}"
        )
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"int4_gmm: rows {x.shape} do not match the INT4 experts [E={packed.shape[0]}, K={k}, N={n}]")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"int4_gmm: group_sizes must be integers, got {group_sizes.dtype}")
    given = dict(block_m=block_m, block_n=block_n, block_k=block_k)
    setting = Setting(
        impl,
        None if out_dtype is None else jnp.dtype(out_dtype),
        tuple((k, v) for k, v in given.items() if v is not None),
        interpret,
    )
    return _gmm(setting, x, packed, scales, group_sizes.astype(jnp.int32))
