"""Memory planner: bytes per device of a sharded K2.5 for inference or training, and whether it fits.

Parameter and cache figures are not formulas: they come from the abstract model (``nnx.eval_shape``) and the
abstract cache placed with the same sharding functions the real placement uses (``state_shardings``,
``cache_spec``), over an :func:`k25jax.sharding.abstract_mesh`, so they equal the real buffer sizes exactly
(a test checks them against ``addressable_shards`` of a real sharded tiny model and cache). Activations are
estimates from stated formulas (:func:`activation_bytes`, :func:`qat_activation_bytes`).

Training for INT4 QAT (:class:`TrainSetup`, :func:`qat_state_bytes`): the abstract model is converted the way
``k25jax.train`` converts it (``to_fake_quant`` on the experts whose master path the trainable pattern matches,
then ``trainable_filter``), and the AdamW state is ``optax``'s own ``init`` traced abstractly over the trainable
part: masters, gradients, optimizer state, frozen INT4 experts and other parameters equal the real buffers exactly
(``tests/test_plan_train.py``). ``TrainSetup.train_layers`` (experts of some MoE layers only) converts those layers
as ``k25jax finetune --train-layers`` does (masters for the chosen layers, packed INT4 for the others).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax.cache import LatentCache
from k25jax.config import REMAT_POLICIES, K25Config, RunConfig
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


# Inference attention: contexts longer than this are planned blockwise unless a block is given (``"auto"``).
LONG_CONTEXT = 32768
# The block the inference plan assumes for them: key blocks of this many cache slots (the prefill chunk's queries
# are one query block). Score memory grows with it; fewer, larger blocks mean fewer loop steps.
LONG_CONTEXT_BLOCK = 2048


def check_attention_block(block) -> None:
    """Raise ``ValueError`` naming ``--attention-block`` unless ``block`` is None or a positive int."""
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"--attention-block must be a positive number of tokens (or plain), got {block!r}")


def inference_attention_block(context: int, attention_block="auto") -> int | None:
    """The attention block an inference plan assumes: ``"auto"`` is :data:`LONG_CONTEXT_BLOCK` for contexts over
    :data:`LONG_CONTEXT` and plain (None) otherwise; None or a positive int is taken as given (checked)."""
    if attention_block == "auto":
        return LONG_CONTEXT_BLOCK if context > LONG_CONTEXT else None
    check_attention_block(attention_block)
    return attention_block


def _token_axes(batch: int, mesh: AnyMesh) -> tuple[str, ...]:
    """The mesh axes a batch of ``batch`` rows is split over (fitted: an axis that does not divide is left out)."""
    token = logical_spec(("batch",), (batch,), mesh, COMPUTE_RULES, fit=True)[0]
    return () if token is None else (token,) if isinstance(token, str) else tuple(token)


def _gathered(token_axes: tuple[str, ...], cfg: K25Config, mesh: AnyMesh) -> int:
    """How many devices' tokens the MoE gathers: the expert axes the batch is split over (k25jax.expert_parallel)."""
    expert_axes = logical_spec(("experts",), (cfg.text.n_routed_experts,), mesh, COMPUTE_RULES)[0] or ()
    expert_axes = (expert_axes,) if isinstance(expert_axes, str) else expert_axes
    return math.prod(mesh.shape[a] for a in expert_axes if a in token_axes)


def activation_bytes(
    cfg: K25Config,
    mesh: AnyMesh,
    batch: int,
    context: int,
    chunk: int,
    expert_layer_bytes: int,
    dtype_bytes: int = 2,
    *,
    attention_block: int | None = None,
):
    """Largest live temporaries of one inference step (the layer scan holds one layer's at a time), by term.

    ``expert_layer_bytes``: one layer's local experts, which XLA may copy out of the stack for the grouped
    matmul (counted in case it does).

    Prefill runs chunks of ``chunk`` tokens; the last chunk attends over the whole ``context`` (absorbed form). Per
    device: ``b`` batch rows, ``T = min(chunk, context)`` queries, ``S = context`` cache slots, ``Hl`` heads,
    ``C`` = ``kv_lora_rank``, ``R`` = ``qk_rope_head_dim``, ``d`` = ``dtype_bytes``.

    - ``attention_block=None`` (plain ``MLA.absorbed``): the whole scores ``b Hl T S (4 + d)`` (float32 scores and
      compute-dtype probabilities), and q / q~ ``b T Hl (Kn + R + C) d``.
    - ``attention_block=N`` (``MLA.absorbed_blockwise``: :func:`k25jax.attention.blockwise_attention` with the
      latents ``[c | k_pe]`` as keys and ``c`` as values, shared by every head), query blocks ``bq = min(N, T)``, key
      blocks ``bk = min(N, S)``: one block's scores ``b Hl bq bk 12`` (the two float32 score products
      ``q~ . c`` and ``q_pe . k_pe``, the float32 ``exp``: what XLA:CPU's compiled MLA holds per block element, the
      compute-dtype probabilities fused away); the online-softmax state ``b Hl bq 8`` (running max and sum) and the
      float32 latent-space accumulator with one block's ``p . c`` product, ``2 b Hl bq C 4``; the output of every
      query block, float32 and in the compute dtype, ``b T Hl C (4 + d)``; the blocked copies of the queries
      ``b T Hl (C + R) d`` and of one layer's latents (keys ``c | k_pe`` and values ``c``) ``b S (2C + R) d``.

    The MoE term is the expert-parallel row buffer: the tokens of the expert group, ``min(k, E_local)`` rows each,
    through gate / up (float32), the SwiGLU product and down (float32). Decode (one token: ``T = bq = 1``) is
    smaller in every term.
    """
    check_attention_block(attention_block)
    b = batch // _split(("batch",), (batch,), mesh)  # batch rows per device
    gathered = _gathered(_token_axes(batch, mesh), cfg, mesh)
    return _step_bytes(cfg, mesh, b, gathered, context, chunk, expert_layer_bytes, dtype_bytes, attention_block)


def _step_bytes(cfg, mesh, b, gathered, context, chunk, expert_layer_bytes, dtype_bytes, block) -> dict[str, int]:
    """:func:`activation_bytes` for ``b`` rows per device whose MoE gathers ``gathered`` devices' tokens."""
    t, d = cfg.text, dtype_bytes
    T, S = min(chunk, context), context
    heads = t.num_attention_heads // _split((None, "act_heads"), (1, t.num_attention_heads), mesh)
    expert_shards = _split(("experts",), (t.n_routed_experts,), mesh)
    width = t.moe_intermediate_size // _split(("expert_mlp",), (t.moe_intermediate_size,), mesh)
    group_rows = b * T * gathered
    rows = group_rows * min(t.num_experts_per_tok, t.n_routed_experts // expert_shards)
    D, C, R = t.hidden_size, t.kv_lora_rank, t.qk_rope_head_dim
    q_latents = b * T * heads * (t.qk_head_dim + C) * d
    if block is None:
        attention = {"attention scores": b * heads * T * S * (4 + d), "attention q / latents": q_latents}
    else:
        bq, bk = min(block, T), min(block, S)
        attention = {
            "attention scores (one block)": b * heads * bq * bk * 12,
            "online softmax: max, sum, accumulators": b * heads * bq * (8 + 2 * C * 4) + b * T * heads * C * (4 + d),
            "attention q / latents (+ blocked copies)": q_latents + b * T * heads * (C + R) * d,
            "one layer's latents, blocked": b * S * (2 * C + R) * d,
        }
    return {
        "one layer's local experts (sliced copy)": expert_layer_bytes,
        **attention,
        "MoE rows": rows * (D * d + width * (4 + 4 + d) + D * 4) + group_rows * D * 4,
        "residual + logits": 4 * b * T * D * d + b * t.vocab_size // mesh.shape["tensor"] * 4,
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


# --------------------------------------------------------------------------------------------------------
# INT4 QAT: fake-quant masters of the trainable experts, frozen INT4 experts, AdamW state, activations by remat
# --------------------------------------------------------------------------------------------------------

MASTERS = "trainable expert masters"
FROZEN_MASTERS = "frozen expert masters"
FQ_SCALES = "fake-quant expert scales"
INT4_FROZEN = "frozen INT4 experts (words + scales)"
OTHER_TRAINABLE = "other parameters, trainable"
OTHER_FROZEN = "other parameters, frozen"


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a QAT run trains and how, in the terms of ``k25jax.train`` (``FinetuneConfig``, ``RunConfig``).

    Attributes:
      trainable: the ``trainable_filter`` pattern (regex searched in ``"text/moe_layers/attn/q_a_proj"``-style
        paths); routed experts whose ``.../master`` path it matches become fake-quant (as the trainer decides).
      train_layers: ``(a, b)``: only MoE layers ``a <= i < b`` (of ``num_moe_layers``) have trainable experts, the
        others keep packed INT4 experts, converted as ``k25jax finetune --train-layers A:B`` converts them (``None``:
        all layers).
      master_dtype: the fake-quant masters' dtype (``to_fake_quant(master_dtype=)``).
      state_dtype: AdamW's first moment ``m`` (``OptimizerConfig.state_dtype``); the second moment ``v`` has each
        parameter's own dtype (optax's ``scale_by_adam``).
      scales: the fake-quant scale mode (``"learned"`` scales are trainable parameters too).
      accumulate: micro-batches per optimizer step (``optax.MultiSteps`` keeps a gradient accumulator).
      remat: ``RunConfig.remat``; attention_block: ``RunConfig.attention_block`` (None: plain attention, the whole
        ``[B, H, T, T]`` scores; else the blockwise form, one ``[B, H, block, block]`` block at a time).
    """

    trainable: str = r"^text/"
    train_layers: tuple[int, int] | None = None
    master_dtype: str = "float32"
    state_dtype: str = "float32"
    grid: str = "kimi"
    scales: str = "dynamic"
    accumulate: int = 1
    remat: str = "full"
    attention_block: int | None = None

    def layers(self, moe_layers: int) -> int:
        """How many MoE layers have trainable experts (checks ``train_layers``)."""
        if self.train_layers is None:
            return moe_layers
        a, b = self.train_layers
        if not 0 <= a <= b <= moe_layers:
            raise ValueError(f"--train-layers {a}:{b}: expected 0 <= A <= B <= {moe_layers} (the MoE layers)")
        return b - a

    def describe(self, moe_layers: int) -> str:
        a, b = self.train_layers or (0, moe_layers)
        block = "plain (whole scores)" if self.attention_block is None else f"blockwise, block {self.attention_block}"
        return (
            f"QAT: trainable {self.trainable!r}; experts of MoE layers {a}:{b} ({b - a} of {moe_layers}) as "
            f"{self.master_dtype} fake-quant masters ({self.grid} grid, {self.scales} scales); AdamW m "
            f"{self.state_dtype}, v in the parameter dtype; remat {self.remat}; attention {block}"
        )


def trained_expert_paths(model) -> list[str]:
    """Routed-expert weight paths of ``model`` (``"text/moe_layers/mlp/experts/gate_proj"``)."""
    from k25jax.moe import Experts

    return [
        "/".join(map(str, path)) + f"/{name}"
        for path, module in nnx.iter_modules(model)
        if isinstance(module, Experts)
        for name in Experts.WEIGHTS
    ]


def qat_model(cfg: K25Config, setup: TrainSetup, dtype=jnp.bfloat16, base=None):
    """The abstract model as the QAT trainer holds it: experts whose master path ``setup.trainable`` matches are
    fake-quant (``to_fake_quant``), the rest INT4. ``base``: the abstract unconverted model, if already built.
    Returns ``(model, converted expert paths)``."""
    from k25jax.train.qat import chosen_experts, exact_paths, to_fake_quant

    base = base if base is not None else nnx.eval_shape(lambda: _build(cfg, dtype))
    chosen = chosen_experts(base, setup.trainable)
    if setup.train_layers is not None and setup.train_layers[0] == setup.train_layers[1]:
        chosen = []  # no layer's experts train

    def build():
        model = _build(cfg, dtype)
        if chosen:
            layers = range(*setup.train_layers) if setup.train_layers is not None else None
            to_fake_quant(
                model,
                experts=exact_paths(chosen),
                grid=setup.grid,
                scales=setup.scales,
                master_dtype=setup.master_dtype,
                layers=layers,
            )
        return model

    return nnx.eval_shape(build), chosen


def _per_layers(nbytes: int, stacked: int, layers: int) -> int:
    """Bytes of ``layers`` of a stack of ``stacked`` layers (exact: the layer axis is never sharded)."""
    if nbytes % stacked:
        raise ValueError(f"planner: {nbytes} bytes do not split evenly over {stacked} stacked layers")
    return nbytes // stacked * layers


def qat_state_bytes(cfg: K25Config, mesh: AnyMesh, setup: TrainSetup, dtype=jnp.bfloat16):
    """Per-device bytes of a QAT run's state under the train rules: ``(params by category, gradients, optimizer)``.

    Categories: :data:`MASTERS` (fake-quant masters of the trainable experts), :data:`FQ_SCALES` (their scales),
    :data:`INT4_FROZEN` (packed words + scales of the experts not trained), :data:`OTHER_TRAINABLE`,
    :data:`OTHER_FROZEN`. Gradients: one per trainable element in its dtype. Optimizer: ``jax.eval_shape`` of the
    ``OptimizerConfig`` chain's ``init`` over the trainable part, each moment placed like its parameter, counters
    replicated.
    """
    from k25jax.train.fakequant import LearnedScale, QuantScale
    from k25jax.train.qat import trainable_filter
    from k25jax.train.step import OptimizerConfig

    setup.layers(cfg.text.num_moe_layers)  # checks train_layers
    int4 = nnx.eval_shape(lambda: _build(cfg, dtype))
    model, chosen = qat_model(cfg, setup, dtype, base=int4)
    flt = trainable_filter(setup.trainable)
    _, trainable, _ = nnx.split(model, flt, ...)
    trainable_keys = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    shardings = dict(nnx.to_flat_state(state_shardings(model, mesh, "train")))

    def held(var, path) -> int:
        spec = shardings[path].get_value().spec
        return shard_bytes(tuple(var.shape), var.dtype, spec, mesh)

    params: dict[str, int] = {}
    grads = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = tuple(map(str, path))
        n = held(var, path)
        converted = "/".join(key[:-1]) in chosen
        is_trainable = key in trainable_keys
        if converted and key[-1] == "master":
            cat = MASTERS if is_trainable else FROZEN_MASTERS
        elif isinstance(var, QuantScale | LearnedScale):
            cat = FQ_SCALES
        elif isinstance(var, Int4Packed | Int4Scales):
            cat = INT4_FROZEN
        else:
            cat = OTHER_TRAINABLE if is_trainable else OTHER_FROZEN
        params[cat] = params.get(cat, 0) + n
        if is_trainable:
            grads += n
    tx = OptimizerConfig(state_dtype=setup.state_dtype, accumulate=setup.accumulate).build()
    opt = jax.eval_shape(tx.init, trainable)
    specs = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(state_shardings(trainable, mesh, "train"))[0]:
        specs[tuple(path)] = sharding.spec
    optimizer = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt)[0]:
        for i in range(len(path)):
            if tuple(path[i:]) in specs:  # a moment of a parameter: placed like it
                optimizer += shard_bytes(tuple(leaf.shape), leaf.dtype, specs[tuple(path[i:])], mesh)
                break
        else:  # step counters: replicated
            optimizer += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    return params, grads, optimizer


def qat_activation_bytes(
    cfg: K25Config,
    mesh: AnyMesh,
    batch: int,
    context: int,
    *,
    remat: str = "full",
    attention_block: int | None = None,
    dtype_bytes: int = 2,
    master_layer_values: int = 0,
) -> dict[str, int]:
    """Activations of one QAT train step (estimate), by term; ``context`` tokens per sequence.

    Per device: ``b`` local sequences, ``n = b T`` tokens, ``Hl`` heads; the MoE sees ``N = n g`` tokens (``g``: the
    expert axes the batch is split over, whose tokens are gathered) and holds ``N min(k, E_local)`` rows (the
    dropless buffer). One MoE layer's forward intermediates that its backward reads (``layer``):

    - attention: ``n d (2D + 2Q + 2 Hl (Kn + R) + 2 (C + R) + Hl (Kn + Kv) + Hl Kv)`` (normed input and output,
      c_q and its norm, q before / after rope, latents, expanded keys and values, attention output) plus the scores:
      plain ``b Hl T^2 (4 + 4 + d)`` (float32 scores, float32 probabilities, probabilities in the compute dtype);
      blockwise ``b Hl T 8`` (row max and sum) plus one block ``b Hl block^2 (4 + 4 + d)``, the blocked copies of
      q, k, v, o ``n Hl (2 (Kn + R) + 2 Kv) d`` and float32 dq, dk, dv ``n Hl (2 (Kn + R) + Kv) 4``;
    - MoE: ``n d D`` (normed input) + ``n E 8`` (router logits, scores) + ``N D (d + 4)`` (gathered tokens, the
      float32 combine) + rows ``(D d + F_l (4 + 4 + d) + D 4)`` (row inputs, float32 gate / up, SwiGLU product,
      float32 down) + shared expert ``n (3 Fs_l + D) d``.

    Saved per layer for the backward pass, by ``remat``: ``"none"`` the whole ``layer``; ``"full"`` the layer input
    ``n D d``; ``"dots_no_batch"`` that plus the matmul outputs without batch dims (q_a, q_b, kv_a, k / v
    expansion, o_proj, router, shared expert: ``n d (Q + Hl (Kn + R) + C + R + Hl (Kn + Kv) + D + 2 Fs_l + D) + n E
    4``; the routed experts' ``ragged_dot`` is not a ``dot_general`` and is recomputed); ``"dots"`` that plus
    the batched score and value matmuls of plain attention (``2 b Hl T^2 4 + n Hl Kv d``; blockwise attention's are
    inside its ``custom_vjp`` loop and recomputed). Live while one layer's backward runs: its recomputed forward and
    gradients of about the same size (``2 layer``; ``layer`` under ``"none"``, whose forward is saved). Every layer is
    counted as an MoE layer (the dense layer's MLP is smaller). Logits: float32 logits, log-softmax and their
    gradient, ``3 n V / tensor 4``. Expert weights at use: one layer's local experts gathered to the compute layout
    (``E_local 3 D F_l``) in the compute dtype with a float32 gradient (or, frozen INT4 on the XLA path, a
    dequantized copy), plus the fake-quant float32 temporaries (grouped master, ``q``, ``q s``: 12 bytes per element)
    of ``master_layer_values``, one layer's fake-quant master elements on this device.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"--remat {remat!r} is not one of {REMAT_POLICIES}")
    if attention_block is not None and attention_block < 1:
        raise ValueError(f"--attention-block must be positive, got {attention_block}")
    t, d = cfg.text, dtype_bytes
    b = batch // _split(("batch",), (batch,), mesh)
    T, n = context, b * context
    H = t.num_attention_heads // _split((None, "act_heads"), (1, t.num_attention_heads), mesh)
    D, Q, C, R = t.hidden_size, t.q_lora_rank or 0, t.kv_lora_rank, t.qk_rope_head_dim
    Kn, Kv, E = t.qk_nope_head_dim, t.v_head_dim, t.n_routed_experts
    expert_shards = _split(("experts",), (E,), mesh)
    F = t.moe_intermediate_size // _split(("expert_mlp",), (t.moe_intermediate_size,), mesh)
    shared = t.n_shared_experts * t.moe_intermediate_size
    Fs = shared // _split((None, "act_mlp"), (1, shared), mesh) if shared else 0
    token = logical_spec(("batch",), (batch,), mesh, COMPUTE_RULES, fit=True)[0]
    token_axes = () if token is None else (token,) if isinstance(token, str) else token
    expert_axes = logical_spec(("experts",), (E,), mesh, COMPUTE_RULES)[0] or ()
    expert_axes = (expert_axes,) if isinstance(expert_axes, str) else expert_axes
    N = n * math.prod(mesh.shape[a] for a in expert_axes if a in token_axes)
    rows = N * min(t.num_experts_per_tok, E // expert_shards)
    if attention_block is None:
        scores = b * H * T * T * (4 + 4 + d)
        batched_dots = 2 * b * H * T * T * 4 + n * H * Kv * d
    else:
        block = min(attention_block, T)
        # row max and sum, one block's scores, the blocked copies of q, k, v and o, float32 dq, dk, dv accumulators
        scores = b * H * T * 8 + b * H * block * block * (4 + 4 + d)
        scores += n * H * (2 * (Kn + R) + 2 * Kv) * d + n * H * (2 * (Kn + R) + Kv) * 4
        batched_dots = 0
    attention = n * d * (2 * D + 2 * Q + 2 * H * (Kn + R) + 2 * (C + R) + H * (Kn + Kv) + H * Kv) + scores
    moe = n * d * D + n * E * 8 + N * D * (d + 4) + rows * (D * d + F * (4 + 4 + d) + D * 4) + n * (3 * Fs + D) * d
    layer = attention + moe
    boundary = n * D * d
    unbatched_dots = n * d * (Q + H * (Kn + R) + C + R + H * (Kn + Kv) + D + 2 * Fs + D) + n * E * 4
    saved = {
        "none": layer,
        "full": boundary,
        "dots_no_batch": boundary + unbatched_dots,
        "dots": boundary + unbatched_dots + batched_dots,
    }[remat]
    layers = t.num_hidden_layers
    live = 1 if remat == "none" else 2  # under "none" the forward is among the saved values already
    weights = E // expert_shards * 3 * D * F * (d + 4) + 12 * master_layer_values
    vocab = t.vocab_size // _split((None, "act_vocab"), (1, t.vocab_size), mesh)
    return {
        f"saved for backward ({layers} layers)": layers * saved,
        "one layer's backward: attention": live * attention,
        "one layer's backward: MoE rows": live * moe,
        "one layer's experts at use": weights,
        "logits, log-softmax, gradient (f32)": 3 * n * vocab * 4,
    }


@dataclasses.dataclass
class Plan:
    """Per-device bytes of one planned setup (:func:`plan`), by category, and whether they fit.

    Attributes (beyond the byte counts):
      attention_block: inference: the attention block the activations assume (None: the plain forms).
      max_batch: inference: the largest global batch of sequences of ``context`` tokens whose plan fits on this
        mesh and device (0: not even one), as :func:`plan` with that batch would find it; None for training.
      max_batch_rows: the batch rows each device holds at ``max_batch`` (the batch is split over the batch axes
        that divide it, :func:`max_batch`).
    """

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
    setup: str | None = None  # the QAT setup line (training with a TrainSetup)
    attention_block: int | None = None
    max_batch: int | None = None
    max_batch_rows: int = 0

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
            *([self.setup] if self.setup else []),
            "",
            "per device:",
        ]

        def row(name, value, indent=2):
            lines.append(f"{' ' * indent}{name:<40s}{value / GB:10.2f} GB")

        row("parameters", sum(self.params.values()))
        for k, v in sorted(self.params.items(), key=lambda kv: -kv[1]):
            row(k, v, 4)
        if not self.train:
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
        if self.max_batch is not None:
            devices_ = f"{devices} devices" if devices > 1 else "1 device"
            if self.max_batch:
                lines.append(
                    f"fits {self.max_batch} sequence{'s' if self.max_batch > 1 else ''} of {self.context} tokens "
                    f"(batch {self.max_batch}, {self.max_batch_rows} per device) on these {devices_}"
                )
            else:
                these = "these" if devices > 1 else "this"
                lines.append(f"0 sequences of {self.context} tokens fit on {these} {devices_}")
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
    qat: TrainSetup | None = None,
    attention_block: int | str | None = "auto",
) -> Plan:
    """Plan ``cfg`` on a mesh of ``mesh`` sizes (axis name -> size). Parameters in ``dtype`` except INT4 experts
    (when the config is quantized) and the float32 router bias; the cache in ``cache_dtype``.

    Inference: ``attention_block`` is the ``RunConfig.attention_block`` the activations assume: None plans the
    plain forms (the last prefill chunk's whole ``[B, H, chunk, context]`` scores), an int the blockwise forms
    (:func:`activation_bytes`), ``"auto"`` (default) :data:`LONG_CONTEXT_BLOCK` when ``context`` exceeds
    :data:`LONG_CONTEXT` and plain otherwise (a note says which). ``Plan.max_batch`` is how many sequences of
    ``context`` tokens fit (:func:`max_batch`). Training takes its block from ``qat.attention_block`` instead.

    ``train=True`` with ``qat``: INT4 QAT as ``k25jax.train`` runs it (:func:`qat_state_bytes`,
    :func:`qat_activation_bytes`). Without ``qat``: the older estimate (INT4 experts frozen, every other floating
    parameter trainable, 8 bytes of AdamW state per trainable parameter, per-layer remat, plain attention)."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: known devices are {', '.join(DEVICES)}")
    if batch < 1 or context < 1:
        raise ValueError(f"batch ({batch}) and context ({context}) must be positive")
    if train and attention_block not in ("auto", None):
        raise ValueError("--attention-block with --train: pass it as TrainSetup(attention_block=) (qat=)")
    block = None if train else inference_attention_block(context, attention_block)
    amesh = abstract_mesh(**mesh)
    if train and qat is not None:
        return _qat_plan(cfg, mesh, amesh, batch, context, DEVICES[device], dtype, qat)
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
        acts = activation_bytes(cfg, amesh, batch, context, prefill_chunk, layer, dbytes, attention_block=block)
        p = Plan(cfg.name, mesh, batch, context, train, DEVICES[device], params, cache, acts, attention_block=block)
        notes.append(f"activations: estimate for a {min(prefill_chunk, context)}-token prefill chunk (the larger step)")
        notes.append(_attention_note(cfg, amesh, batch, context, prefill_chunk, dbytes, block, attention_block))
        row = cache_bytes(LatentCache.abstract(cfg.text, 1, context, cache_dtype), amesh)  # one row, its length
        fixed = sum(params.values())
        p.max_batch, p.max_batch_rows = _max_batch(
            cfg, amesh, p.usable - fixed, row, context, prefill_chunk, layer, dbytes, block
        )
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


def _attention_note(cfg, mesh, batch, context, chunk, dbytes, block, asked) -> str:
    plain = activation_bytes(cfg, mesh, batch, context, chunk, 0, dbytes)["attention scores"]
    T = min(chunk, context)
    if block is None:
        hint = "; --attention-block N plans the blockwise form (RunConfig(attention_block=N))" if context > 4096 else ""
        return f"attention: plain forms, the whole [B, H, {T}, {context}] scores of the last chunk{hint}"
    why = f"the default for contexts over {LONG_CONTEXT}; " if asked == "auto" else ""
    return (
        f"attention: blockwise, block {block} ({why}run with RunConfig(attention_block={block})): online softmax over "
        f"[B, H, {min(block, T)}, {min(block, context)}] score blocks; plain [B, H, {T}, {context}] scores would be "
        f"{plain / GB:.2f} GB (--attention-block plain)"
    )


def _max_batch(cfg, mesh, room, row, context, chunk, layer, dbytes, block) -> tuple[int, int]:
    """``(largest global batch, its rows per device)`` whose cache (``row`` bytes per row) and activations fit
    in ``room`` bytes (usable minus parameters); ``(0, 0)`` when one sequence does not.

    A batch of ``n`` is split over the batch axes that divide it (fitted), so per-device bytes are not monotone in
    ``n`` (batch 8 on expert=8 holds one row per device, batch 7 seven). They are a function of the rows per device
    ``b`` and the set ``K`` of axes split, monotone in ``b``: for every ``K`` the largest fitting ``b`` is found by
    bisection, then the largest ``b`` below it whose batch (``b`` times the sizes of ``K``) really splits over ``K``
    (the split depends on ``b`` modulo the product of the batch axes' sizes, so at most that many steps).
    """
    everything = math.prod(mesh.shape.values())
    axes = [a for a in _token_axes(everything, mesh) if mesh.shape[a] > 1]
    period = math.prod(mesh.shape[a] for a in axes)

    def split(n: int) -> frozenset:
        return frozenset(a for a in _token_axes(n, mesh) if mesh.shape[a] > 1)

    best = (0, 0)
    for r in range(len(axes) + 1):
        for kept in map(frozenset, itertools.combinations(axes, r)):
            ways = math.prod(mesh.shape[a] for a in kept)
            gathered = _gathered(tuple(kept), cfg, mesh)

            def fits(b: int) -> bool:
                acts = _step_bytes(cfg, mesh, b, gathered, context, chunk, layer, dbytes, block)
                return b * row + sum(acts.values()) <= room

            if not fits(1):
                continue
            lo = 1
            while fits(2 * lo):
                lo *= 2
            hi = 2 * lo  # fits(lo), not fits(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            for b in range(lo, max(0, lo - period), -1):
                if split(b * ways) == kept:
                    best = max(best, (b * ways, b))
                    break
    return best


def max_batch(
    cfg: K25Config,
    mesh: dict[str, int],
    *,
    context: int,
    device: str = "h200",
    dtype=jnp.bfloat16,
    cache_dtype=jnp.bfloat16,
    prefill_chunk: int = 512,
    attention_block: int | str | None = "auto",
) -> int:
    """How many sequences of ``context`` tokens fit for inference on ``mesh`` (the largest global batch ``n`` for
    which ``plan(cfg, mesh, batch=n, context=context, ...)`` fits; 0 if not even one does). Arguments as
    :func:`plan`. The batch is split over the mesh's batch axes (data, fsdp, expert) that divide it, so a smaller
    batch may not fit where this one does (on expert=8, batch 8 holds one sequence per device, batch 2 two);
    ``plan(...).max_batch_rows`` says how many sequences each device holds."""
    return plan(
        cfg,
        mesh,
        batch=1,
        context=context,
        device=device,
        dtype=dtype,
        cache_dtype=cache_dtype,
        prefill_chunk=prefill_chunk,
        attention_block=attention_block,
    ).max_batch


def _qat_plan(cfg, mesh, amesh, batch, context, device: Device, dtype, setup: TrainSetup) -> Plan:
    params, grads, optimizer = qat_state_bytes(cfg, amesh, setup, dtype)
    moe_layers = cfg.text.num_moe_layers
    trained = setup.layers(moe_layers) if params.get(MASTERS) else 0
    master_values = params.get(MASTERS, 0) // max(1, trained) // jnp.dtype(setup.master_dtype).itemsize
    acts = qat_activation_bytes(
        cfg,
        amesh,
        batch,
        context,
        remat=setup.remat,
        attention_block=setup.attention_block,
        dtype_bytes=jnp.dtype(dtype).itemsize,
        master_layer_values=master_values,
    )
    p = Plan(cfg.name, mesh, batch, context, True, device, params, 0, acts, grads, optimizer)
    p.setup = setup.describe(moe_layers)
    p.notes = [
        "parameters, gradients and optimizer state are exact: the abstract model converted as k25jax.train converts "
        "it (to_fake_quant, trainable_filter), placed by the train rules; optax's AdamW init traced over the "
        f"trainable part (m {setup.state_dtype}, v in each parameter's dtype, counters replicated)",
        "activations: estimate (qat_activation_bytes); the MoE row buffer is dropless (tokens x min(k, local "
        "experts) rows): a batch split over the expert axis gathers the expert group's tokens and multiplies it",
    ]
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
