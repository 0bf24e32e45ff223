"""Loading models: ``load_model`` accepts a release directory (orbax checkpoints join with the converter)."""

from __future__ import annotations

import os

import jax.numpy as jnp

from k25jax.model import K25


def load_model(
    path: str | os.PathLike,
    *,
    compute_dtype=jnp.bfloat16,
    param_dtype=None,
    progress: bool = True,
    kernels: str = "xla",
) -> K25:
    """Load a ready model from ``path``.

    ``path`` is a release directory (``config.json`` + sharded safetensors + index). INT4 pack-quantized
    experts stay INT4 (:class:`~k25jax.quant.Int4Weight`, repacked once to the kernels' layout, never
    dequantized); plain experts stay plain. Other parameters default to the compute dtype. ``kernels``:
    ``"xla"`` | ``"pallas"`` (see :class:`~k25jax.model.K25`).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    # The release reader lives in the converter package (the only place that knows release tensor names).
    from convert.from_release import load_release

    return load_release(path, dtype=compute_dtype, param_dtype=param_dtype, progress=progress, kernels=kernels)
