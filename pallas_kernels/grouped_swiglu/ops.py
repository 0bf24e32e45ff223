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
  ``kernels="xla"``, ``per_row`` for fewer than ``E`` rows, ``tiled`` (tiles sized by :func:`cpu_tile`) when
  the tiles do less work than the dense ``E x M`` of XLA:CPU's ``ragged_dot``, else ``grouped``; on every
  other platform (and with Pallas kernels) ``grouped``. So ``jax.jit(f).lower(lowering_platforms=("tpu",))``
  on a CPU host emits no CPU scan.

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


def cpu_tile(rows: int, num_experts: int) -> int:
    """Rows per tile of the CPU ``tiled`` scan for ``rows`` sorted rows over ``num_experts`` experts (static):
    twice the mean rows per expert, rounded up to a power of two, within ``[2, TILE_ROWS]``.

    A visit costs one expert's dequantization plus a ``[tile, D]`` matmul, so tiles much larger than the groups
    multiply rows that are not there. Measured per MoE layer (INT4, E 32, D 256, F 128): a 32-token prefill (128
    rows, mean 4) takes 1.6 ms in tiles of 8 against 3.2 ms in tiles of 32; a decode step of 8 or 16 tokens (32 /
    64 rows) 0.8 / 1.2 ms in tiles of 2 / 4 against 1.1 / 1.9 ms one row at a time (``benchmarks/moe_cpu_bench.py``
    prints the whole grid). Training batches (thousands of rows) keep tiles of ``TILE_ROWS``."""
    mean = -(-rows // max(num_experts, 1))
    return min(2 << max(mean - 1, 0).bit_length(), cpu.TILE_ROWS)


def tiles_pay(rows: int, num_experts: int, tile: int | None = None) -> bool:
    """Whether the CPU tiles (at most ``rows / tile + E`` of them; ``tile`` default :func:`cpu_tile`) do less work
    than the dense ``E x rows`` of XLA:CPU's ragged_dot (static shapes)."""
    tile = cpu_tile(rows, num_experts) if tile is None else tile
    return num_experts > 1 and (-(-rows // tile) + num_experts) * tile <= num_experts * rows


def cpu_strategy(rows: int, num_experts: int) -> str:
    """The ``"auto"`` choice on CPU with XLA kernels for ``rows`` sorted rows over ``num_experts`` experts: one row
    at a time while there are fewer rows than experts (a decode step of a few tokens), else tiles when they pay."""
    if rows < num_experts:
        return "per_row"
    return "tiled" if tiles_pay(rows, num_experts) else "grouped"


def _layer_slice(weight, layer):
    index_layer = getattr(weight, "index_layer", None)  # a weight type whose leaves do not all lead with the layer
    if index_layer is not None:
        return index_layer(layer)
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), weight)


def _run(strategy: str, rows, group_sizes, weights: SwiGLUWeights, dtype, kernels: str, layer):
    gate, up, down = weights
    if strategy == "grouped":
        if layer is not None:
            gate, up, down = (_layer_slice(w, layer) for w in weights)
        with jax.named_scope("grouped_swiglu_grouped"):
            return reference.grouped_swiglu(rows, group_sizes, gate, up, down, dtype=dtype, impl=kernels)
    with jax.named_scope(f"grouped_swiglu_cpu_{strategy}"):  # named so HLO tests can tell the CPU scans apart
        if strategy == "per_row":
            return cpu.per_row(rows, group_sizes, gate, up, down, dtype=dtype, layer=layer)
        tile = cpu_tile(rows.shape[0], group_sizes.shape[0])
        return cpu.tiled(rows, group_sizes, gate, up, down, dtype=dtype, layer=layer, tile=tile)


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
