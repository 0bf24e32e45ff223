"""The whole K2.5 model (text stack; the vision tower joins it when configured) and builders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax.config import K25Config
from k25jax.moe import Experts
from k25jax.quant import GROUP
from k25jax.text import TextModel
from pallas_kernels.dispatch import check_impl


class K25(nnx.Module):
    """Kimi K2.5. ``model(input_ids)`` returns float32 logits ``[B, T, V]``.

    ``kernels`` is a run setting: ``"xla"`` (dequantize-then-dot) or ``"pallas"`` (the INT4 Pallas kernels of
    ``pallas_kernels``, interpreted on CPU); ``"pallas:gpu"`` / ``"pallas:tpu"`` force one kernel. It only
    matters for INT4 experts. Change it later with :meth:`set_kernels`.
    """

    def __init__(self, cfg: K25Config, *, dtype=jnp.bfloat16, param_dtype=None, kernels: str = "xla", rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.text = TextModel(cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.quantization is not None:  # the release's experts are INT4: so are ours, from here to the matmul
            if cfg.quantization.group_size != GROUP:
                raise ValueError(
                    f"quantization_config group_size {cfg.quantization.group_size}: INT4 experts on device "
                    f"support group_size {GROUP} (the released models' value) only"
                )
            for module in [m for _, m in nnx.iter_modules(self) if isinstance(m, Experts)]:
                module.to_int4()
        self.set_kernels(kernels)

    def set_kernels(self, kernels: str) -> K25:
        """Choose the expert matmul implementation for later calls (no recompilation of anything else)."""
        check_impl(kernels)
        for _, module in nnx.iter_modules(self):
            if isinstance(module, Experts):
                module.kernels = kernels
        self.kernels = kernels
        return self

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array | None = None, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        return self.text(input_ids, positions=positions, attention_mask=attention_mask)


def build_model(cfg: K25Config, *, dtype=jnp.bfloat16, param_dtype=None, seed: int = 0, kernels: str = "xla") -> K25:
    """A randomly initialised model (normal(0, 0.02) matrices, unit norms; INT4 experts quantize that init)."""
    return K25(cfg, dtype=dtype, param_dtype=param_dtype, kernels=kernels, rngs=nnx.Rngs(seed))


def abstract_model(cfg: K25Config, *, dtype=jnp.bfloat16, param_dtype=None, kernels: str = "xla") -> K25:
    """The model with ``jax.ShapeDtypeStruct`` leaves: no memory, seconds even at full size."""
    return nnx.eval_shape(lambda: K25(cfg, dtype=dtype, param_dtype=param_dtype, kernels=kernels, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    """Number of parameter elements (an INT4 weight counts its unpacked elements)."""
    state = nnx.state(model, nnx.Param)
    total = 0
    for leaf in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "logical_size")):
        logical = getattr(leaf, "logical_size", None)  # INT4 words count 8 each, their scales 0
        total += int(_size(leaf) if logical is None else logical)
    return total


def _size(x) -> int:
    n = 1
    for d in x.shape:
        n *= int(d)
    return n
