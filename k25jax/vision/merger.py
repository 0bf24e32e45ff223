"""The patch-merger projector: merged vision patches -> text embeddings (architecture doc section 3).

``LayerNorm`` over each of the 4 sub-tokens of a 2x2 merged patch, flatten to ``4 * D_vision``, a square
linear layer, exact (erf) GELU, and a linear layer to the text width; biases throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax.config import VisionConfig
from k25jax.layers import LayerNorm, param, zeros_init


class Projector(nnx.Module):
    """``projector(merged [M, 4, D_v])`` -> ``[M, D_text]`` in the compute dtype."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.bfloat16, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.dtype = dtype
        W, Dt = cfg.merged_dim, cfg.text_hidden_size
        self.norm = LayerNorm(cfg.mm_hidden_size, cfg.projector_ln_eps, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = param(rngs, (W, W), ("vision_merged", "projector_mlp"), param_dtype, what="mm_projector.proj.0")
        self.in_bias = param(rngs, (W,), ("projector_mlp",), param_dtype, zeros_init, "mm_projector.proj.0.bias")
        self.out_proj = param(rngs, (W, Dt), ("projector_mlp", "embed"), param_dtype, what="mm_projector.proj.2")
        self.out_bias = param(rngs, (Dt,), ("embed",), param_dtype, zeros_init, "mm_projector.proj.2.bias")

    def __call__(self, merged: jax.Array) -> jax.Array:
        dt = self.dtype
        h = self.norm(merged).astype(dt)
        h = h.reshape(h.shape[0], -1)  # sub-tokens row-major (kh, kw), then channels
        h = jnp.einsum("mw,wf->mf", h, self.in_proj[...].astype(dt)) + self.in_bias[...].astype(dt)
        h = jax.nn.gelu(h, approximate=False)
        return jnp.einsum("mf,fd->md", h, self.out_proj[...].astype(dt)) + self.out_bias[...].astype(dt)
