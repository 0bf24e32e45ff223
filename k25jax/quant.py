"""INT4 weights: the release packing, the on-device INT4 type, quantize and dequantize.

Three families, named by the layout they work in:

- ``*_release`` (here, numpy, host side): the release layout ``[O, I/8]`` words of offset-binary nibbles along the
  input axis: :func:`unpack_release`, :func:`pack_release`, :func:`quantize_release`, :func:`dequantize_release`;
- ``*_device`` (:mod:`pallas_kernels.int4_layout`, jnp): the kernels' K-major two's-complement layout
  ``[..., K/8, N]``: ``unpack_device``, ``pack_device``, ``quantize_device``, ``dequantize_device``;
- the :class:`Int4Array` value type (device layout): ``Int4Array.from_float``, ``.dequantize``,
  ``.from_release`` / ``.to_release`` (the exact conversion between the two layouts).

Release packing (``shared/docs/k25-architecture.md`` section 4): a weight ``W [O, I]`` is stored as
``weight_packed int32 [O, I/8]`` and ``weight_scale [O, I/group]``. Value ``q`` in [-8, 7] is stored as the
nibble ``u = q + 8``; input column ``k`` lives in word ``k // 8`` at bits ``4 * (k % 8)`` (low nibble first).
``W[o, k] = (u - 8) * scale[o, k // group]``. Quantizing uses ``scale = max|w_group| / 7.5`` and
``q = clamp(round(w / scale), -8, 7)``. The numpy helpers below serve the loader and converters.

On device (the kernels' layout, :mod:`pallas_kernels.int4_layout`) the same weight, transposed to the
``[in, out] = [K, N]`` the math uses, is ``packed int32 [..., K/8, N]`` (K-major, two's-complement nibbles)
plus ``scales [..., K/32, 1, N]``: 0.5 bytes per value plus a bf16 scale per 32 (0.5625 bytes in all).
:func:`release_to_device` / :func:`device_to_release` convert exactly, both ways (a transpose and an XOR).

Two types carry it:

- :class:`Int4Array`: a registered pytree of the two plain arrays, the *value* the math and the kernels take.
  Its leaves are ordinary arrays, so it passes through ``jax.jit``, ``jax.lax.scan`` (slicing a leading layer
  axis), ``jax.eval_shape`` and ``jax.device_put`` (one sharding per leaf) untouched.
- :class:`Int4Weight`: how the weight sits in a model, an ``nnx.Module`` holding the two arrays as two
  parameters (:class:`Int4Packed`, :class:`Int4Scales`, both ``nnx.Param``), each with its own logical axes.
  Two parameters rather than one parameter holding a pytree because Flax and the sharding code attach one
  ``out_sharding`` tuple per variable, and the two arrays differ in rank. ``weight[...]`` returns the
  :class:`Int4Array`, as ``param[...]`` returns an array.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax.sharding import check_axes
from k25jax.transpose import transpose2d
from pallas_kernels import int4_layout
from pallas_kernels.int4_gmm.ops import int4_gmm

GROUP = int4_layout.GROUP
SCALE_DTYPE = jnp.bfloat16  # the release's scale dtype; wider scales would exceed 0.57 bytes per value

NIBBLES_PER_WORD = 8
QMIN, QMAX = -8, 7


def unpack_release(packed: np.ndarray, in_features: int) -> np.ndarray:
    """``int32 [..., I/8]`` release words -> ``int8 [..., I]`` values in [-8, 7]."""
    if packed.dtype != np.int32:
        raise ValueError(f"packed INT4 words must be int32, got {packed.dtype}")
    words = packed.view(np.uint32)
    shifts = 4 * np.arange(NIBBLES_PER_WORD, dtype=np.uint32)
    nibbles = (words[..., :, None] >> shifts) & np.uint32(0xF)
    values = nibbles.reshape(*packed.shape[:-1], packed.shape[-1] * NIBBLES_PER_WORD)[..., :in_features]
    return (values.astype(np.int8) - np.int8(8)).astype(np.int8)


def pack_release(values: np.ndarray) -> np.ndarray:
    """``int8 [..., I]`` values in [-8, 7] -> ``int32 [..., ceil(I/8)]`` release words."""
    if values.size and (values.min() < QMIN or values.max() > QMAX):
        raise ValueError(f"INT4 values must lie in [{QMIN}, {QMAX}], got [{values.min()}, {values.max()}]")
    in_features = values.shape[-1]
    pad = (-in_features) % NIBBLES_PER_WORD
    u = (values.astype(np.int32) + 8).astype(np.uint32)
    if pad:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], pad), np.uint32)], axis=-1)
    u = u.reshape(*u.shape[:-1], -1, NIBBLES_PER_WORD)
    shifts = 4 * np.arange(NIBBLES_PER_WORD, dtype=np.uint32)
    words = np.bitwise_or.reduce(u << shifts, axis=-1)
    return words.astype(np.uint32).view(np.int32)


def dequantize_release(values: np.ndarray, scale: np.ndarray, group_size: int, dtype=np.float32) -> np.ndarray:
    """``int8 values [..., I]`` and ``scale [..., I/group]`` -> ``W [..., I]`` (computed in float32)."""
    s = np.repeat(scale.astype(np.float32), group_size, axis=-1)[..., : values.shape[-1]]
    return (values.astype(np.float32) * s).astype(dtype)


def quantize_release(w: np.ndarray, group_size: int, scale_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric group quantization of ``w [..., I]`` -> ``(int8 values [..., I], scale [..., I/group])``.

    ``scale = max|w_group| / 7.5`` (rounded to ``scale_dtype``, default ``w.dtype``), ``q = clamp(round(w/scale))``.
    """
    if w.shape[-1] % group_size:
        raise ValueError(f"input width {w.shape[-1]} is not a multiple of the group size {group_size}")
    scale_dtype = scale_dtype or w.dtype
    wf = w.astype(np.float32).reshape(*w.shape[:-1], -1, group_size)
    scale = (np.abs(wf).max(-1) / 7.5).astype(scale_dtype)
    sf = scale.astype(np.float32)
    safe = np.where(sf == 0, 1.0, sf)
    q = np.clip(np.round(wf / safe[..., None]), QMIN, QMAX).astype(np.int8)
    return q.reshape(w.shape), scale


# --- release <-> device (host side, numpy) -------------------------------------------------------------------

_FLIP = np.uint32(0x88888888)  # offset-binary nibble u = q + 8  <->  two's-complement nibble q & 0xF


def flip_nibbles(packed: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Offset-binary nibbles (release) <-> two's-complement nibbles (device), word by word; its own inverse."""
    if packed.dtype != np.int32:
        raise ValueError(f"packed INT4 words must be int32, got {packed.dtype}")
    words = packed.view(np.uint32)
    return np.bitwise_xor(words, _FLIP, out=words if inplace else None).view(np.int32)


def words_to_device(packed: np.ndarray) -> np.ndarray:
    """Release ``weight_packed int32 [O, I/8]`` -> device ``packed int32 [I/8, O]`` (transpose + nibble flip)."""
    return flip_nibbles(transpose2d(packed), inplace=True)


def scales_to_device(scale: np.ndarray) -> np.ndarray:
    """Release ``weight_scale [O, G]`` -> device ``scales [G, 1, O]``."""
    return transpose2d(scale)[:, None, :]


def words_to_release(packed: np.ndarray) -> np.ndarray:
    """The inverse of :func:`words_to_device`."""
    return flip_nibbles(transpose2d(np.asarray(packed)), inplace=True)


def scales_to_release(scales: np.ndarray) -> np.ndarray:
    """The inverse of :func:`scales_to_device`."""
    return transpose2d(np.asarray(scales)[:, 0, :])


def release_to_device(packed: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Release ``weight_packed int32 [O, I/8]`` and ``weight_scale [O, I/32]`` -> device ``packed int32 [I/8, O]``
    and ``scales [I/32, 1, O]`` (same dtype as ``scale``). Exact; ``I`` must be a multiple of 32."""
    if packed.dtype != np.int32:
        raise ValueError(f"packed INT4 words must be int32, got {packed.dtype}")
    out_dim, words = packed.shape
    if scale.shape != (out_dim, words * NIBBLES_PER_WORD // GROUP) or words * NIBBLES_PER_WORD % GROUP:
        raise ValueError(f"INT4 scales of shape {list(scale.shape)} do not fit packed words {list(packed.shape)}")
    return words_to_device(packed), scales_to_device(scale)


def device_to_release(packed: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`release_to_device`."""
    packed = np.asarray(packed)
    if packed.dtype != np.int32:
        raise ValueError(f"packed INT4 words must be int32, got {packed.dtype}")
    return words_to_release(packed), scales_to_release(scales)


# --- the on-device type -----------------------------------------------------------------------------------------


class WeightValue:
    """What every weight value type the expert op takes shares (:class:`Int4Array`, the QAT fake-quant and LoRA
    types): ``ndim`` from ``shape``, and indexing of the leading (layer, expert) axes only."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def leading_index(self, index) -> tuple:
        """``index`` as a tuple over leading axes; the last two (``K``, ``N``) are not indexable."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.ndim - 2 or any(i is Ellipsis or i is None for i in index):
            raise IndexError(
                f"{type(self).__name__} of shape {self.shape}: only its leading axes can be indexed, got {index}"
            )
        return index


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Array(WeightValue):
    """An INT4 weight ``W [..., K, N]``: ``packed int32 [..., K/8, N]`` and ``scales [..., K/32, 1, N]``.

    ``W[..., k, n] = q[..., k, n] * scales[..., k // 32, 0, n]`` with ``q`` the signed nibble ``k % 8`` of word
    ``k // 8`` (layout: :mod:`pallas_kernels.int4_layout`). Leading axes (layers, experts) index both leaves.
    """

    packed: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (unpacked) shape ``[..., K, N]``."""
        return int4_layout.logical_shape(tuple(self.packed.shape))

    @property
    def size(self) -> int:
        """Logical element count."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the two arrays (``0.5 + itemsize(scales) / 32`` per logical element)."""
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in (self.packed, self.scales))

    def __getitem__(self, index) -> Int4Array:
        """Index leading (layer / expert) axes: ``w[3]``, ``w[:, 0]``. The last two axes are not indexable."""
        index = self.leading_index(index)
        return Int4Array(self.packed[index], self.scales[index])

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight ``[..., K, N]`` in ``dtype`` (``q * scale`` in float32, then cast)."""
        return int4_layout.dequantize_device(self.packed, self.scales, dtype)

    def leaf_axes(self, axes: tuple[str | None, ...]) -> Int4Array:
        """The logical axes of each leaf for a weight of logical ``axes`` (same structure, tuples as leaves): what
        expert parallelism builds its per-leaf ``PartitionSpec`` from."""
        return Int4Array(*int4_axes(tuple(axes)))

    def grouped_matmul(self, rows: jax.Array, group_sizes: jax.Array, *, impl: str = "xla") -> jax.Array:
        """Experts ``[E, K, N]``: ``rows [M, K]`` sorted by expert (``group_sizes [E]``) times their expert ->
        ``[M, N]`` float32, the weights staying packed (``int4_gmm``, ``impl`` as :mod:`pallas_kernels.dispatch`).
        The method :func:`pallas_kernels.grouped_swiglu.grouped_swiglu` calls on a weight value type."""
        return int4_gmm(rows, self.packed, self.scales, group_sizes, impl=impl, out_dtype=jnp.float32)

    @classmethod
    def from_float(cls, w: jax.Array, scale_dtype=SCALE_DTYPE) -> Int4Array:
        """Group-32 symmetric quantization of ``w [..., K, N]`` along K (the release rule)."""
        return cls(*int4_layout.quantize_device(w, scale_dtype))

    @classmethod
    def from_release(cls, packed: np.ndarray, scale: np.ndarray) -> Int4Array:
        """From a release ``weight_packed [O, I/8]`` / ``weight_scale [O, I/32]`` pair (``W [I, O]`` on device)."""
        p, s = release_to_device(np.asarray(packed), np.asarray(scale))
        return cls(jnp.asarray(p), jnp.asarray(s))

    def to_release(self) -> tuple[np.ndarray, np.ndarray]:
        """Back to the release pair ``(weight_packed int32 [O, I/8], weight_scale [O, I/32])``, bit-exact."""
        if self.ndim != 2:
            raise ValueError(f"to_release converts one [K, N] weight at a time, got shape {self.shape}")
        return device_to_release(np.asarray(self.packed), np.asarray(self.scales))


def int4_axes(axes: tuple[str | None, ...]) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    """Logical axes of a weight ``[..., K, N]`` -> those of ``packed [..., K/8, N]`` and ``scales [..., K/32, 1, N]``.

    The group axis of the scales takes K's name so that sharding K splits values and scales alike.
    """
    return tuple(axes), (*axes[:-1], None, axes[-1])


def kept_whole(path, value) -> bool:
    """An nnx filter: variables a layer scan passes whole to every layer instead of slicing (their type sets
    ``whole_stack = True``): the two halves of a layer-subset fake-quant weight, whose leading axes are not the
    stack's (``k25jax.train.fakequant.SubsetFakeQuantWeight``)."""
    return bool(getattr(type(value), "whole_stack", False))


class Int4Packed(nnx.Param):
    """The packed int32 words of an :class:`Int4Weight`; counts as 8 parameters per word."""

    @property
    def logical_size(self) -> int:
        return math.prod(self.shape) * int4_layout.PACK


class Int4Scales(nnx.Param):
    """The group scales of an :class:`Int4Weight`; not counted as parameters (the release does not)."""

    @property
    def logical_size(self) -> int:
        return 0


class WeightModule(nnx.Module):
    """How a weight value type sits in a model: ``weight[...]`` is the value (:meth:`value`, a :class:`WeightValue`),
    ``weight.shape`` its logical shape; the parameters themselves are the module's variables."""

    def value(self) -> WeightValue:
        raise NotImplementedError

    @staticmethod
    def read(part):
        """A variable's value (also on an abstract model, whose leaves are ``ShapeDtypeStruct``s), or a nested
        weight module's value."""
        return part.get_value() if isinstance(part, nnx.Variable) else part.value()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value().shape)

    def __getitem__(self, index) -> WeightValue:
        if index is not Ellipsis:
            value = type(self).__name__.replace("Weight", "Array")
            raise IndexError(f"{type(self).__name__}: use weight[...] for its {value} value (then index that)")
        return self.value()


class Int4Weight(WeightModule):
    """An INT4 weight parameter of logical shape ``[..., K, N]`` with logical ``axes`` (one per logical dim).

    ``weight[...]`` is the :class:`Int4Array` value; ``weight.shape`` the logical shape. Build one from
    arrays, or with :meth:`from_float` (quantizing); loaders overwrite both arrays in place.
    """

    def __init__(self, value: Int4Array, axes: tuple[str | None, ...], *, what: str = "Int4Weight"):
        check_axes(tuple(axes), value.shape, what)
        packed_axes, scale_axes = int4_axes(tuple(axes))
        self.packed = Int4Packed(value.packed, out_sharding=packed_axes, eager_sharding=False)
        self.scales = Int4Scales(value.scales, out_sharding=scale_axes, eager_sharding=False)

    @classmethod
    def from_float(
        cls, w: jax.Array, axes: tuple[str | None, ...], *, scale_dtype=SCALE_DTYPE, what: str = "Int4Weight"
    ) -> Int4Weight:
        """Quantize ``w [..., K, N]`` (group 32 along K, the release rule)."""
        if w.ndim < 2 or w.shape[-2] % GROUP:
            raise ValueError(f"{what}: INT4 weights need shape [..., K, N] with K a multiple of {GROUP}, got {w.shape}")
        return cls(Int4Array.from_float(w, scale_dtype), axes, what=what)

    def value(self) -> Int4Array:
        return Int4Array(self.read(self.packed), self.read(self.scales))
