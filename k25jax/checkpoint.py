"""Loading models: ``load_model`` accepts a release directory (orbax checkpoints join with the converter)."""

from __future__ import annotations

import os

import jax.numpy as jnp

from k25jax.model import K25


def load_model(path: str | os.PathLike, *, compute_dtype=jnp.bfloat16, param_dtype=None, progress: bool = True) -> K25:
    """Load a ready model from ``path``.

    ``path`` is a release directory (``config.json`` + sharded safetensors + index). INT4 pack-quantized
    experts are unpacked per the release packing. Parameters default to the compute dtype.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    # The release reader lives in the converter package (the only place that knows release tensor names).
    from convert.from_release import load_release

    return load_release(path, dtype=compute_dtype, param_dtype=param_dtype, progress=progress)
