"""Mixture of experts: sigmoid router with selection-only bias and group-limited top-k, routed experts, shared expert.

Math: ``shared/docs/k25-architecture.md`` section 2 (MoE gate). Dispatch sorts the (token, choice) pairs by
expert and runs the experts' SwiGLU over contiguous row groups (dropless: no capacity factor) with one op,
:func:`pallas_kernels.grouped_swiglu.grouped_swiglu`, which chooses its strategy (grouped matmuls, CPU scans,
Pallas kernels) when lowering. On a mesh that splits the experts, :mod:`k25jax.expert_parallel` runs the same op
per device under ``shard_map``: one call per mesh case, no backend test here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax import expert_parallel
from k25jax.config import RunConfig, TextConfig
from k25jax.layers import MLP, param, zeros_init
from k25jax.quant import Int4Array, Int4Weight
from k25jax.sharding import expert_layout
from pallas_kernels.grouped_swiglu import SwiGLUWeights, grouped_swiglu


def route(
    x: jax.Array, router_weight: jax.Array, correction_bias: jax.Array, cfg: TextConfig
) -> tuple[jax.Array, jax.Array]:
    """Choose experts for each token.

    Args:
      x: ``[N, D]`` hidden states.
      router_weight: ``[D, E]``.
      correction_bias: ``[E]`` float32, added for selection only.
    Returns:
      ``weights [N, k]`` float32 (normalised, times ``routed_scaling_factor``) and ``experts [N, k]`` int32.
    """
    scores = jax.nn.sigmoid(
        jnp.einsum(
            "nd,de->ne", x.astype(jnp.float32), router_weight.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
    )
    choice = scores + correction_bias.astype(jnp.float32)
    E, G = cfg.n_routed_experts, cfg.n_group
    if G > 1:
        grouped = choice.reshape(-1, G, E // G)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]: each group's top-2 sum
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
        keep = jax.nn.one_hot(top_groups, G, dtype=jnp.bool_).any(axis=1)  # [N, G]
        choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(-1, E)
    _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, experts.astype(jnp.int32)


ExpertWeight = jax.Array | Int4Array  # [E, in, out]: plain (bf16 release) or INT4 (quantized release)


def is_stacked(weights: SwiGLUWeights) -> bool:
    """Whether expert weights carry a leading layer axis (``[L, E, in, out]``: a cached layer scan keeps them
    whole) rather than being one layer's ``[E, in, out]`` (static: from the shapes)."""
    return weights.gate.ndim == 4


class Experts(nnx.Module):
    """Routed expert weights stacked ``[E, D, F]`` / ``[E, F, D]``, run by
    :func:`pallas_kernels.grouped_swiglu.grouped_swiglu` as the run config says (``run.kernels``,
    ``run.experts``).

    Built as plain parameters; a model of a quantized release calls :meth:`to_int4` once (in
    :class:`~k25jax.model.K25`), after which the weights are :class:`~k25jax.quant.Int4Weight` and stay packed.
    The op takes the weights as values (plain arrays or :class:`~k25jax.quant.Int4Array`), so a new weight type
    (a QAT fake-quant weight) needs no branch here.
    """

    WEIGHTS = ("gate_proj", "up_proj", "down_proj")
    AXES = {
        "gate_proj": ("experts", "expert_embed", "expert_mlp"),
        "up_proj": ("experts", "expert_embed", "expert_mlp"),
        "down_proj": ("experts", "expert_mlp", "expert_embed"),
    }

    def __init__(self, cfg: TextConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.run = run
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        dt = run.params
        self.gate_proj = param(rngs, (E, D, F), self.AXES["gate_proj"], dt, what="Experts.gate_proj")
        self.up_proj = param(rngs, (E, D, F), self.AXES["up_proj"], dt, what="Experts.up_proj")
        self.down_proj = param(rngs, (E, F, D), self.AXES["down_proj"], dt, what="Experts.down_proj")

    def to_int4(self) -> None:
        """Replace the plain weights by INT4 ones (release quantization rule; logical axes kept)."""
        for name in self.WEIGHTS:
            weight = getattr(self, name)
            if isinstance(weight, nnx.Param):
                axes = weight.get_metadata()["out_sharding"]
                setattr(self, name, Int4Weight.from_float(weight[...], axes, what=f"Experts.{name}"))

    def values(self) -> SwiGLUWeights:
        """The three projections as values (``[E, in, out]``, or ``[L, E, in, out]`` in a layer scan that keeps
        the experts whole): plain arrays or still-packed :class:`Int4Array`."""
        return SwiGLUWeights(*(getattr(self, n)[...] for n in self.WEIGHTS))

    def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """``x_sorted [M, D]`` rows grouped by expert (``group_sizes [E]``) -> ``[M, D]`` float32. ``layer``: which
        layer this is, used when the weights are layer-stacked (``[L, E, ...]``: only that layer's experts are
        read); ignored for per-layer weights."""
        weights = self.values()
        return self.swiglu(x_sorted, group_sizes, weights, layer if is_stacked(weights) else None)

    def swiglu(self, rows, group_sizes, weights: SwiGLUWeights, layer=None) -> jax.Array:
        run = self.run
        return grouped_swiglu(
            rows, group_sizes, weights, dtype=run.compute, kernels=run.kernels, strategy=run.experts, layer=layer
        )


class MoE(nnx.Module):
    def __init__(self, cfg: TextConfig, run: RunConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.run = run
        E, D = cfg.n_routed_experts, cfg.hidden_size
        dt = run.params
        self.router = param(rngs, (D, E), ("embed", "router"), dt, what="MoE.router")
        self.correction_bias = param(rngs, (E,), ("router",), jnp.float32, zeros_init, "MoE.correction_bias")
        self.experts = Experts(cfg, run, rngs=rngs)
        self.shared = (
            MLP(D, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype=run.compute, param_dtype=dt, rngs=rngs)
            if cfg.n_shared_experts
            else None
        )

    @property
    def dtype(self):
        return self.run.compute

    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """``x [B, T, D]`` -> ``[B, T, D]``: ``sum_k w_k E_k(x) + shared(x)``. ``layer``: the routed experts are
        layer-stacked (a cached layer scan keeps them whole) and this is layer ``layer``."""
        return self._apply(x, layer)[0]

    def with_load(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(self(x), load)``: ``load [E]`` int32 counts the tokens with ``valid [B, T]`` routed to each expert
        (one per (token, choice) pair; padding not counted). For the training loss (router load statistics and the
        aux-loss-free bias update); the output is what ``self(x)`` computes."""
        return self._apply(x, None, valid)

    def _apply(self, x: jax.Array, layer, valid=None) -> tuple[jax.Array, jax.Array | None]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        route_params = (self.router[...], self.correction_bias[...])
        whole = self.experts.values()
        layer = layer if is_stacked(whole) else None
        layout = expert_layout(shape[0], self.cfg.n_routed_experts)
        if layout is None:
            weights, experts = route(tokens, *route_params, self.cfg)
            routed = lambda rows, group_sizes: self.experts.swiglu(rows, group_sizes, whole, layer)
            out = dispatch_combine(tokens, weights, experts, routed, self.cfg.n_routed_experts)
        else:  # experts split over the active mesh: each device runs its own experts on the tokens routed to them
            experts = None
            lead = ("layers",) if layer is not None else ()
            axes = SwiGLUWeights(*(lead + Experts.AXES[n] for n in Experts.WEIGHTS))
            out = expert_parallel.dispatch_combine(
                tokens,
                lambda x, w, b: route(x, w, b, self.cfg),
                route_params,
                whole,
                axes,
                layer,
                self.experts.swiglu,
                self.cfg.n_routed_experts,
                layout,
                self.dtype,
            )
        load = None
        if valid is not None:
            if experts is None:  # routed inside shard_map above: route again here (one [N, D] x [D, E] matmul)
                experts = route(tokens, *route_params, self.cfg)[1]
            load = expert_load(experts, valid.reshape(-1), self.cfg.n_routed_experts)
        return self._add_shared(out, x), load

    def _add_shared(self, routed: jax.Array, x: jax.Array) -> jax.Array:
        out = routed.astype(self.dtype).reshape(x.shape)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


def expert_load(experts: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """``experts [N, k]`` chosen per token, ``valid [N]`` -> ``[E]`` int32: how many valid tokens chose each
    expert."""
    k = experts.shape[-1]
    weights = jnp.repeat(valid.astype(jnp.int32), k)
    return jnp.bincount(experts.reshape(-1), weights=weights, length=num_experts).astype(jnp.int32)


def dispatch_combine(
    tokens: jax.Array, weights: jax.Array, experts: jax.Array, expert_fn, num_experts: int
) -> jax.Array:
    """Sort (token, choice) pairs by expert, run ``expert_fn(rows, group_sizes)``, weight and sum back.

    ``tokens [N, D]``, ``weights``/``experts [N, k]`` -> ``[N, D]`` float32. No ``[N, E]`` tensor is formed.
    """
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of_row = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    rows = expert_fn(tokens[token_of_row], group_sizes)
    rows = rows.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, tokens.shape[-1]), jnp.float32).at[token_of_row].add(rows)
