"""Shared helpers for the converter tests: tiny release directories and comparisons of model parameters."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

import oracle


def make_release(cfg, path, *, seed: int = 5, num_shards: int = 3, vision: bool = True) -> str:
    """A release directory of a tiny random transformers model (Kimi-K2.5 with vision, or text only)."""
    hf = oracle.make_hf_kimi_model(cfg, seed=seed) if vision else oracle.make_hf_text_model(cfg, seed=seed)
    tensors = oracle.release_tensors(hf, cfg)
    return oracle.write_release(tensors, cfg, path, num_shards=num_shards)


def flat_params(model) -> dict[tuple[str, ...], np.ndarray]:
    """``{path: host array}`` of every parameter (gathered from all devices)."""
    return {p: np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_params(a, b) -> int:
    """Every parameter bit-identical (dtype, shape, bytes); returns the number of bytes compared."""
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    total = 0
    for p in fa:
        x, y = fa[p], fb[p]
        assert x.dtype == y.dtype and x.shape == y.shape, ("/".join(p), x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), "/".join(p)
        total += x.nbytes
    return total


def tree_files(root: str) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``root``."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            full = os.path.join(dirpath, n)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out
