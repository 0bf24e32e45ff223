"""Rotary position embeddings: YaRN for the text stack (interleaved pairs).

Formulas: ``shared/docs/k25-architecture.md`` section 2 (YaRN inverse frequencies, the cos/sin multiplier).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from k25jax.config import TextConfig, yarn_mscale


def text_inv_freq(cfg: TextConfig) -> np.ndarray:
    """Inverse frequencies ``[R/2]`` (float32) of the text rope, YaRN-corrected when configured."""
    d = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    extra = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    y = cfg.rope_scaling
    if y is None:
        return extra.astype(np.float32)
    inter = extra / np.float32(y.factor)

    def corr(rotations: float) -> float:
        return d * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(y.beta_fast)), 0)
    high = min(math.ceil(corr(y.beta_slow)), d - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    return (inter * ramp + extra * (1.0 - ramp)).astype(np.float32)


def text_rope_scale(cfg: TextConfig) -> float:
    """The cos/sin multiplier ``mscale(f, mscale) / mscale(f, mscale_all_dim)`` (1 for K2.5)."""
    y = cfg.rope_scaling
    if y is None:
        return 1.0
    return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[..., R/2]`` (float32) for integer ``positions [...]``."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs ``(x0, x1), (x2, x3), ...`` of ``x [..., R]`` in float32.

    ``cos``/``sin`` broadcast against ``x[..., ::2]``. The output keeps the interleaved layout and ``x.dtype``.
    """
    xf = x.astype(jnp.float32)
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
