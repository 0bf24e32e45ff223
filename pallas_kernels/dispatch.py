"""Choosing an implementation: the ``impl`` setting shared by every op's ``ops.py``.

``impl`` is one of:

- ``"xla"``: the op's ``reference.py`` (dequantize, then XLA's dot / ``ragged_dot``);
- ``"pallas"``: the Pallas kernel for the platform the computation is lowered for (``gpu.py`` on CUDA,
  ``tpu.py`` on TPU); on CPU the kernel runs in interpret mode (:data:`CPU_FLAVOR` chooses which);
- ``"pallas:gpu"`` / ``"pallas:tpu"``: that kernel whatever the platform (interpreted when the default
  backend is CPU): for testing both kernels on CPU and for lowering ahead of time.

The choice is made with ``jax.lax.platform_dependent``, i.e. when lowering, not from the host's default
backend, so ``jax.jit(f).lower(lowering_platforms=("tpu",))`` on a CPU host picks the TPU kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

IMPLS = ("xla", "pallas", "pallas:gpu", "pallas:tpu")
CPU_FLAVOR = "tpu"  # the kernel that "pallas" interprets on CPU


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernel implementation {impl!r} is not one of {IMPLS}")
    return impl


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def dispatch(impl: str, reference: Callable, kernels: dict[str, Callable], interpret: bool | None, *args):
    """Run ``reference(*args)`` or ``kernels[flavor](*args, interpret=...)`` as ``impl`` says."""
    check_impl(impl)
    if impl == "xla":
        return reference(*args)
    if impl != "pallas":
        flavor = impl.split(":")[1]
        return kernels[flavor](*args, interpret=on_cpu() if interpret is None else interpret)
    return jax.lax.platform_dependent(
        *args,
        cpu=lambda *a: kernels[CPU_FLAVOR](*a, interpret=True),
        cuda=lambda *a: kernels["gpu"](*a, interpret=False),
        tpu=lambda *a: kernels["tpu"](*a, interpret=False),
        default=reference,  # other platforms (e.g. ROCm) have no tested kernel here
    )
