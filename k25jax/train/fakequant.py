"""Fake-quantized INT4 weights for quantization-aware training: a weight value type the expert op consumes.

``W_fq = clamp(round(W / s), qmin, qmax) * s`` per group of 32 along K, with a straight-through gradient to the
master ``W`` (``shared/docs/qat.md``). Two grids:

- ``"kimi"`` (K2-Thinking, K2.5, K2.6): ``s = bf16(float32(amax) / 7)``, ``q`` in [-7, 7]. The dequantized release
  is a fixed point of this rule: scales recomputed from masters ``q * s`` are ``s`` again and re-rounding gives
  ``q`` back, so at step 0 dynamic scales and the checkpoint's frozen scales give the INT4 model's forward bit for
  bit.
- ``"compressed-tensors"``: ``s = bf16(float32(amax) / 7.5)``, ``q`` in [-8, 7] (what llm-compressor writes; also
  our release writers' rule). Recomputing scales from such masters does not give the stored ones back: only
  frozen scales reproduce such a release.

Scale modes: ``"dynamic"`` (recomputed from the masters every step, no gradient), ``"frozen"`` (the checkpoint's
scales, constants), ``"learned"`` (trainable, LSQ-style gradient). The forward computes ``q * s`` in float32 and
casts to the compute dtype exactly as :func:`pallas_kernels.int4_layout.dequantize_device` does, and the grouped
matmul is the one the INT4 reference runs, so a fake-quant model equals the INT4 model bit for bit when their ``q``
and ``s`` agree (float32, ``kernels="xla"``).

:class:`FakeQuantArray` is the value (a pytree: master and scales, the grid and mode static), with the methods
:func:`pallas_kernels.grouped_swiglu.grouped_swiglu` calls on a weight type: ``grouped_matmul``, indexing of the
leading (layer, expert) axes and ``dequantize``. :class:`FakeQuantWeight` is how it sits in a model (an
``nnx.Module`` with the master as an ``nnx.Param`` and the scales as a :class:`QuantScale` variable, or an
``nnx.Param`` when learned).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax.quant import SCALE_DTYPE, Int4Array, Int4Packed, Int4Scales, WeightModule, WeightValue
from k25jax.sharding import check_axes
from pallas_kernels import int4_layout
from pallas_kernels.int4_matmul.reference import precision

GROUP = int4_layout.GROUP


class Grid(NamedTuple):
    """An INT4 grid: ``s = bf16(float32(amax) / divisor)``, ``q = clamp(round(w / s), qmin, qmax)``."""

    name: str
    divisor: float
    qmin: int
    qmax: int


GRIDS = {
    "kimi": Grid("kimi", 7.0, -7, 7),
    "compressed-tensors": Grid("compressed-tensors", 7.5, -8, 7),
}
SCALE_MODES = ("dynamic", "frozen", "learned")


def grid_of(name: str) -> Grid:
    try:
        return GRIDS[name]
    except KeyError:
        raise ValueError(f"INT4 grid {name!r} is not one of {sorted(GRIDS)}") from None


def _grouped(w: jax.Array) -> jax.Array:
    """``[..., K, N]`` -> float32 ``[..., K/32, 32, N]``."""
    *lead, k, n = w.shape
    if k % GROUP:
        raise ValueError(f"fake-quant: K={k} is not a multiple of the group size {GROUP}")
    return w.astype(jnp.float32).reshape(*lead, k // GROUP, GROUP, n)


def group_scales(w: jax.Array, grid: Grid, scale_dtype=SCALE_DTYPE) -> jax.Array:
    """``s = scale_dtype(float32(amax_group) / divisor)`` for ``w [..., K, N]`` -> ``[..., K/32, 1, N]``."""
    amax = jnp.max(jnp.abs(_grouped(w)), axis=-2, keepdims=True)
    # An exact IEEE division: XLA may turn a division by a constant into a multiplication by its reciprocal.
    divisor = jax.lax.optimization_barrier(jnp.full(amax.shape, grid.divisor, jnp.float32))
    return (amax / divisor).astype(scale_dtype)


def quantize_values(w: jax.Array, scales: jax.Array, grid: Grid) -> jax.Array:
    """``q = clamp(round(w / s), qmin, qmax)`` as float32 ``[..., K/32, 32, N]`` (a zero scale gives q = 0)."""
    wf = _grouped(w)
    sf = scales.astype(jnp.float32)
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(sf == 0, 1.0, sf), wf.shape))
    return jnp.clip(jnp.round(wf / divisor), grid.qmin, grid.qmax)


def quantize_int4(w: jax.Array, grid: str | Grid = "kimi", scale_dtype=SCALE_DTYPE) -> Int4Array:
    """Real INT4 quantization of ``w [..., K, N]`` on ``grid`` (group 32 along K) -> :class:`Int4Array`."""
    grid = grid_of(grid) if isinstance(grid, str) else grid
    scales = group_scales(w, grid, scale_dtype)
    q = quantize_values(w, scales, grid).astype(jnp.int32).reshape(w.shape)
    return Int4Array(int4_layout.pack_device(q), scales)


def _fake_quant_value(w, scales, grid: Grid, dtype):
    q = quantize_values(w, scales, grid)
    *lead, k, n = w.shape
    return (q * scales.astype(jnp.float32)).reshape(*lead, k, n).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def fake_quant(w: jax.Array, scales: jax.Array, grid: Grid, dtype, lsq: bool) -> jax.Array:
    """``W_fq [..., K, N]`` in ``dtype``: ``clamp(round(w / s), qmin, qmax) * s`` (``q * s`` in float32, then cast).

    Gradient: straight through to ``w`` (``lsq=False``; ``scales`` get none), or LSQ (``lsq=True``: ``w`` gets the
    gradient where ``w / s`` lies inside the grid, ``s`` gets ``sum(g * (q - w / s))`` inside and
    ``sum(g * q_bound)`` at the clamp, per group, times ``1 / sqrt(32 * qmax)``).
    """
    return _fake_quant_value(w, scales, grid, dtype)


def _fq_fwd(w, scales, grid, dtype, lsq):
    return _fake_quant_value(w, scales, grid, dtype), (w, scales)


def _fq_bwd(grid, dtype, lsq, residuals, g):
    w, scales = residuals
    if not lsq:
        return g.astype(w.dtype), jnp.zeros_like(scales)
    wf, sf = _grouped(w), scales.astype(jnp.float32)
    ratio = wf / jnp.where(sf == 0, 1.0, sf)
    inside = (ratio >= grid.qmin) & (ratio <= grid.qmax)
    gg = _grouped(g)
    dw = jnp.where(inside, gg, 0.0).reshape(w.shape).astype(w.dtype)
    q = jnp.clip(jnp.round(ratio), grid.qmin, grid.qmax)
    per_value = jnp.where(inside, q - ratio, q)  # d(q s)/ds: q - w/s inside the grid, the clamp bound outside
    ds = jnp.sum(gg * per_value, axis=-2, keepdims=True) / math.sqrt(GROUP * grid.qmax)
    return dw, ds.astype(scales.dtype)


fake_quant.defvjp(_fq_fwd, _fq_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeQuantArray(WeightValue):
    """A fake-quantized weight value ``[..., K, N]``: float ``master`` and ``scales [..., K/32, 1, N]`` (unused in
    ``"dynamic"`` mode, where they are recomputed from the master), with the ``grid`` and ``mode`` static."""

    master: jax.Array
    scales: jax.Array
    grid: Grid = dataclasses.field(metadata=dict(static=True))
    mode: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.master.shape)

    def leaf_axes(self, axes: tuple[str | None, ...]) -> FakeQuantArray:
        """Per-leaf logical axes (the master the weight's, the scales those of INT4 scales)."""
        from k25jax.quant import int4_axes

        return FakeQuantArray(tuple(axes), int4_axes(tuple(axes))[1], self.grid, self.mode)

    def current_scales(self) -> jax.Array:
        """The scales this step uses: recomputed (without gradient) in ``"dynamic"`` mode, else the stored ones."""
        if self.mode == "dynamic":
            return jax.lax.stop_gradient(group_scales(self.master, self.grid, self.scales.dtype))
        return self.scales

    def __getitem__(self, index) -> FakeQuantArray:
        """Index leading (layer / expert) axes, as :class:`~k25jax.quant.Int4Array` does."""
        index = self.leading_index(index)
        return FakeQuantArray(self.master[index], self.scales[index], self.grid, self.mode)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """``W_fq`` in ``dtype`` (forward: the INT4 weight these values round to; gradient: to the master)."""
        return fake_quant(self.master, self.current_scales(), self.grid, jnp.dtype(dtype), self.mode == "learned")

    def grouped_matmul(self, rows: jax.Array, group_sizes: jax.Array, *, impl: str = "xla") -> jax.Array:
        """Experts ``[E, K, N]``: rows sorted by expert times ``W_fq`` -> float32 (the INT4 reference's matmul; the
        activation gradient uses the quantized weight). ``impl`` is ignored: no Pallas kernel takes a float
        master."""
        w = self.dequantize(rows.dtype)
        return jax.lax.ragged_dot(
            rows, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32, precision=precision(rows.dtype)
        )

    def to_int4(self) -> Int4Array:
        """The INT4 weight this fake-quant weight stands for (what export writes): ``q`` and the current scales."""
        scales = self.current_scales()
        q = quantize_values(self.master, scales, self.grid).astype(jnp.int32).reshape(self.shape)
        return Int4Array(int4_layout.pack_device(q), scales)


class QuantScale(nnx.Variable):
    """Group scales that are not trained (frozen or dynamic mode): excluded from ``nnx.Param`` filters."""


class LearnedScale(nnx.Param):
    """Group scales trained with the LSQ gradient."""


class FakeQuantWeight(WeightModule):
    """A fake-quant INT4 weight in a model: ``weight[...]`` is the :class:`FakeQuantArray`; ``weight.shape`` the
    logical shape. The master carries the weight's logical axes; the scales those of INT4 scales."""

    def __init__(self, value: FakeQuantArray, axes: tuple[str | None, ...], *, what: str = "FakeQuantWeight"):
        from k25jax.quant import int4_axes

        check_axes(tuple(axes), value.shape, what)
        if value.mode not in SCALE_MODES:
            raise ValueError(f"{what}: scale mode {value.mode!r} is not one of {SCALE_MODES}")
        _, scale_axes = int4_axes(tuple(axes))
        self.grid = value.grid
        self.mode = value.mode
        self.master = nnx.Param(value.master, out_sharding=tuple(axes), eager_sharding=False)
        scale_type = LearnedScale if value.mode == "learned" else QuantScale
        self.scales = scale_type(value.scales, out_sharding=scale_axes, eager_sharding=False)

    def value(self) -> FakeQuantArray:
        return FakeQuantArray(self.read(self.master), self.read(self.scales), self.grid, self.mode)


# --- fake-quant on some layers of a layer stack, INT4-packed on the others --------------------------------------
#
# The MoE layers' experts are one stacked array per projection ([L, E, K, N], run by a layer scan), so "train the
# experts of layers 40-60" cannot swap the weight type of some layers only. A SubsetFakeQuantWeight holds both
# halves with their own leading axes: masters (and scales) for the Lt trained layers, packed INT4 words and scales
# for the L - Lt frozen ones (no float copy of them, no INT4 copy of the trained ones), and an int32 slot per layer
# (>= 0: that index into the masters; < 0: index -1 - slot into the packed words). The halves are kept whole by the
# layer scan (``whole_stack`` variables, see k25jax.quant.kept_whole); only the slot is sliced, and each layer
# picks its half with a cond: the trained branch is exactly FakeQuantArray's forward and gradient, the frozen one
# exactly Int4Array's dequantization, so the model is bit for bit the one a whole-stack conversion gives on those
# layers, and at step 0 the INT4 model.


class SubsetMaster(nnx.Param):
    """Fake-quant masters of the trained layers of a stack ``[Lt, E, K, N]`` (passed whole to every layer)."""

    whole_stack = True


class SubsetQuantScale(QuantScale):
    """Frozen / dynamic-mode scales of the trained layers ``[Lt, E, K/32, 1, N]``."""

    whole_stack = True


class SubsetLearnedScale(LearnedScale):
    """Learned (LSQ) scales of the trained layers ``[Lt, E, K/32, 1, N]``."""

    whole_stack = True


class SubsetPacked(Int4Packed):
    """Packed INT4 words of the frozen layers of a stack ``[Lf, E, K/8, N]``."""

    whole_stack = True


class SubsetScales(Int4Scales):
    """INT4 scales of the frozen layers ``[Lf, E, K/32, 1, N]``."""

    whole_stack = True


class LayerSlot(nnx.Variable):
    """Per layer of a stack, int32: ``>= 0`` the layer's index into the trained masters, ``< 0`` index
    ``-1 - slot`` into the frozen INT4 words (never trained)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SubsetFakeQuantArray(WeightValue):
    """A layer-stacked weight ``[L, E, K, N]`` fake-quant on ``layers`` (static, sorted) and INT4 elsewhere.

    ``master [Lt, E, K, N]`` and ``master_scales`` (a :class:`FakeQuantArray`'s leaves for the trained layers),
    ``packed [Lf, E, K/8, N]`` and ``scales`` (an :class:`~k25jax.quant.Int4Array`'s for the frozen ones), ``slot``
    ``[L]`` (or ``[]`` once a layer is picked). The two halves keep their own leading axis whatever is indexed:
    indexing the layer axis indexes ``slot``, the expert axis indexes both halves."""

    master: jax.Array
    master_scales: jax.Array
    packed: jax.Array
    scales: jax.Array
    slot: jax.Array
    grid: Grid = dataclasses.field(metadata=dict(static=True))
    mode: str = dataclasses.field(metadata=dict(static=True))
    layers: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.slot.shape) + tuple(self.master.shape[1:])

    def leaf_axes(self, axes: tuple[str | None, ...]) -> SubsetFakeQuantArray:
        """Per-leaf logical axes: both halves take the weight's axes (their stack axis the layer axis's name, or
        unnamed once a layer is picked), ``slot`` the layer axis."""
        from k25jax.quant import int4_axes

        axes = tuple(axes)
        full = axes if self.slot.ndim else (None, *axes)
        packed_axes, scale_axes = int4_axes(full)
        return SubsetFakeQuantArray(
            full,
            scale_axes,
            packed_axes,
            scale_axes,
            full[:1] if self.slot.ndim else (),
            self.grid,
            self.mode,
            self.layers,
        )

    def __getitem__(self, index) -> SubsetFakeQuantArray:
        """Index leading axes: the layer axis (while there is one) picks slots, the rest index both halves."""
        index = self.leading_index(index)
        slot, rest = (self.slot[index[0]], index[1:]) if self.slot.ndim else (self.slot, index)
        inner = (slice(None), *rest)
        return SubsetFakeQuantArray(
            self.master[inner],
            self.master_scales[inner],
            self.packed[inner],
            self.scales[inner],
            slot,
            self.grid,
            self.mode,
            self.layers,
        )

    def index_layer(self, layer: jax.Array) -> SubsetFakeQuantArray:
        """Layer ``layer`` (traced) of the stack: what the grouped path takes from a layer-stacked weight."""
        return self[layer]

    def _layer(self, slot: jax.Array, dtype) -> jax.Array:
        def trained():
            i = jnp.maximum(slot, 0)
            return FakeQuantArray(self.master[i], self.master_scales[i], self.grid, self.mode).dequantize(dtype)

        def frozen():
            i = jnp.maximum(-1 - slot, 0)
            return int4_layout.dequantize_device(self.packed[i], self.scales[i], dtype)

        return jax.lax.cond(slot >= 0, trained, frozen)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight in ``dtype``: per layer, ``W_fq`` of its master (gradient straight through to it) or the
        dequantized INT4 words."""
        dtype = jnp.dtype(dtype)
        if self.slot.ndim == 0:
            return self._layer(self.slot, dtype)
        return jax.lax.map(lambda s: self._layer(s, dtype), self.slot.reshape(-1)).reshape(self.shape)

    def grouped_matmul(self, rows: jax.Array, group_sizes: jax.Array, *, impl: str = "xla") -> jax.Array:
        """One layer's experts ``[E, K, N]`` (as :meth:`FakeQuantArray.grouped_matmul`)."""
        w = self.dequantize(rows.dtype)
        return jax.lax.ragged_dot(
            rows, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32, precision=precision(rows.dtype)
        )

    def to_int4(self):
        """The whole stack as one INT4 weight (what export writes): the trained layers' ``q`` and current scales,
        the frozen layers' words and scales untouched."""
        if self.slot.ndim != 1:
            raise ValueError("SubsetFakeQuantArray.to_int4: needs the whole layer stack, got one layer")
        count = int(self.slot.shape[0])
        trained = FakeQuantArray(self.master, self.master_scales, self.grid, self.mode).to_int4()
        frozen = [i for i in range(count) if i not in self.layers]
        order = jnp.asarray(list(self.layers) + frozen)
        inverse = jnp.argsort(order)
        packed = jnp.concatenate([trained.packed, self.packed.astype(trained.packed.dtype)])[inverse]
        scales = jnp.concatenate([trained.scales, self.scales.astype(trained.scales.dtype)])[inverse]
        return Int4Array(packed, scales)


def layer_slots(count: int, layers) -> tuple[tuple[int, ...], jax.Array]:
    """``(sorted layers, slot [count])`` for training ``layers`` of a stack of ``count`` (checked)."""
    chosen = tuple(sorted({int(i) for i in layers}))
    if not chosen or chosen[0] < 0 or chosen[-1] >= count:
        raise ValueError(f"layers {list(layers)}: expected a non-empty set of layers in 0..{count - 1}")
    slot, t, f = [], 0, 0
    for i in range(count):
        if i in chosen:
            slot.append(t)
            t += 1
        else:
            slot.append(-1 - f)
            f += 1
    return chosen, jnp.asarray(slot, jnp.int32)


class SubsetFakeQuantWeight(WeightModule):
    """A :class:`SubsetFakeQuantArray` in a model: ``master`` (:class:`SubsetMaster`, trainable), its scales
    (frozen / dynamic: :class:`SubsetQuantScale`; learned: :class:`SubsetLearnedScale`), the frozen layers'
    ``packed`` / ``scales`` (INT4 parameter types, never trained) and ``slot`` (:class:`LayerSlot`)."""

    def __init__(
        self, value: SubsetFakeQuantArray, axes: tuple[str | None, ...], *, what: str = "SubsetFakeQuantWeight"
    ):
        check_axes(tuple(axes), value.shape, what)
        if value.mode not in SCALE_MODES:
            raise ValueError(f"{what}: scale mode {value.mode!r} is not one of {SCALE_MODES}")
        if value.slot.ndim != 1:
            raise ValueError(f"{what}: a layer-subset weight needs a layer axis, got shape {value.shape}")
        leaf = value.leaf_axes(tuple(axes))
        self.grid = value.grid
        self.mode = value.mode
        self.layers = value.layers
        self.master = SubsetMaster(value.master, out_sharding=leaf.master, eager_sharding=False)
        scale_type = SubsetLearnedScale if value.mode == "learned" else SubsetQuantScale
        self.master_scales = scale_type(value.master_scales, out_sharding=leaf.master_scales, eager_sharding=False)
        self.packed = SubsetPacked(value.packed, out_sharding=leaf.packed, eager_sharding=False)
        self.scales = SubsetScales(value.scales, out_sharding=leaf.scales, eager_sharding=False)
        self.slot = LayerSlot(value.slot, out_sharding=leaf.slot, eager_sharding=False)

    def value(self) -> SubsetFakeQuantArray:
        read = self.read
        return SubsetFakeQuantArray(
            read(self.master),
            read(self.master_scales),
            read(self.packed),
            read(self.scales),
            read(self.slot),
            self.grid,
            self.mode,
            self.layers,
        )
