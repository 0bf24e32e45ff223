"""Preparing a model for INT4 QAT and back: routed experts to fake-quant weights, trainable subsets, export.

:func:`to_fake_quant` replaces the routed experts chosen by a path pattern with
:class:`~k25jax.train.fakequant.FakeQuantWeight` (masters: the exact dequantization of the INT4 values, in
float32 or bf16; scales: the checkpoint's). Experts not chosen stay :class:`~k25jax.quant.Int4Weight`, packed, with
no float copy. :func:`trainable_filter` selects the parameters the optimizer updates (by path pattern); frozen
INT4 words, scales and the router's correction bias are never among them. :func:`to_int4` turns the fake-quant
weights back into INT4 ones (``q`` and the scales the forward used), which the release exporter writes as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax.moe import Experts
from k25jax.quant import Int4Packed, Int4Scales, Int4Weight
from k25jax.train.fakequant import (
    SCALE_MODES,
    FakeQuantArray,
    FakeQuantWeight,
    QuantScale,
    SubsetFakeQuantArray,
    SubsetFakeQuantWeight,
    grid_of,
    group_scales,
    layer_slots,
    quantize_int4,
)


class QATError(ValueError):
    """A QAT setting that cannot apply to this model (the message names the setting)."""


def module_path(path: tuple) -> str:
    """``('text', 'moe_layers', 'mlp', 'experts')`` -> ``"text/moe_layers/mlp/experts"``."""
    return "/".join(str(p) for p in path)


@dataclass
class FakeQuantReport:
    """What :func:`to_fake_quant` converted."""

    converted: list[str] = field(default_factory=list)  # weight paths now fake-quant
    kept_int4: list[str] = field(default_factory=list)  # routed-expert weights left packed


def expert_weights(model: nnx.Module):
    """``(module, name, where, weight, axes)`` for every routed-expert weight of ``model`` (``where`` its path,
    ``axes`` its logical axes, whatever type holds it: float ``nnx.Param``, INT4, fake-quant, or LoRA)."""
    for path, module in list(nnx.iter_modules(model)):
        if not isinstance(module, Experts):
            continue
        for name in Experts.WEIGHTS:
            weight = getattr(module, name)
            yield module, name, f"{module_path(path)}/{name}", weight, weight_axes(weight)


def chosen_experts(model: nnx.Module, trainable: str) -> list[str]:
    """The routed-expert weight paths a run with the trainable pattern ``trainable`` trains: those whose master path
    (``PATH/master``, where the fake-quant master lives) the regex matches. The trainer converts these (fake-quant
    under QAT, float under PTQ) and the planner counts them, so both read the pattern one way."""
    regex = re.compile(trainable)
    return [where for _, _, where, _, _ in expert_weights(model) if regex.search(f"{where}/master")]


def exact_paths(paths) -> str:
    """A regex matching exactly ``paths`` (for :func:`to_fake_quant` / :func:`to_float_experts` ``experts=``)."""
    return "|".join("^" + re.escape(p) + "$" for p in paths)


def weight_axes(weight) -> tuple:
    """The logical axes of an expert weight, whatever type holds it."""
    if isinstance(weight, nnx.Param):
        return tuple(weight.get_metadata()["out_sharding"])
    for holder in ("packed", "master", "base"):
        if hasattr(weight, holder):
            return weight_axes(getattr(weight, holder))
    raise QATError(f"an expert weight of type {type(weight).__name__} has no logical axes")


def float_value(weight, dtype=jnp.float32) -> jax.Array:
    """The weight's current value in ``dtype``: INT4 and fake-quant dequantized, LoRA merged (no rounding)."""
    if isinstance(weight, nnx.Param):
        return weight[...].astype(dtype)
    return weight[...].dequantize(jnp.dtype(dtype))


def to_fake_quant(
    model: nnx.Module,
    *,
    experts: str = r".*",
    grid: str = "kimi",
    scales: str = "dynamic",
    master_dtype="float32",
    layers=None,
) -> FakeQuantReport:
    """Replace, in place, the routed-expert weights whose path matches ``experts`` (a regex searched in
    ``"text/moe_layers/mlp/experts/gate_proj"``-style paths) by fake-quant weights on ``grid`` with ``scales`` mode.

    INT4 experts: masters ``q * s`` (exact in float32; in bf16 ``q * s`` rounds, see the README) and the stored
    scales. Plain (float) experts: masters are the weights and scales are computed on ``grid``.

    ``layers``: indices into the layer stack (the MoE layers, ``0 <= i < num_moe_layers``) whose experts become
    fake-quant; the other layers stay INT4-packed (plain float experts are quantized on ``grid`` there) with no
    float copy (:class:`~k25jax.train.fakequant.SubsetFakeQuantWeight`). ``None`` (or every layer): the whole
    stack as one :class:`~k25jax.train.fakequant.FakeQuantWeight`.
    """
    if scales not in SCALE_MODES:
        raise QATError(f"--qat-scales {scales!r} is not one of {SCALE_MODES}")
    the_grid = grid_of(grid)
    pattern = re.compile(experts)
    report = FakeQuantReport()
    for module, name, where, weight, axes in expert_weights(model):
        if isinstance(weight, FakeQuantWeight | SubsetFakeQuantWeight):
            raise QATError(f"{where} is already a fake-quant weight")
        if not pattern.search(where):
            if isinstance(weight, Int4Weight):
                report.kept_int4.append(where)
            continue
        if layers is not None and not _every_layer(weight, layers):
            setattr(module, name, _subset_fake_quant(weight, axes, where, layers, the_grid, scales, master_dtype))
            report.converted.append(where)
            continue
        masters = float_value(weight, master_dtype)
        group = weight[...].scales if isinstance(weight, Int4Weight) else group_scales(masters, the_grid)
        fake = FakeQuantArray(masters, group, the_grid, scales)
        setattr(module, name, FakeQuantWeight(fake, axes, what=where))
        report.converted.append(where)
    return report


def _every_layer(weight, layers) -> bool:
    """Whether ``layers`` names every layer of ``weight``'s stack (then the whole-stack conversion is the same)."""
    shape = tuple(weight.shape)
    return len(shape) == 4 and sorted({int(i) for i in layers}) == list(range(shape[0]))


def _subset_fake_quant(weight, axes, where, layers, grid, scales, master_dtype) -> SubsetFakeQuantWeight:
    """``weight`` (INT4 or float, ``[L, E, K, N]``) fake-quant on ``layers`` of its stack, INT4 on the others."""
    shape = tuple(weight.shape)
    if len(shape) != 4:
        raise QATError(f"--train-layers: {where} has no layer axis (shape {shape}); only stacked experts have layers")
    try:
        chosen, slot = layer_slots(shape[0], layers)
    except ValueError as e:
        raise QATError(f"--train-layers: {where}: {e}") from None
    trained = jnp.asarray(chosen)
    frozen = jnp.asarray([i for i in range(shape[0]) if i not in chosen], jnp.int32)
    if isinstance(weight, Int4Weight):
        value = weight[...]
        masters = value[trained].dequantize(jnp.dtype(master_dtype))
        group = value.scales[trained]
        rest = value[frozen]
    elif isinstance(weight, nnx.Param):
        w = weight[...]
        masters = w[trained].astype(master_dtype)
        group = group_scales(masters, grid)
        rest = quantize_int4(w[frozen], grid)
    else:
        raise QATError(f"--train-layers: {where} is a {type(weight).__name__}; expected INT4 or float experts")
    value = SubsetFakeQuantArray(masters, group, rest.packed, rest.scales, slot, grid, scales, chosen)
    return SubsetFakeQuantWeight(value, axes, what=where)


def to_int4(model: nnx.Module) -> list[str]:
    """Replace, in place, every fake-quant weight by the INT4 weight it stands for (``q`` and the scales its forward
    uses), so the model is an INT4 model again (and exports as a release). Returns the converted paths."""
    done = []
    for module, name, where, weight, axes in expert_weights(model):
        if isinstance(weight, FakeQuantWeight | SubsetFakeQuantWeight):
            setattr(module, name, Int4Weight(weight[...].to_int4(), axes, what=where))
            done.append(where)
    return done


def quantize_experts(model: nnx.Module, grid: str = "kimi", *, float_only: bool = False) -> list[str]:
    """Re-quantize, in place, every routed-expert weight on ``grid`` from its current value (a float weight, or the
    dequantized INT4 one): e.g. to make a ``kimi``-grid model from a randomly initialised one. ``float_only``: only
    the plain float weights (post-training quantization after a float fine-tune; INT4 ones stay as they are).
    Returns the paths."""
    done = []
    for module, name, where, weight, axes in expert_weights(model):
        if float_only and not isinstance(weight, nnx.Param):
            continue
        setattr(module, name, Int4Weight(quantize_int4(float_value(weight), grid), axes, what=where))
        done.append(where)
    return done


def to_float_experts(model: nnx.Module, dtype="float32", *, experts: str = r".*") -> list[str]:
    """Replace, in place, the INT4 and fake-quant expert weights whose path matches ``experts`` by plain float
    parameters (their dequantized values): the starting point of a float fine-tune that is quantized afterwards
    (post-training quantization)."""
    pattern = re.compile(experts)
    done = []
    for module, name, where, weight, axes in expert_weights(model):
        if isinstance(weight, Int4Weight | FakeQuantWeight | SubsetFakeQuantWeight) and pattern.search(where):
            setattr(module, name, nnx.Param(float_value(weight, dtype), out_sharding=axes, eager_sharding=False))
            done.append(where)
    return done


FROZEN_TYPES = (Int4Packed, Int4Scales, QuantScale)
ROUTER_BIAS = "correction_bias"


def trainable_filter(pattern: str = r".*", *, train_router_bias: bool = False):
    """An nnx filter of the parameters to train: float ``nnx.Param`` leaves whose path (``"text/moe_layers/attn/
    q_a_proj"``-style, fake-quant masters ending in ``/master``) matches ``pattern``. Never INT4 words or scales,
    frozen QAT scales, nor (unless asked) the router's correction bias."""
    regex = re.compile(pattern)

    def accept(path, value) -> bool:
        if not isinstance(value, nnx.Param) or isinstance(value, FROZEN_TYPES):
            return False
        where = module_path(path)
        if where.endswith(ROUTER_BIAS) and not train_router_bias:
            return False
        return bool(regex.search(where)) and jnp.issubdtype(value.dtype, jnp.floating)

    return accept


def trainable_paths(model: nnx.Module, flt) -> list[str]:
    """The paths the filter selects (for reports, and to reject a pattern that matches nothing)."""
    return [module_path(p) for p, _ in nnx.to_flat_state(nnx.state(model, flt))]
