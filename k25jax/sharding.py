"""The logical-axis vocabulary: every parameter and constrained activation names its dims with these.

This is the only file that names mesh axes. Model code speaks logical names (``"embed"``, ``"experts"``,
...); a rules table per strategy maps them to mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Logical axes of parameters. Each parameter's metadata ``out_sharding`` is a tuple of these (or None for
# a dim that is never sharded).
PARAM_AXES = {
    "layers": "stacked layer index of a scanned stack",
    "vocab": "vocabulary (embedding rows, lm_head columns)",
    "embed": "model width D",
    "q_lora": "query latent Q (q_lora_rank)",
    "kv_lora": "key/value latent C (kv_lora_rank), also C + R for kv_a_proj",
    "heads": "attention heads H",
    "head_dim": "per-head width (qk nope/rope, v)",
    "mlp": "dense / shared-expert SwiGLU width F",
    "experts": "routed experts E",
    "expert_mlp": "routed-expert SwiGLU width F",
    "expert_embed": "model width D as seen by routed experts",
    "router": "router output (all experts; never sharded)",
    "norm": "a norm's scale vector (replicated)",
    "quant_groups": "INT4 group index along a quantized input dim",
    "vision_embed": "vision tower width",
    "vision_mlp": "vision MLP width",
    "vision_heads": "vision attention heads",
    "vision_pos": "rows / columns of the learned vision position table (replicated)",
    "vision_merged": "projector input width: the 2x2 merged vision width (4 x vision width)",
    "projector_mlp": "projector hidden width",
    "conv": "convolution kernel dims (replicated)",
}

# Logical axes of activations, for sharding constraints.
ACTIVATION_AXES = {
    "batch": "batch B",
    "seq": "query positions T",
    "kv_seq": "key positions S / cache length",
    "act_embed": "activation width D",
    "act_heads": "activation heads H",
    "act_vocab": "logits vocabulary",
    "tokens": "flattened tokens (B*T, or B*T*k after routing)",
    "patches": "packed vision patches P of all media items",
    "kv_latent": "latent KV cache width C + R ([normed c_kv | roped k_pe] per cached token)",
}

# Logical axes of the latent KV cache ``[L, B, S, C + R]`` (k25jax/cache.py), stacked per layer stack like
# the parameters.
CACHE_AXES = ("layers", "batch", "kv_seq", "kv_latent")

LOGICAL_AXES = {**PARAM_AXES, **ACTIVATION_AXES}


def check_axes(axes: tuple[str | None, ...], shape: tuple[int, ...], what: str) -> None:
    """Raise if ``axes`` does not name one known logical axis (or None) per dim of ``shape``."""
    if len(axes) != len(shape):
        raise ValueError(f"{what}: {len(axes)} logical axes {axes} for a rank-{len(shape)} shape {shape}")
    for a in axes:
        if a is not None and a not in LOGICAL_AXES:
            raise ValueError(f"{what}: unknown logical axis {a!r}; known: {sorted(LOGICAL_AXES)}")


# --------------------------------------------------------------------------------------------------------
# Mesh axes and rules
# --------------------------------------------------------------------------------------------------------

# Mesh axes, outermost first: data parallel, fully-sharded data parallel, expert parallel, tensor parallel
# (innermost: it needs the fastest links).
MESH_AXES = ("data", "fsdp", "expert", "tensor")

MeshAxes = str | tuple[str, ...] | None

# Inference: expert parallel (routed experts split over "expert") + tensor parallel (heads, MLP widths and the
# vocabulary over "tensor"); everything else replicated; the batch over "data" (and "fsdp" if present).
INFERENCE_RULES: dict[str, MeshAxes] = {
    "layers": None,
    "vocab": "tensor",
    "embed": None,
    "q_lora": None,
    "kv_lora": None,
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "expert_embed": None,
    "router": None,
    "norm": None,
    "quant_groups": None,
    "vision_embed": None,
    "vision_mlp": None,
    "vision_heads": None,
    "vision_pos": None,
    "vision_merged": None,
    "projector_mlp": None,
    "conv": None,
    "batch": ("data", "fsdp"),
    "seq": None,
    "kv_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
    "tokens": ("data", "fsdp"),
    "patches": None,
    "kv_latent": None,
}

# Training: as inference, plus FSDP: the model width of every weight is split over "fsdp" (gathered at use).
TRAIN_RULES: dict[str, MeshAxes] = {**INFERENCE_RULES, "embed": "fsdp", "expert_embed": "fsdp"}

RULES: dict[str, dict[str, MeshAxes]] = {"inference": INFERENCE_RULES, "train": TRAIN_RULES}


class ShardingError(ValueError):
    """A logical-to-mesh mapping is impossible. The message names the parameter, dimension and mesh axis."""


def rules_for(strategy: str | Mapping[str, MeshAxes]) -> Mapping[str, MeshAxes]:
    if isinstance(strategy, Mapping):
        return strategy
    try:
        return RULES[strategy]
    except KeyError:
        raise ShardingError(f"unknown sharding strategy {strategy!r}; choose one of {sorted(RULES)}") from None


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, fsdp: int = 1, *, devices=None) -> Mesh:
    """A mesh ``(data, fsdp, expert, tensor)`` over all devices of all hosts (or ``devices``).

    The product of the sizes must equal the device count. Axes are ``AxisType.Auto``: jit propagates the
    parameter shardings and the constraints placed by the model.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ShardingError(f"mesh axis {name} must be a positive integer, got {size!r}")
    total = math.prod(sizes.values())
    if total != len(devices):
        shape = " x ".join(f"{n}={v}" for n, v in sizes.items())
        raise ShardingError(f"mesh {shape} needs {total} devices, but {len(devices)} are available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """``"expert=8,tensor=4"`` -> ``{"expert": 8, "tensor": 4}`` (for command lines)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.isdigit():
            raise ShardingError(f"--mesh: expected NAME=SIZE with NAME in {MESH_AXES}, got {part!r}")
        out[name] = int(value)
    return out


def logical_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...] | None = None,
    mesh: Mesh | None = None,
    strategy: str | Mapping[str, MeshAxes] = "inference",
    what: str = "array",
) -> PartitionSpec:
    """The ``PartitionSpec`` for logical ``axes`` under a strategy's rules.

    Raises :class:`ShardingError` when two dims claim one mesh axis, a logical axis has no rule, or (given
    ``shape`` and ``mesh``) a dimension does not divide by the product of its mesh axes.
    """
    rules = rules_for(strategy)
    used: dict[str, int] = {}
    spec = []
    for dim, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"{what}: logical axis {name!r} has no rule in the sharding rules")
        target = rules[name]
        mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:  # axes of size 1 shard nothing: leave them out
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        for a in mesh_axes:
            if a in used:
                raise ShardingError(
                    f"{what}: dims {used[a]} ({axes[used[a]]!r}) and {dim} ({name!r}) both map to mesh axis {a!r}"
                )
            used[a] = dim
        if mesh is not None and shape is not None and mesh_axes:
            parts = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[dim] % parts:
                raise ShardingError(
                    f"{what}: dim {dim} ({name!r}, size {shape[dim]}) does not divide over mesh axes "
                    f"{mesh_axes} ({parts} shards)"
                )
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def state_shardings(tree: Any, mesh: Mesh, strategy: str | Mapping[str, MeshAxes] = "inference") -> Any:
    """``NamedSharding``s for every ``nnx.Variable`` of a model or state (same tree structure).

    Works on concrete and abstract (``nnx.eval_shape``) models; INT4 weights are two variables each.
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)

    def one(path, var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        spec = logical_spec(tuple(axes), tuple(var.shape), mesh, strategy, what=_path_name(path))
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, strategy: str | Mapping[str, MeshAxes] = "inference") -> nnx.Module:
    """Place a model's parameters on ``mesh`` per the strategy's rules (returns the placed model)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, strategy))
    return nnx.merge(graphdef, state)


def shard_bytes(shape: tuple[int, ...], dtype, spec: PartitionSpec, mesh: Mesh) -> int:
    """Bytes one device holds of an array of ``shape`` sharded by ``spec`` on ``mesh``."""
    n = math.prod(shape)
    for entry in spec:
        for a in (entry,) if isinstance(entry, str) else entry or ():
            n //= mesh.shape[a]
    return n * np.dtype(dtype).itemsize
