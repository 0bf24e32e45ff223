"""Building blocks: parameter creation with logical axes, RMSNorm, the SwiGLU MLP."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax.sharding import check_axes, constrain

INIT_STD = 0.02


def normal_init(std: float = INIT_STD) -> Callable:
    def init(key, shape, dtype):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def ones_init(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def zeros_init(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype,
    init: Callable | None = None,
    what: str = "param",
) -> nnx.Param:
    """A parameter of ``shape`` whose dims carry the logical ``axes`` (Flax ``out_sharding`` metadata).

    Parameters are created unsharded (``eager_sharding=False``); ``k25jax.sharding`` places them on a mesh.
    """
    check_axes(axes, shape, what)
    init = init or normal_init()
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``w * x * rsqrt(mean(x^2) + eps)`` in float32, cast back to ``x.dtype`` before the scale (as the reference)."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), ("norm",), param_dtype, ones_init, "RMSNorm.weight")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class MLP(nnx.Module):
    """SwiGLU ``down(silu(gate x) * up x)``, no biases; the dense layers and the shared expert."""

    def __init__(self, dim: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.gate_proj = param(rngs, (dim, width), ("embed", "mlp"), param_dtype, what="MLP.gate_proj")
        self.up_proj = param(rngs, (dim, width), ("embed", "mlp"), param_dtype, what="MLP.up_proj")
        self.down_proj = param(rngs, (width, dim), ("mlp", "embed"), param_dtype, what="MLP.down_proj")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate = jnp.einsum("...d,df->...f", x, self.gate_proj[...].astype(self.dtype))
        up = jnp.einsum("...d,df->...f", x, self.up_proj[...].astype(self.dtype))
        hidden = jax.nn.silu(gate) * up
        if hidden.ndim == 3:  # [B, T, F]: the width is split over the tensor axes on a mesh
            hidden = constrain(hidden, ("batch", "seq", "act_mlp"))
        return jnp.einsum("...f,fd->...d", hidden, self.down_proj[...].astype(self.dtype))


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """``(x - mean) * rsqrt(var + eps) * w + b`` over the last axis, in float32, cast back to ``x.dtype``."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centred = xf - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(var + eps)
    return (normed * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (the vision tower and the projector; the text stack uses RMSNorm)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), ("norm",), param_dtype, ones_init, "LayerNorm.weight")
        self.bias = param(rngs, (dim,), ("norm",), param_dtype, zeros_init, "LayerNorm.bias")

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.weight[...], self.bias[...], self.eps)
