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


def scaled_mla(cfg, seed: int = 0, weight_std: float = 0.2):
    """A float32 MLA of ``cfg.text``-like ``cfg`` whose matrices are scaled from the init's std to ``weight_std``,
    so the softmax is far from uniform (scores of order 1)."""
    import jax.numpy as jnp
    from flax import nnx

    from k25jax.attention import MLA
    from k25jax.layers import INIT_STD

    attn = MLA(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "k_up", "v_up", "o_proj"):
        if hasattr(attn, name):
            weight = getattr(attn, name)
            weight[...] = weight[...] * (weight_std / INIT_STD)
    return attn
