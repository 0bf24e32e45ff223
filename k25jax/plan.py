"""Memory planner: bytes per device of a sharded K2.5 for inference or training, and whether it fits.

Parameter and cache figures are not formulas: they come from the abstract model (``nnx.eval_shape``) and the
abstract cache placed with the same sharding functions the real placement uses (``state_shardings``,
``cache_spec``), over an :func:`k25jax.sharding.abstract_mesh`, so they equal the real buffer sizes exactly
(a test checks them against ``addressable_shards`` of a real sharded tiny model and cache). Activations,
gradients and optimizer state are estimates from stated formulas (:func:`activation_bytes`,
:func:`training_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax.cache import LatentCache
from k25jax.config import K25Config, RunConfig
from k25jax.quant import Int4Packed, Int4Scales
from k25jax.sharding import (
    COMPUTE_RULES,
    AnyMesh,
    abstract_mesh,
    cache_spec,
    logical_spec,
    shard_bytes,
    state_shardings,
)

GB = 1e9  # vendors publish memory in decimal gigabytes


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    hbm: float  # bytes per JAX device
    note: str


DEVICES = {
    d.name: d
    for d in [
        Device("a100", 80 * GB, "NVIDIA A100 80GB"),
        Device("h100", 80 * GB, "NVIDIA H100 SXM 80GB"),
        Device("h200", 141 * GB, "NVIDIA H200 141GB"),
        Device("b200", 180 * GB, "NVIDIA B200 (180 GB per GPU in a DGX B200)"),
        Device("v4", 32 * GB, "TPU v4 chip (one JAX device per chip, megacore)"),
        Device("v5e", 16 * GB, "TPU v5e chip"),
        Device("v5p", 95 * GB, "TPU v5p chip (one JAX device per chip; v5p-64 = 32 chips)"),
        Device("v6e", 32 * GB, "TPU v6e (Trillium) chip"),
        Device("tpu7x", 192 * GB, "TPU7x (Ironwood) chip"),
    ]
}

# Share of HBM the plan may fill: the rest is left to the runtime, XLA's workspace and fragmentation. On GPU, JAX
# preallocates 75% by default: run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 to use this much.
USABLE = 0.95


def _category(path: str) -> str:
    if "/experts/" in path:
        return "routed experts"
    if path.startswith(("vision/", "projector/")):
        return "vision tower + projector"
    if "/attn/" in path:
        return "attention"
    if "embed_tokens" in path or "lm_head" in path:
        return "embedding + lm_head"
    if "/mlp/shared/" in path or "/dense_layers/mlp/" in path:
        return "dense MLP + shared experts"
    return "router, norms"


def _flat(model) -> list[tuple[str, nnx.Variable]]:
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    return [("/".join(map(str, p)), v) for p, v in nnx.to_flat_state(state)]


def param_bytes(model, mesh: AnyMesh, strategy: str = "inference") -> dict[str, int]:
    """Bytes per device of every parameter, by category (every device holds the same amount: shards are even)."""
    shardings = dict(nnx.to_flat_state(state_shardings(model, mesh, strategy)))
    out: dict[str, int] = {}
    for path, var in _flat(model):
        spec = shardings[tuple(path.split("/"))].get_value().spec
        cat = _category(path)
        out[cat] = out.get(cat, 0) + shard_bytes(tuple(var.shape), var.dtype, spec, mesh)
    return out


def trainable_bytes(model, mesh: AnyMesh, dtype_bytes: int | None = None) -> tuple[int, int]:
    """``(count, bytes)`` per device of the trainable parameters under the train rules: every floating
    parameter except INT4 weights (packed words and their scales are constants for differentiation). With
    ``dtype_bytes`` the bytes are counted at that width instead of the parameter's own."""
    shardings = dict(nnx.to_flat_state(state_shardings(model, mesh, "train")))
    count = size = 0
    for path, var in _flat(model):
        if isinstance(var, Int4Packed | Int4Scales) or not jnp.issubdtype(var.dtype, jnp.floating):
            continue
        spec = shardings[tuple(path.split("/"))].get_value().spec
        n = shard_bytes(tuple(var.shape), jnp.int8, spec, mesh)  # one byte per element: the element count
        count += n
        size += n * (dtype_bytes or jnp.dtype(var.dtype).itemsize)
    return count, size


def cache_bytes(cache: LatentCache, mesh: AnyMesh) -> int:
    """Bytes per device of a (possibly abstract) latent cache placed as ``LatentCache.zeros(mesh=...)`` places it."""
    total = 0
    for a in cache.stacks.values():
        total += shard_bytes(tuple(a.shape), a.dtype, cache_spec(tuple(a.shape), mesh), mesh)
    rows = cache_spec(tuple(next(iter(cache.stacks.values())).shape), mesh)[1]
    lengths = cache.lengths
    return total + shard_bytes(tuple(lengths.shape), lengths.dtype, jax.sharding.PartitionSpec(rows), mesh)


def _split(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: AnyMesh) -> int:
    """How many ways the layout rules split an array of logical ``axes`` and ``shape`` (activations: fitted)."""
    spec = logical_spec(axes, shape, mesh, COMPUTE_RULES, fit=True)
    return math.prod(shape) // max(1, shard_bytes(shape, jnp.int8, spec, mesh))


def activation_bytes(
    cfg: K25Config, mesh: AnyMesh, batch: int, context: int, chunk: int, expert_layer_bytes: int, dtype_bytes: int = 2
):
    """Largest live temporaries of one inference step (the layer scan holds one layer's at a time), by term.

    ``expert_layer_bytes``: one layer's local expert weights, which XLA may copy out of the stack for the grouped
    matmul (counted in case it does).

    Prefill runs chunks of ``chunk`` tokens; the last chunk attends over the whole ``context`` (absorbed form,
    float32 scores and compute-dtype probabilities). The MoE term is the expert-parallel row buffer: the tokens
    of the expert group, ``min(k, E_local)`` rows each, through gate / up (float32), the SwiGLU product and
    down (float32). Decode (one token) is smaller in every term.
    """
    t = cfg.text
    b = batch // _split(("batch",), (batch,), mesh)  # batch rows per device
    T = min(chunk, context)
    heads = t.num_attention_heads // _split((None, "act_heads"), (1, t.num_attention_heads), mesh)
    expert_shards = _split(("experts",), (t.n_routed_experts,), mesh)
    width = t.moe_intermediate_size // _split(("expert_mlp",), (t.moe_intermediate_size,), mesh)
    # Tokens are gathered over the expert axes the batch is split over (k25jax.expert_parallel).
    token = logical_spec(("batch",), (batch,), mesh, COMPUTE_RULES, fit=True)[0]
    token_axes = () if token is None else (token,) if isinstance(token, str) else token
    expert_axes = logical_spec(("experts",), (t.n_routed_experts,), mesh, COMPUTE_RULES)[0] or ()
    expert_axes = (expert_axes,) if isinstance(expert_axes, str) else expert_axes
    gathered = math.prod(mesh.shape[a] for a in expert_axes if a in token_axes)
    group_rows = b * T * gathered
    rows = group_rows * min(t.num_experts_per_tok, t.n_routed_experts // expert_shards)
    D = t.hidden_size
    return {
        "one layer's local experts (sliced copy)": expert_layer_bytes,
        "attention scores": b * heads * T * context * (4 + dtype_bytes),
        "attention q / latents": b * T * heads * (t.qk_head_dim + t.kv_lora_rank) * dtype_bytes,
        "MoE rows": rows * (D * dtype_bytes + width * (4 + 4 + dtype_bytes) + D * 4) + group_rows * D * 4,
        "residual + logits": 4 * b * T * D * dtype_bytes + b * t.vocab_size // mesh.shape["tensor"] * 4,
    }


def training_bytes(cfg: K25Config, mesh: AnyMesh, batch: int, context: int, layers: int, dtype_bytes: int = 2):
    """Activations of a training step with per-layer rematerialisation: the residual stream saved at every layer
    boundary, plus one layer's full-form attention (scores, probabilities and their gradients) recomputed."""
    t = cfg.text
    b = batch // _split(("batch",), (batch,), mesh)
    heads = t.num_attention_heads // _split((None, "act_heads"), (1, t.num_attention_heads), mesh)
    return {
        "saved residuals": layers * b * context * t.hidden_size * dtype_bytes,
        "attention scores (one layer, fwd+bwd)": 2 * b * heads * context * context * (4 + dtype_bytes),
    }


@dataclasses.dataclass
class Plan:
    model: str
    mesh: dict[str, int]
    batch: int
    context: int
    train: bool
    device: Device
    params: dict[str, int]
    cache: int
    activations: dict[str, int]
    gradients: int = 0
    optimizer: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.params.values()) + self.cache + sum(self.activations.values()) + self.gradients + self.optimizer

    @property
    def usable(self) -> float:
        return self.device.hbm * USABLE

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def report(self) -> str:
        devices = math.prod(self.mesh.values())
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        mode = "training (train rules: FSDP + expert + tensor)" if self.train else "inference (expert + tensor)"
        lines = [
            f"model {self.model}, {mode}",
            f"mesh {mesh} = {devices} devices of {self.device.note}",
            f"batch {self.batch}, context {self.context} tokens",
            "",
            "per device:",
        ]

        def row(name, value, indent=2):
            lines.append(f"{' ' * indent}{name:<40s}{value / GB:10.2f} GB")

        row("parameters", sum(self.params.values()))
        for k, v in sorted(self.params.items(), key=lambda kv: -kv[1]):
            row(k, v, 4)
        row("latent KV cache", self.cache)
        row("activations (estimate)", sum(self.activations.values()))
        for k, v in self.activations.items():
            row(k, v, 4)
        if self.train:
            row("gradients", self.gradients)
            row("optimizer state", self.optimizer)
        row("total", self.total)
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"device memory {self.device.hbm / GB:.0f} GB, usable {USABLE:.0%} = {self.usable / GB:.2f} GB: "
            f"{verdict} ({self.usable / GB - self.total / GB:+.2f} GB headroom)"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan(
    cfg: K25Config,
    mesh: dict[str, int],
    *,
    batch: int,
    context: int,
    train: bool = False,
    device: str = "h200",
    dtype=jnp.bfloat16,
    cache_dtype=jnp.bfloat16,
    prefill_chunk: int = 512,
) -> Plan:
    """Plan ``cfg`` on a mesh of ``mesh`` sizes (axis name -> size). Parameters in ``dtype`` except INT4 experts
    (when the config is quantized) and the float32 router bias; the cache in ``cache_dtype``."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: known devices are {', '.join(DEVICES)}")
    if batch < 1 or context < 1:
        raise ValueError(f"batch ({batch}) and context ({context}) must be positive")
    amesh = abstract_mesh(**mesh)
    model = nnx.eval_shape(lambda: _build(cfg, dtype))
    strategy = "train" if train else "inference"
    params = param_bytes(model, amesh, strategy)
    cache = 0 if train else cache_bytes(LatentCache.abstract(cfg.text, batch, context, cache_dtype), amesh)
    dbytes = jnp.dtype(dtype).itemsize
    notes = []
    if train:
        layers = cfg.text.num_hidden_layers
        acts = training_bytes(cfg, amesh, batch, context, layers, dbytes)
        count, grads = trainable_bytes(model, amesh)
        p = Plan(cfg.name, mesh, batch, context, train, DEVICES[device], params, cache, acts, grads, 8 * count)
        notes += [
            "optimizer: AdamW with float32 first and second moments (8 bytes per trainable parameter); gradients "
            "in the parameter dtype; trainable = every floating parameter (INT4 expert weights are frozen constants)",
            "activations: per-layer rematerialisation; full-form attention (no flash kernel): scores grow as context^2",
        ]
    else:
        layer = params.get("routed experts", 0) // max(1, cfg.text.num_moe_layers)
        acts = activation_bytes(cfg, amesh, batch, context, prefill_chunk, layer, dbytes)
        p = Plan(cfg.name, mesh, batch, context, train, DEVICES[device], params, cache, acts)
        notes.append(f"activations: estimate for a {min(prefill_chunk, context)}-token prefill chunk (the larger step)")
    if cfg.quantization is not None:
        notes.append("routed experts INT4: 0.5 byte per value + one bf16 scale per 32 values (0.5625 bytes/value)")
        t = cfg.text
        local = t.n_routed_experts // _split(("experts",), (t.n_routed_experts,), amesh)
        width = t.moe_intermediate_size // _split(("expert_mlp",), (t.moe_intermediate_size,), amesh)
        dequantized = local * 3 * t.hidden_size * width * dbytes
        notes.append(
            f"activations assume the Pallas INT4 kernels (kernels='pallas'); the XLA path dequantizes one layer's "
            f"local experts first: +{dequantized / GB:.2f} GB"
        )
    p.notes = notes
    return p


def _build(cfg: K25Config, dtype):
    from k25jax.model import K25

    return K25(cfg, RunConfig(compute_dtype=dtype), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------------------
# Collectives of a compiled program (what the sharding tests and the MoE communication benchmark count)
# --------------------------------------------------------------------------------------------------------

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>all-gather|all-reduce|all-to-all|ragged-all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
)
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subf]\d+|bf16|f8\w*)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of an HLO module: its kind, result arrays ``(dtype, dims)`` and group size."""

    op: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]
    group: int

    @property
    def result_bytes(self) -> int:
        return sum(math.prod(d) * _itemsize(t) for t, d in self.arrays)

    @property
    def moved_bytes(self) -> float:
        """Bytes one device sends (ring algorithms): all-gather / all-to-all (g-1)/g of the result, reduce-scatter
        (g-1) results, all-reduce 2(g-1)/g, collective-permute the result."""
        g, r = self.group, self.result_bytes
        if self.op == "all-reduce":
            return 2 * (g - 1) / g * r
        if self.op == "reduce-scatter":
            return (g - 1) * r
        if self.op == "collective-permute":
            return r
        return (g - 1) / g * r


def _itemsize(dtype: str) -> int:
    if dtype in _BYTES:
        return _BYTES[dtype]
    return max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)


def _group_size(line: str) -> int:
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]", line):
        return int(m.group(2))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    if m := re.search(r"source_target_pairs=\{(.*?)\}\}", line):
        return 2
    return 1


def collectives(hlo_text: str) -> list[Collective]:
    """The collective ops of an HLO module's text (``compiled.as_text()``)."""
    out = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.match(line)
        if not m:
            continue
        arrays = tuple(
            (a["dtype"], tuple(int(d) for d in a["dims"].split(",") if d)) for a in _ARRAY.finditer(m["shape"])
        )
        out.append(Collective(m["op"], arrays, _group_size(line)))
    return out
