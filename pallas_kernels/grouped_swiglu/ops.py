"""``grouped_swiglu``: the single entry point of the routed experts' SwiGLU over rows sorted by expert.

``grouped_swiglu(rows, group_sizes, SwiGLUWeights(gate, up, down), dtype=..., kernels=..., strategy=...)`` ->
``[M, D]`` float32: row ``r`` of group ``e`` becomes ``down_e(silu(gate_e x) * up_e x)``; rows past
``sum(group_sizes)`` are zero. The weights are *values*, not flags: a plain array ``[E, in, out]``, or any type
with the three methods the strategies use (``grouped_matmul(rows, group_sizes, *, impl) -> float32``, indexing of
its leading axes, ``dequantize(dtype)``): the INT4 type of ``k25jax.quant`` today, a fake-quant training weight
next. A new weight type adds its methods, not a branch here.

Strategies (``strategy``):

- ``"grouped"``: three grouped matmuls (``reference.py``): ``ragged_dot`` for plain weights, ``int4_gmm`` (XLA or
  Pallas, as ``kernels`` says: :mod:`pallas_kernels.dispatch`) for INT4 ones. What accelerators run.
- ``"tiled"`` / ``"per_row"``: the CPU scans of ``cpu.py`` (many rows / few rows).
- ``"auto"`` (default): chosen **when lowering**, with ``jax.lax.platform_dependent``: on CPU with
  ``kernels="xla"``, ``per_row`` for at most ``E`` rows, ``tiled`` when the tiles do less work than the
  dense ``E x M`` of XLA:CPU's ``ragged_dot``, else ``grouped``; on every other platform (and with Pallas kernels)
  ``grouped``. So ``jax.jit(f).lower(lowering_platforms=("tpu",))`` on a CPU host emits no CPU scan.

``layer``: the weights are layer-stacked ``[L, E, in, out]`` (a layer scan that keeps the experts whole, so that a
decode step reads only the experts its tokens chose); the CPU strategies read ``[layer, expert]`` per step, the
grouped one takes the layer's experts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from pallas_kernels.dispatch import check_impl
from pallas_kernels.grouped_swiglu import cpu, reference

STRATEGIES = ("auto", "grouped", "tiled", "per_row")


class SwiGLUWeights(NamedTuple):
    """The three projections of the routed experts: ``gate``/``up [E, D, F]``, ``down [E, F, D]`` (a leading ``L``
    with ``layer``). Each a plain array or a weight value type (module doc)."""

    gate: Any
    up: Any
    down: Any


def tiles_pay(rows: int, num_experts: int, tile: int = cpu.TILE_ROWS) -> bool:
    """Whether the CPU tiles (at most ``rows / tile + E`` of them) do less work than the dense ``E x rows`` of
    XLA:CPU's ragged_dot (static shapes). Measured on the benchmark's small model (E 32, D 256): tiled beats
    ragged_dot 2.7x at 64 rows and 6x at 128, so no extra margin is asked for."""
    return num_experts > 1 and (-(-rows // tile) + num_experts) * tile <= num_experts * rows


def cpu_strategy(rows: int, num_experts: int) -> str:
    """The ``"auto"`` choice on CPU with XLA kernels for ``rows`` sorted rows over ``num_experts`` experts."""
    if rows <= num_experts:
        return "per_row"
    return "tiled" if tiles_pay(rows, num_experts) else "grouped"


def _layer_slice(weight, layer):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), weight)


def _run(strategy: str, rows, group_sizes, weights: SwiGLUWeights, dtype, kernels: str, layer):
    gate, up, down = weights
    if strategy == "grouped":
        if layer is not None:
            gate, up, down = (_layer_slice(w, layer) for w in weights)
        with jax.named_scope("grouped_swiglu_grouped"):
            return reference.grouped_swiglu(rows, group_sizes, gate, up, down, dtype=dtype, impl=kernels)
    fn = {"tiled": cpu.tiled, "per_row": cpu.per_row}[strategy]
    with jax.named_scope(f"grouped_swiglu_cpu_{strategy}"):  # named so HLO tests can tell the CPU scans apart
        return fn(rows, group_sizes, gate, up, down, dtype=dtype, layer=layer)


def grouped_swiglu(
    rows: jax.Array,
    group_sizes: jax.Array,
    weights: SwiGLUWeights,
    *,
    dtype,
    kernels: str = "xla",
    strategy: str = "auto",
    layer: jax.Array | None = None,
) -> jax.Array:
    """``rows [M, D]`` sorted by expert (``group_sizes [E]`` int32) through their experts' SwiGLU -> ``[M, D]``
    float32 (module doc). ``dtype``: the compute dtype of the matmul inputs; ``kernels``: the INT4 matmul
    implementation (:data:`pallas_kernels.dispatch.IMPLS`)."""
    check_impl(kernels)
    if strategy not in STRATEGIES:
        raise ValueError(f"grouped_swiglu: strategy {strategy!r} is not one of {STRATEGIES}")
    if rows.ndim != 2:
        raise ValueError(f"grouped_swiglu: rows must be [M, D], got shape {rows.shape}")
    if strategy != "auto":
        return _run(strategy, rows, group_sizes, weights, dtype, kernels, layer)
    grouped = lambda r, g, w, i: _run("grouped", r, g, w, dtype, kernels, i)  # noqa: E731
    if kernels != "xla":  # Pallas kernels skip empty experts themselves, on every platform
        return grouped(rows, group_sizes, weights, layer)
    on_cpu = cpu_strategy(rows.shape[0], group_sizes.shape[0])
    return jax.lax.platform_dependent(
        rows,
        group_sizes,
        weights,
        layer,
        cpu=lambda r, g, w, i: _run(on_cpu, r, g, w, dtype, kernels, i),
        default=grouped,
    )
