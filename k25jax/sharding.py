"""The logical-axis vocabulary: every parameter and constrained activation names its dims with these.

This is the only file that names mesh axes. Model code speaks logical names (``"embed"``, ``"experts"``,
...); a rules table per strategy maps them to mesh axes. Model code reaches the mesh only through the helpers
here: :func:`constrain` (activation sharding constraints, a no-op without a mesh) and :func:`expert_layout`
(what the expert-parallel ``shard_map`` needs: specs and axis names).

Strategies:

- ``"inference"``: routed experts split over ``expert`` (each device holds ``E / expert`` experts) and their
  MLP width over ``tensor``; attention heads, dense MLP widths and the vocabulary over ``tensor``; the batch over
  ``data`` x ``fsdp`` x ``expert`` (attention is data-parallel across the expert group, as the MoE gathers its
  tokens from that group anyway); everything else replicated.
- ``"train"``: the same plus FSDP: the model width of every weight is split over ``fsdp`` and gathered at use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

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
    "act_mlp": "dense / shared-expert SwiGLU hidden F",
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
AnyMesh = Mesh | AbstractMesh

# The batch is split over every axis that does not split the batch's own computation: data, fsdp, and expert
# (attention and the dense layers run data-parallel across the expert group; the MoE gathers its tokens there).
_BATCH = ("data", "fsdp", "expert")

# Inference: expert parallel (routed experts split over "expert") + tensor parallel (heads, MLP widths and the
# vocabulary over "tensor"); every other weight replicated.
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
    "batch": _BATCH,
    "seq": None,
    "kv_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "tokens": _BATCH,
    "patches": None,
    "kv_latent": None,
}

# Training: as inference, plus FSDP: the model width of every weight is split over "fsdp" (gathered at use).
TRAIN_RULES: dict[str, MeshAxes] = {**INFERENCE_RULES, "embed": "fsdp", "expert_embed": "fsdp"}

RULES: dict[str, dict[str, MeshAxes]] = {"inference": INFERENCE_RULES, "train": TRAIN_RULES}

# The layout computations see. Activation rules are the same in every strategy; weights that a strategy stores
# more finely (FSDP's "embed" over "fsdp") are gathered to this layout where they are used.
COMPUTE_RULES = INFERENCE_RULES


class ShardingError(ValueError):
    """A logical-to-mesh mapping is impossible. The message names the parameter, dimension and mesh axis."""


def rules_for(strategy: str | Mapping[str, MeshAxes]) -> Mapping[str, MeshAxes]:
    if isinstance(strategy, Mapping):
        return strategy
    try:
        return RULES[strategy]
    except KeyError:
        raise ShardingError(f"unknown sharding strategy {strategy!r}; choose one of {sorted(RULES)}") from None


def _check_sizes(sizes: Mapping[str, int]) -> None:
    for name, size in sizes.items():
        if name not in MESH_AXES:
            raise ShardingError(f"unknown mesh axis {name!r}; mesh axes are {MESH_AXES}")
        if not isinstance(size, int) or size < 1:
            raise ShardingError(f"mesh axis {name} must be a positive integer, got {size!r}")


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, fsdp: int = 1, *, devices=None) -> Mesh:
    """A mesh ``(data, fsdp, expert, tensor)`` over all devices of all hosts (or ``devices``).

    The product of the sizes must equal the device count. Axes are ``AxisType.Auto``: jit propagates the
    parameter shardings and the constraints placed by the model. On several hosts call
    :func:`k25jax.distributed.initialize` first, so that ``jax.devices()`` lists every host's devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    _check_sizes(sizes)
    total = math.prod(sizes.values())
    if total != len(devices):
        shape = " x ".join(f"{n}={v}" for n, v in sizes.items())
        raise ShardingError(f"mesh {shape} needs {total} devices, but {len(devices)} are available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(data: int = 1, expert: int = 1, tensor: int = 1, fsdp: int = 1) -> AbstractMesh:
    """The mesh's shape without devices: for planning full-size layouts on any machine."""
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    _check_sizes(sizes)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh(text: str) -> dict[str, int]:
    """``"expert=8,tensor=4"`` -> ``{"expert": 8, "tensor": 4}`` (for command lines)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.isdigit() or int(value) < 1:
            raise ShardingError(f"--mesh: expected NAME=SIZE with NAME in {MESH_AXES}, got {part!r}")
        if name in out:
            raise ShardingError(f"--mesh: axis {name!r} given twice in {text!r}")
        out[name] = int(value)
    return out


def mesh_sizes(text: str, device_count: int) -> dict[str, int]:
    """``--mesh`` text -> all four axis sizes for ``device_count`` devices.

    An axis not named is 1, except ``data``, which takes up the devices the named axes leave (so
    ``expert=4,tensor=2`` on 16 devices is data=2). Raises :class:`ShardingError` when that cannot work.
    """
    sizes = {a: 1 for a in MESH_AXES} | parse_mesh(text)
    named = math.prod(sizes.values())
    if "data" not in parse_mesh(text) and named and device_count % named == 0:
        sizes["data"] = device_count // named
    if math.prod(sizes.values()) != device_count:
        raise ShardingError(
            f"--mesh {text!r}: {' x '.join(f'{k}={v}' for k, v in sizes.items())} needs "
            f"{math.prod(sizes.values())} devices, but {device_count} are available"
        )
    return sizes


def _rule_axes(name: str, rules: Mapping[str, MeshAxes], mesh: AnyMesh | None, what: str) -> tuple[str, ...]:
    if name not in rules:
        raise ShardingError(f"{what}: logical axis {name!r} has no rule in the sharding rules")
    target = rules[name]
    mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    if mesh is not None:  # axes of size 1 shard nothing: leave them out
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
    return mesh_axes


def logical_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...] | None = None,
    mesh: AnyMesh | None = None,
    strategy: str | Mapping[str, MeshAxes] = "inference",
    what: str = "array",
    *,
    fit: bool = False,
) -> PartitionSpec:
    """The ``PartitionSpec`` for logical ``axes`` under a strategy's rules.

    Raises :class:`ShardingError` when two dims claim one mesh axis, a logical axis has no rule, or (given
    ``shape`` and ``mesh``) a dimension does not divide by the product of its mesh axes. With ``fit=True``
    (activations and caches, whose sizes are the user's: a batch of 1, a batch of 2 on a data x expert mesh of 8)
    a mesh axis that would not divide is left out instead: that dim is replicated over it.
    """
    rules = rules_for(strategy)
    used: dict[str, int] = {}
    spec = []
    for dim, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        mesh_axes = _rule_axes(name, rules, mesh, what)
        if fit and mesh is not None and shape is not None:
            kept, parts = [], 1
            for a in mesh_axes:
                if a not in used and shape[dim] % (parts * mesh.shape[a]) == 0:
                    kept.append(a)
                    parts *= mesh.shape[a]
            mesh_axes = tuple(kept)
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


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """A variable's logical axes (its ``out_sharding`` metadata; all None when it has none)."""
    return tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.shape))


def state_shardings(tree: Any, mesh: AnyMesh, strategy: str | Mapping[str, MeshAxes] = "inference") -> Any:
    """``NamedSharding``s for every ``nnx.Variable`` of a model or state (same tree structure).

    Works on concrete and abstract (``nnx.eval_shape``) models, and on an :func:`abstract_mesh` (for planning);
    INT4 weights are two variables each.
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)

    def one(path, var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        spec = logical_spec(variable_axes(var), tuple(var.shape), mesh, strategy, what=_path_name(path))
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, strategy: str | Mapping[str, MeshAxes] = "inference") -> nnx.Module:
    """Place a model's parameters on ``mesh`` per the strategy's rules (returns the placed model)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, strategy))
    return nnx.merge(graphdef, state)


def shard_bytes(shape: tuple[int, ...], dtype, spec: PartitionSpec, mesh: AnyMesh) -> int:
    """Bytes one device holds of an array of ``shape`` sharded by ``spec`` on ``mesh``."""
    n = math.prod(shape)
    for entry in spec:
        for a in (entry,) if isinstance(entry, str) else entry or ():
            n //= mesh.shape[a]
    return n * np.dtype(dtype).itemsize


# --------------------------------------------------------------------------------------------------------
# The active mesh: constraints and expert parallelism inside model code
# --------------------------------------------------------------------------------------------------------


def local_shards(shape: tuple[int, ...], sharding) -> dict[tuple[tuple[int, int], ...], list]:
    """The distinct shards of an array that this process's devices hold: ``((start, stop) per dim) -> devices``
    (replicas of one shard share an entry, so that it is read once)."""
    shards: dict[tuple[tuple[int, int], ...], list] = {}
    for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
        key = tuple(r.indices(n)[:2] for r, n in zip(index, shape, strict=True))
        shards.setdefault(key, []).append(device)
    return shards


def local_bytes(shape: tuple[int, ...], dtype, sharding) -> int:
    """Bytes of an array that this process's devices hold, each distinct shard counted once."""
    itemsize = np.dtype(dtype).itemsize
    return sum(math.prod(b - a for a, b in key) for key in local_shards(shape, sharding)) * itemsize


def active_mesh() -> AbstractMesh | None:
    """The mesh set by ``jax.set_mesh`` (or :func:`use_mesh`) when it spans more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return mesh


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Constrain activation ``x`` to the layout of its logical ``axes`` on the active mesh (no mesh: ``x``).

    Dims that do not divide over their mesh axes are replicated over them (``logical_spec(fit=True)``).
    """
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = logical_spec(tuple(axes), tuple(x.shape), mesh, COMPUTE_RULES, what="activation", fit=True)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(x: jax.Array) -> jax.Array:
    """``x`` whole on every device of the active mesh (host read-back on several hosts needs it); else ``x``."""
    return constrain(x, (None,) * x.ndim)


def mesh_of(tree: Any) -> Mesh | None:
    """The multi-device mesh the arrays of ``tree`` (a model, state or pytree) are placed on, or None."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def use_mesh(mesh: Mesh | None):
    """``jax.set_mesh(mesh)`` as a context manager; a no-op context for None (single device)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def cache_spec(shape: tuple[int, ...], mesh: AnyMesh) -> PartitionSpec:
    """Layout of one ``[L, B, S, C + R]`` latent-cache stack: the batch split like activations, rest whole.

    The latents are per token, shared by all heads, so tensor parallelism cannot split them: every tensor
    shard of a batch row holds that row's whole cache.
    """
    return logical_spec(CACHE_AXES, shape, mesh, COMPUTE_RULES, what="latent cache", fit=True)


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How the routed experts and their tokens split over the active mesh: what ``moe``'s ``shard_map`` needs.

    Attributes:
      token_axes: mesh axes the MoE's input tokens (batch rows) are split over.
      expert_axes: mesh axes the experts are split over (each device holds ``E / expert_shards`` of them).
      width_axes: mesh axes the experts' SwiGLU width is split over (partial sums are added over them).
      expert_shards: product of the ``expert_axes`` sizes.
    """

    token_axes: tuple[str, ...]
    expert_axes: tuple[str, ...]
    width_axes: tuple[str, ...]
    expert_shards: int

    @property
    def gather_axes(self) -> tuple[str, ...]:
        """Expert axes the tokens are split over: tokens are gathered over these, outputs reduce-scattered."""
        return tuple(a for a in self.expert_axes if a in self.token_axes)

    @property
    def sum_axes(self) -> tuple[str, ...]:
        """Axes whose partial outputs are summed whole (experts over replicated tokens, split SwiGLU widths)."""
        return tuple(a for a in self.expert_axes if a not in self.token_axes) + self.width_axes

    @property
    def token_spec(self) -> PartitionSpec:
        """Spec of ``[N, ...]`` token-major arrays entering and leaving the MoE."""
        axes = self.token_axes
        return PartitionSpec(None if not axes else axes[0] if len(axes) == 1 else axes)

    def weight_spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...], what: str) -> PartitionSpec:
        """Spec of an expert weight with logical ``axes`` as the experts compute with it (strict divisibility)."""
        return logical_spec(tuple(axes), tuple(shape), active_mesh(), COMPUTE_RULES, what=what)

    def shard_index(self) -> jax.Array:
        """Inside the ``shard_map``: this device's index among the expert shards (0 without expert axes)."""
        if not self.expert_axes:
            return jax.numpy.int32(0)
        return jax.lax.axis_index(self.expert_axes)


def expert_layout(batch: int, num_experts: int) -> ExpertLayout | None:
    """The expert-parallel layout for an MoE over ``batch`` rows on the active mesh; None when nothing splits the
    experts (no mesh, or a mesh of data axes only, where plain jit data parallelism is right).

    Raises :class:`ShardingError` when ``num_experts`` does not divide over the expert axes.
    """
    mesh = active_mesh()
    if mesh is None:
        return None
    expert_axes = _rule_axes("experts", COMPUTE_RULES, mesh, "experts")
    width_axes = _rule_axes("expert_mlp", COMPUTE_RULES, mesh, "expert_mlp")
    if not expert_axes and not width_axes:
        return None
    shards = math.prod(mesh.shape[a] for a in expert_axes)
    if num_experts % shards:
        raise ShardingError(f"experts: {num_experts} routed experts do not divide over mesh axes {expert_axes}")
    token = logical_spec(("batch",), (batch,), mesh, COMPUTE_RULES, what="MoE tokens", fit=True)[0]
    token_axes = () if token is None else (token,) if isinstance(token, str) else tuple(token)
    return ExpertLayout(token_axes, expert_axes, width_axes, shards)
