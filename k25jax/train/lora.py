"""LoRA on frozen routed experts: adapters beside an INT4 base that stays packed, with no float copy of it.

``W_eff = W + a @ b * scale`` per expert, ``a [..., K, r]``, ``b [..., r, N]`` (a leading layer and expert axis
for the routed experts: every expert has its own rank-``r`` pair), ``scale = alpha / r``. ``b`` starts at zero, so
at step 0 the model is its base bit for bit (the adapter term is exact zeros).

:class:`LoRAArray` is the value the expert op consumes (a pytree: the base value, ``a`` and ``b``; ``alpha``
static), with the methods :func:`pallas_kernels.grouped_swiglu.grouped_swiglu` calls on a weight type:

- ``grouped_matmul`` (the ``"grouped"`` strategy): ``base.grouped_matmul(rows) + ragged_dot(ragged_dot(rows, a),
  b) * scale``, float32 accumulation; the base term is exactly what the base weight alone computes (``int4_gmm``
  for an INT4 base, weights packed), so the adapters never need the base in float;
- indexing of the leading (layer, expert) axes and ``dequantize(dtype)`` (the CPU scans ``"tiled"`` /
  ``"per_row"``): one expert's ``base.dequantize(float32) + a @ b * scale``, then cast, as those scans already do
  for one INT4 expert at a time.

:class:`LoRAWeight` is how it sits in a model: the base weight module untouched (``Int4Weight``, a fake-quant weight
or a plain ``nnx.Param``) as ``base``, and ``a``, ``b`` as :class:`LoRAParam` (an ``nnx.Param``) with the base's
logical axes (the rank axis unsharded). :func:`apply_lora` wraps the chosen experts, :func:`lora_filter` selects
only the adapters for the optimizer.

Export, two ways:

- :func:`merge_lora`: ``W' = dequantize(base) + a @ b * scale`` re-quantized on an INT4 grid
  (:func:`k25jax.train.fakequant.quantize_int4`) -> ``Int4Weight``; the release exporter writes the result. Not
  exact: the adapter's delta is rounded onto the INT4 grid (README, "LoRA on the INT4 base", for measured numbers).
- :func:`save_adapters` / :func:`load_adapters`: the adapters beside the untouched release, re-applied to a loaded
  release model: bit for bit the trained LoRA model. Files (one directory):

  - ``adapters.safetensors``: per target ``<path>.a`` ``[..., K, r]`` and ``<path>.b`` ``[..., r, N]``, with
    ``<path>`` the k25jax weight path, dots for slashes (``text.moe_layers.mlp.experts.gate_proj.a``), in the math
    layout (``x @ a @ b``; layer-stacked ``[L, E, ...]`` as the model holds them; not PEFT's ``lora_A [r, in]``);
  - ``adapter_config.json``: ``{"format": "k25jax-lora", "version": 1, "rank", "alpha", "scale", "targets",
    "tensors": {name: {"shape", "dtype"}}}`` (and ``"base_model"`` when the writer names it).

  :func:`strip_lora` puts the bases back (the model the untouched release holds).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax.moe import Experts
from k25jax.quant import Int4Array, Int4Weight, WeightModule, WeightValue
from k25jax.sharding import check_axes
from k25jax.train.fakequant import FakeQuantWeight, quantize_int4
from k25jax.train.qat import module_path
from pallas_kernels import int4_layout
from pallas_kernels.grouped_swiglu import reference as swiglu_reference
from pallas_kernels.int4_matmul.reference import precision

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "k25jax-lora"
VERSION = 1


class LoRAError(ValueError):
    """A LoRA setting or adapter file that does not fit this model (the message names the setting or tensor)."""


def _dequantize(value, dtype) -> jax.Array:
    method = getattr(value, "dequantize", None)
    return method(dtype) if method is not None else value.astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAArray(WeightValue):
    """A weight value ``W + a @ b * (alpha / r)`` of shape ``[..., K, N]``: ``base`` a plain array or a weight value
    type (:class:`~k25jax.quant.Int4Array`, ...), ``a [..., K, r]``, ``b [..., r, N]`` (same leading axes)."""

    base: Any
    a: jax.Array
    b: jax.Array
    alpha: float = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def leaf_axes(self, axes: tuple[str | None, ...]) -> LoRAArray:
        """Per-leaf logical axes: the base's own, ``a [..., K, r]`` and ``b [..., r, N]`` with the rank unsharded."""
        axes = tuple(axes)
        base = self.base.leaf_axes(axes) if hasattr(self.base, "leaf_axes") else axes
        return LoRAArray(base, (*axes[:-1], None), (*axes[:-2], None, axes[-1]), self.alpha)

    def __getitem__(self, index) -> LoRAArray:
        """Index leading (layer / expert) axes, as :class:`~k25jax.quant.Int4Array` does."""
        index = self.leading_index(index)
        return LoRAArray(self.base[index], self.a[index], self.b[index], self.alpha)

    def delta(self) -> jax.Array:
        """``a @ b * scale`` ``[..., K, N]`` in float32."""
        ab = jnp.einsum(
            "...kr,...rn->...kn",
            self.a.astype(jnp.float32),
            self.b.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        return ab * jnp.float32(self.scale)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """``W + a @ b * scale`` in ``dtype`` (summed in float32, then cast; with ``b = 0`` exactly the base's
        ``dequantize(dtype)``)."""
        return (_dequantize(self.base, jnp.float32) + self.delta()).astype(dtype)

    def grouped_matmul(self, rows: jax.Array, group_sizes: jax.Array, *, impl: str = "xla") -> jax.Array:
        """Experts ``[E, K, N]``: ``rows [M, K]`` sorted by expert -> ``[M, N]`` float32, ``rows @ W_e`` as the base
        computes it (packed for INT4, ``impl`` as :mod:`pallas_kernels.dispatch`) plus ``(rows @ a_e) @ b_e * scale``
        (ragged dots in the rows' dtype, float32 accumulation, the rank-r hidden cast to the rows' dtype)."""
        dtype = rows.dtype
        base = swiglu_reference.grouped_matmul(rows, self.base, group_sizes, dtype=dtype, impl=impl)
        sizes = group_sizes.astype(jnp.int32)
        dot = dict(preferred_element_type=jnp.float32, precision=precision(dtype))
        low = jax.lax.ragged_dot(rows, self.a.astype(dtype), sizes, **dot).astype(dtype)
        return base + jax.lax.ragged_dot(low, self.b.astype(dtype), sizes, **dot) * jnp.float32(self.scale)


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix (``a`` or ``b``): what :func:`lora_filter` selects."""


def weight_axes(weight, what: str) -> tuple[str | None, ...]:
    """The logical axes ``[..., K, N]`` of an expert weight module (INT4, fake-quant or a plain parameter)."""
    if isinstance(weight, Int4Weight):
        var = weight.packed
    elif isinstance(weight, FakeQuantWeight):
        var = weight.master
    elif isinstance(weight, nnx.Variable):
        var = weight
    else:
        raise LoRAError(f"{what}: cannot put LoRA on a {type(weight).__name__}")
    return tuple(var.get_metadata()["out_sharding"])


class LoRAWeight(WeightModule):
    """A weight with LoRA adapters: ``base`` (the weight module as it was: INT4 words and scales untouched),
    ``a [..., K, r]`` and ``b [..., r, N]`` :class:`LoRAParam` s. ``weight[...]`` is the :class:`LoRAArray`."""

    def __init__(self, base, a: jax.Array, b: jax.Array, *, alpha: float, what: str = "LoRAWeight"):
        axes = weight_axes(base, what)
        shape = tuple(base.shape)
        *lead, k, n = shape
        r = a.shape[-1]
        if tuple(a.shape) != (*lead, k, r) or tuple(b.shape) != (*lead, r, n) or r < 1:
            raise LoRAError(f"{what}: adapters a {tuple(a.shape)}, b {tuple(b.shape)} do not fit the weight {shape}")
        a_axes, b_axes = (*axes[:-1], None), (*axes[:-2], None, axes[-1])
        check_axes(a_axes, a.shape, f"{what}.a")
        check_axes(b_axes, b.shape, f"{what}.b")
        self.base = base
        self.alpha = float(alpha)
        self.a = LoRAParam(a, out_sharding=a_axes, eager_sharding=False)
        self.b = LoRAParam(b, out_sharding=b_axes, eager_sharding=False)

    @classmethod
    def init(cls, base, *, rank: int, alpha: float, key: jax.Array, dtype=jnp.float32, what: str = "LoRAWeight"):
        """Fresh adapters: ``a ~ normal(0, 1 / K)``, ``b = 0`` (so the weight is its base, bit for bit)."""
        *lead, k, n = tuple(base.shape)
        a = (jax.random.normal(key, (*lead, k, rank), jnp.float32) / math.sqrt(k)).astype(dtype)
        return cls(base, a, jnp.zeros((*lead, rank, n), dtype), alpha=alpha, what=what)

    def value(self) -> LoRAArray:
        return LoRAArray(self.read(self.base), self.read(self.a), self.read(self.b), self.alpha)


@dataclasses.dataclass
class LoRAReport:
    """What :func:`apply_lora` / :func:`load_adapters` wrapped."""

    rank: int
    alpha: float
    targets: list[str] = dataclasses.field(default_factory=list)  # weight paths with adapters
    skipped: list[str] = dataclasses.field(default_factory=list)  # routed-expert weights left as they were
    adapter_params: int = 0
    adapter_bytes: int = 0


def _expert_weights(model: nnx.Module):
    """``(where, experts_module, name, weight)`` for every routed-expert weight."""
    for path, module in list(nnx.iter_modules(model)):
        if isinstance(module, Experts):
            for name in Experts.WEIGHTS:
                yield f"{module_path(path)}/{name}", module, name, getattr(module, name)


def _count(report: LoRAReport, lora: LoRAWeight) -> None:
    for p in (lora.a, lora.b):
        report.adapter_params += math.prod(p.shape)
        report.adapter_bytes += math.prod(p.shape) * jnp.dtype(p.dtype).itemsize


def apply_lora(
    model: nnx.Module,
    *,
    experts: str = r".*",
    rank: int = 8,
    alpha: float | None = None,
    seed: int = 0,
    param_dtype="float32",
) -> LoRAReport:
    """Wrap, in place, the routed-expert weights whose path matches ``experts`` (a regex searched in
    ``"text/moe_layers/mlp/experts/gate_proj"``-style paths) in :class:`LoRAWeight` s of per-expert rank ``rank``
    (``alpha`` default ``rank``: scale 1). The bases stay as they are (INT4 packed). Each target's ``a`` is drawn
    from ``seed`` and its path, so the pattern does not change another target's init."""
    if rank < 1:
        raise LoRAError(f"--lora-rank {rank}: must be at least 1")
    alpha = float(rank if alpha is None else alpha)
    pattern = re.compile(experts)
    dtype = jnp.dtype(param_dtype)
    report = LoRAReport(rank, alpha)
    key = jax.random.key(seed)
    for where, module, name, weight in _expert_weights(model):
        if isinstance(weight, LoRAWeight):
            raise LoRAError(f"{where} already has LoRA adapters")
        if not pattern.search(where):
            report.skipped.append(where)
            continue
        lora = LoRAWeight.init(
            weight,
            rank=rank,
            alpha=alpha,
            key=jax.random.fold_in(key, zlib.crc32(where.encode())),
            dtype=dtype,
            what=where,
        )
        setattr(module, name, lora)
        report.targets.append(where)
        _count(report, lora)
    if not report.targets:
        raise LoRAError(f"--lora-experts {experts!r} matches no routed-expert weight (skipped: {report.skipped})")
    return report


def lora_filter(pattern: str = r".*"):
    """An nnx filter of the adapter parameters (``a``, ``b``) whose path matches ``pattern``: nothing else (no
    base, INT4 word or scale, norm or router) is trained."""
    regex = re.compile(pattern)

    def accept(path, value) -> bool:
        return isinstance(value, LoRAParam) and bool(regex.search(module_path(path)))

    return accept


def strip_lora(model: nnx.Module) -> list[str]:
    """Put every :class:`LoRAWeight` 's base back in its place (the adapters are dropped): the model the untouched
    release holds. Returns the paths."""
    done = []
    for where, module, name, weight in _expert_weights(model):
        if isinstance(weight, LoRAWeight):
            setattr(module, name, weight.base)
            done.append(where)
    return done


@dataclasses.dataclass
class MergeReport:
    """What :func:`merge_lora` did: per weight path, the fraction of INT4 values ``q`` and of group scales that
    differ from the base's (INT4 bases only)."""

    grid: str | None
    merged: list[str] = dataclasses.field(default_factory=list)
    q_changed: dict[str, float] = dataclasses.field(default_factory=dict)
    scales_changed: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def q_changed_overall(self) -> float:
        return float(np.mean(list(self.q_changed.values()))) if self.q_changed else 0.0


def merge_lora(model: nnx.Module, grid: str | None = "kimi") -> MergeReport:
    """Replace, in place, every :class:`LoRAWeight` by its merged weight ``W' = dequantize(base) + a @ b * scale``
    (float32), re-quantized on ``grid`` (``"kimi"`` or ``"compressed-tensors"``, with new group scales:
    :func:`~k25jax.train.fakequant.quantize_int4`; an ``Int4Weight`` the release exporter writes) or, with
    ``grid=None``, kept as a float32 ``nnx.Param``. Not exact (module doc). Zero adapters on a kimi-grid base
    give the base back bit for bit (the grid's fixed point)."""
    report = MergeReport(grid)
    for where, module, name, weight in _expert_weights(model):
        if not isinstance(weight, LoRAWeight):
            continue
        axes = weight_axes(weight.base, where)
        value = weight[...]
        merged = value.dequantize(jnp.float32)
        if grid is None:
            setattr(module, name, nnx.Param(merged, out_sharding=axes, eager_sharding=False))
        else:
            quantized = quantize_int4(merged, grid)
            if isinstance(value.base, Int4Array):
                old, new = (int4_layout.unpack_device(v.packed) for v in (value.base, quantized))
                report.q_changed[where] = float(jnp.mean(old != new))
                report.scales_changed[where] = float(jnp.mean(value.base.scales != quantized.scales))
            setattr(module, name, Int4Weight(quantized, axes, what=where))
        report.merged.append(where)
    return report


# --- adapters beside the release ----------------------------------------------------------------------------------


def tensor_name(where: str, which: str) -> str:
    """``("text/moe_layers/mlp/experts/gate_proj", "a")`` -> ``"text.moe_layers.mlp.experts.gate_proj.a"``."""
    return f"{where.replace('/', '.')}.{which}"


def _atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then ``os.replace`` onto ``path``: a reader never sees a partial file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapters(model: nnx.Module, directory: str | os.PathLike, *, base_model: str | None = None) -> str:
    """Write the model's adapters (module doc: ``adapters.safetensors`` + ``adapter_config.json``) into
    ``directory`` (created if needed; the tensors first, the config last, each atomically). ``base_model``: the
    release they apply to, recorded in the config as ``"base_model"`` (informational). Returns the directory."""
    from safetensors.numpy import save_file

    loras = [(where, w) for where, _, _, w in _expert_weights(model) if isinstance(w, LoRAWeight)]
    if not loras:
        raise LoRAError("save_adapters: the model has no LoRA adapters")
    ranks, alphas = {int(w.a.shape[-1]) for _, w in loras}, {w.alpha for _, w in loras}
    if len(ranks) != 1 or len(alphas) != 1:
        raise LoRAError(f"save_adapters: one rank and alpha per file, got ranks {ranks}, alphas {alphas}")
    tensors = {}
    for where, w in loras:
        for which in ("a", "b"):
            tensors[tensor_name(where, which)] = np.ascontiguousarray(jax.device_get(getattr(w, which)[...]))
    rank, alpha = ranks.pop(), alphas.pop()
    config = {
        "format": FORMAT,
        "version": VERSION,
        "rank": rank,
        "alpha": alpha,
        "scale": alpha / rank,
        "targets": [where for where, _ in loras],
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
    }
    if base_model is not None:
        config["base_model"] = base_model
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    meta = {"format": FORMAT, "version": str(VERSION), "rank": str(rank), "alpha": repr(alpha)}
    _atomic_write(os.path.join(directory, ADAPTER_FILE), lambda p: save_file(tensors, p, metadata=meta))

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=1)
            f.write("\n")

    _atomic_write(os.path.join(directory, CONFIG_FILE), write_config)
    return directory


def load_adapters(model: nnx.Module, directory: str | os.PathLike) -> LoRAReport:
    """Re-apply, in place, the adapters of ``directory`` (:func:`save_adapters`) to ``model`` (e.g. a loaded
    release): its targets become :class:`LoRAWeight` s over the weights the model holds. The adapters are loaded as
    saved (dtype and bits), so a model loaded from the untouched release plus these adapters computes what the
    trained LoRA model did, bit for bit."""
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    config_path, tensor_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, ADAPTER_FILE)
    for p in (config_path, tensor_path):
        if not os.path.isfile(p):
            raise LoRAError(f"load_adapters: {p} is missing")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise LoRAError(
            f"{config_path}: format {config.get('format')!r} v{config.get('version')}, expected {FORMAT!r} v{VERSION}"
        )
    tensors = load_file(tensor_path)
    weights = {where: (module, name, w) for where, module, name, w in _expert_weights(model)}
    report = LoRAReport(int(config["rank"]), float(config["alpha"]))
    for where in config["targets"]:
        if where not in weights:
            raise LoRAError(f"{config_path}: target {where} is not a routed-expert weight of this model")
        module, name, weight = weights[where]
        if isinstance(weight, LoRAWeight):
            raise LoRAError(f"{where} already has LoRA adapters")
        a, b = (tensors.get(tensor_name(where, which)) for which in ("a", "b"))
        if a is None or b is None:
            raise LoRAError(f"{tensor_path}: no tensor {tensor_name(where, 'a' if a is None else 'b')}")
        if a.shape[-1] != report.rank:
            raise LoRAError(f"{tensor_path}: {tensor_name(where, 'a')} has rank {a.shape[-1]}, config {report.rank}")
        lora = LoRAWeight(weight, jnp.asarray(a), jnp.asarray(b), alpha=report.alpha, what=f"{tensor_path}: {where}")
        setattr(module, name, lora)
        report.targets.append(where)
        _count(report, lora)
    report.skipped = [w for w in weights if w not in report.targets]
    return report
