"""The routed experts' grouped SwiGLU, ``down(silu(gate x) * up x)`` over rows sorted by expert (see ``ops.py``)."""

from pallas_kernels.grouped_swiglu.ops import STRATEGIES, SwiGLUWeights, grouped_swiglu

__all__ = ["STRATEGIES", "SwiGLUWeights", "grouped_swiglu"]
