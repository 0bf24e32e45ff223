"""The whole K2.5 model (text stack; the vision tower joins it when configured) and builders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax.config import K25Config
from k25jax.text import TextModel


class K25(nnx.Module):
    """Kimi K2.5. ``model(input_ids)`` returns float32 logits ``[B, T, V]``."""

    def __init__(self, cfg: K25Config, *, dtype=jnp.bfloat16, param_dtype=None, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.text = TextModel(cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array | None = None, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        return self.text(input_ids, positions=positions, attention_mask=attention_mask)


def build_model(cfg: K25Config, *, dtype=jnp.bfloat16, param_dtype=None, seed: int = 0) -> K25:
    """A randomly initialised model (normal(0, 0.02) matrices, unit norms)."""
    return K25(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: K25Config, *, dtype=jnp.bfloat16, param_dtype=None) -> K25:
    """The model with ``jax.ShapeDtypeStruct`` leaves: no memory, seconds even at full size."""
    return nnx.eval_shape(lambda: K25(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    """Number of parameter elements (an INT4 weight counts its unpacked elements)."""
    state = nnx.state(model, nnx.Param)
    total = 0
    for leaf in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "logical_size")):
        total += int(getattr(leaf, "logical_size", None) or _size(leaf))
    return total


def _size(x) -> int:
    n = 1
    for d in x.shape:
        n *= int(d)
    return n
