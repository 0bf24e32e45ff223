"""Tiny models shared by test modules: built once per process (building takes seconds). Tests must not modify
them (generation only reads the parameters)."""

import functools

import jax.numpy as jnp

from k25jax import build_model
from k25jax.config import RunConfig, tiny


@functools.cache
def tiny_float32(seed: int = 3):
    """``build_model(tiny(), RunConfig(compute_dtype=float32), seed=seed)``."""
    return build_model(tiny(), RunConfig(compute_dtype=jnp.float32), seed=seed)
