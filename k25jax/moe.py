"""Mixture of experts: sigmoid router with selection-only bias and group-limited top-k, routed experts, shared expert.

Math: ``shared/docs/k25-architecture.md`` section 2 (MoE gate). Dispatch sorts the (token, choice) pairs by
expert and runs the experts as grouped matmuls over contiguous row groups (dropless: no capacity factor). On a
mesh that splits the experts, :mod:`k25jax.expert_parallel` runs the same per-device under ``shard_map``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax import expert_parallel
from k25jax.config import TextConfig
from k25jax.layers import MLP, param, zeros_init
from k25jax.quant import Int4Array, Int4Weight
from k25jax.sharding import ExpertLayout, expert_layout
from pallas_kernels.int4_gmm.ops import int4_gmm


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


def expert_matmul(rows: jax.Array, weight: ExpertWeight, group_sizes: jax.Array, *, dtype, kernels: str) -> jax.Array:
    """Grouped matmul ``rows [M, in]`` (sorted by expert, ``group_sizes [E]``) x ``weight [E, in, out]`` -> float32.

    INT4 weights stay packed: ``int4_gmm`` (XLA or Pallas as ``kernels`` says) dequantizes tiles on the fly.
    """
    rows = rows.astype(dtype)
    if isinstance(weight, Int4Array):
        return int4_gmm(rows, weight.packed, weight.scales, group_sizes, impl=kernels, out_dtype=jnp.float32)
    return jax.lax.ragged_dot(rows, weight.astype(dtype), group_sizes, preferred_element_type=jnp.float32)


def expert_swiglu(
    x_sorted: jax.Array,
    group_sizes: jax.Array,
    gate: ExpertWeight,
    up: ExpertWeight,
    down: ExpertWeight,
    *,
    dtype,
    kernels: str = "xla",
) -> jax.Array:
    """The routed experts' SwiGLU over rows sorted by expert: ``down(silu(gate x) * up x)`` -> ``[M, D]`` float32.

    A pure function of (rows, group sizes, the experts' weights) so that expert parallelism can run it on each
    device's local experts.
    """
    hidden = jax.nn.silu(expert_matmul(x_sorted, gate, group_sizes, dtype=dtype, kernels=kernels))
    hidden = hidden * expert_matmul(x_sorted, up, group_sizes, dtype=dtype, kernels=kernels)
    return expert_matmul(hidden, down, group_sizes, dtype=dtype, kernels=kernels)


class Experts(nnx.Module):
    """Routed expert weights stacked ``[E, D, F]`` / ``[E, F, D]`` and their grouped SwiGLU.

    Built as plain parameters; a model of a quantized release calls :meth:`to_int4` once (in
    :class:`~k25jax.model.K25`), after which the weights are :class:`~k25jax.quant.Int4Weight` and stay packed.
    ``kernels`` (``"xla"`` | ``"pallas"`` ...) is a run setting chosen on the model
    (:meth:`k25jax.model.K25.set_kernels`), not a config field.

    Inside a layer scan that keeps the expert weights whole (``k25jax.text.scan_layers`` with a cache), the
    weights are the whole stack ``[L, E, ...]`` and ``layer_index`` says which layer this is; :meth:`weight` and
    :meth:`expert_weight` hide the difference.
    """

    WEIGHTS = ("gate_proj", "up_proj", "down_proj")
    AXES = {
        "gate_proj": ("experts", "expert_embed", "expert_mlp"),
        "up_proj": ("experts", "expert_embed", "expert_mlp"),
        "down_proj": ("experts", "expert_mlp", "expert_embed"),
    }
    layer_index: jax.Array | None = None  # set only on a layer merged from whole (layer-stacked) weights

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernels = "xla"
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = param(rngs, (E, D, F), self.AXES["gate_proj"], param_dtype, what="Experts.gate_proj")
        self.up_proj = param(rngs, (E, D, F), self.AXES["up_proj"], param_dtype, what="Experts.up_proj")
        self.down_proj = param(rngs, (E, F, D), self.AXES["down_proj"], param_dtype, what="Experts.down_proj")

    def to_int4(self) -> None:
        """Replace the plain weights by INT4 ones (release quantization rule; logical axes kept)."""
        for name in self.WEIGHTS:
            weight = getattr(self, name)
            if isinstance(weight, nnx.Param):
                axes = weight.get_metadata()["out_sharding"]
                setattr(self, name, Int4Weight.from_float(weight[...], axes, what=f"Experts.{name}"))

    def weight(self, name: str) -> ExpertWeight:
        """All experts of one projection, ``[E, in, out]``: a plain array or an :class:`Int4Array` (still packed)."""
        w = getattr(self, name)[...]
        if self.layer_index is not None:
            w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.layer_index, 0, keepdims=False), w)
        return w

    def expert_weight(self, name: str, expert: jax.Array) -> jax.Array:
        """One expert's projection ``[in, out]`` in the compute dtype (only that expert is read)."""
        w = getattr(self, name)[...]
        index = (expert,) if self.layer_index is None else (self.layer_index, expert)
        w = w[index]
        return (w.dequantize(self.dtype) if isinstance(w, Int4Array) else w).astype(self.dtype)

    def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """``x_sorted [M, D]`` rows grouped by expert (``group_sizes [E]``) -> ``[M, D]`` float32."""
        if tiles_pay(x_sorted.shape[0], group_sizes.shape[0], self.kernels):
            return self.tiled(x_sorted, group_sizes)
        gate, up, down = (self.weight(n) for n in self.WEIGHTS)
        return expert_swiglu(x_sorted, group_sizes, gate, up, down, dtype=self.dtype, kernels=self.kernels)

    def swiglu_one(self, x: jax.Array, expert: jax.Array) -> jax.Array:
        """SwiGLU of ``x [..., D]`` (compute dtype) through one ``expert`` (only its weights are read) -> float32."""

        def mm(a, name):
            return jnp.dot(a, self.expert_weight(name, expert), preferred_element_type=jnp.float32)

        hidden = (jax.nn.silu(mm(x, "gate_proj")) * mm(x, "up_proj")).astype(self.dtype)
        return mm(hidden, "down_proj")

    def tiled(self, x_sorted: jax.Array, group_sizes: jax.Array, tile: int | None = None) -> jax.Array:
        """The grouped SwiGLU as a scan over row tiles, each tile within one expert's group: only the experts that
        have rows are computed (and dequantized), ``TILE_ROWS`` rows at a time. Same math per row as
        :func:`expert_swiglu` (float32 accumulation); the CPU path for many rows (see :func:`tiles_pay`)."""
        tm = tile or TILE_ROWS
        m, d = x_sorted.shape
        e_count = group_sizes.shape[0]
        n_tiles = -(-m // tm) + e_count  # static bound: each group adds at most one partial tile
        ends = jnp.cumsum(group_sizes)
        starts = ends - group_sizes
        tiles = (group_sizes + tm - 1) // tm
        tile_end = jnp.cumsum(tiles)
        t = jnp.arange(n_tiles)
        expert = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), e_count - 1)
        row0 = starts[expert] + (t - (tile_end - tiles)[expert]) * tm
        limit = jnp.where(t < tile_end[-1], ends[expert], 0)  # rows below this belong to the tile's expert
        x_padded = jnp.pad(x_sorted.astype(self.dtype), ((0, tm), (0, 0)))
        offsets = jnp.arange(tm)

        def compute(out, e, r0, lim):
            y = self.swiglu_one(jax.lax.dynamic_slice_in_dim(x_padded, r0, tm), e)
            current = jax.lax.dynamic_slice_in_dim(out, r0, tm)
            mask = (r0 + offsets < lim)[:, None]  # a tile's last rows may belong to the next group: keep those
            return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask, y, current), r0, 0)

        def body(out, sched):
            e, r0, lim = sched
            return jax.lax.cond(lim > r0, compute, lambda out, *_: out, out, e, r0, lim), None

        out, _ = jax.lax.scan(body, jnp.zeros((m + tm, d), jnp.float32), (expert, row0, limit))
        return out[:m]

    def parallel(self, tokens: jax.Array, route_fn, route_params: tuple, layout: ExpertLayout) -> jax.Array:
        """Expert-parallel ``sum_k w_k E_k(x)`` on the active mesh: ``tokens [N, D]`` -> ``[N, D]`` in the compute
        dtype; ``route_fn(tokens, *route_params) -> (weights, experts)`` runs on each device's own tokens. The whole
        weights go in; each device computes with its own experts (:mod:`k25jax.expert_parallel`)."""
        whole = {n: getattr(self, n)[...] for n in self.WEIGHTS}
        lead = ("layers",) if self.layer_index is not None else ()
        axes = {n: lead + self.AXES[n] for n in self.WEIGHTS}

        def local(rows, group_sizes, w):
            gate, up, down = (w[n] for n in self.WEIGHTS)
            return expert_swiglu(rows, group_sizes, gate, up, down, dtype=self.dtype, kernels=self.kernels)

        count = int(next(iter(whole.values())).shape[len(lead)])
        return expert_parallel.dispatch_combine(
            tokens, route_fn, route_params, whole, axes, self.layer_index, local, count, layout, self.dtype
        )


class MoE(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        E, D = cfg.n_routed_experts, cfg.hidden_size
        self.router = param(rngs, (D, E), ("embed", "router"), param_dtype, what="MoE.router")
        self.correction_bias = param(rngs, (E,), ("router",), jnp.float32, zeros_init, "MoE.correction_bias")
        self.experts = Experts(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared = (
            MLP(D, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if cfg.n_shared_experts
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, D]`` -> ``[B, T, D]``: ``sum_k w_k E_k(x) + shared(x)``."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        layout = expert_layout(shape[0], self.cfg.n_routed_experts)
        if layout is not None:  # experts split over the active mesh
            route_params = (self.router[...], self.correction_bias[...])
            out = self.experts.parallel(tokens, lambda x, w, b: route(x, w, b, self.cfg), route_params, layout)
            return self._add_shared(out, x)
        weights, experts = route(tokens, self.router[...], self.correction_bias[...], self.cfg)
        if per_pair_pays(tokens.shape[0] * self.cfg.num_experts_per_tok, self.cfg, self.experts.kernels):
            out = per_pair_experts(tokens, weights, experts, self.experts)
        else:
            out = dispatch_combine(tokens, weights, experts, self.experts, self.cfg.n_routed_experts)
        return self._add_shared(out, x)

    def _add_shared(self, routed: jax.Array, x: jax.Array) -> jax.Array:
        out = routed.astype(self.dtype).reshape(x.shape)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


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


# Few (token, expert) pairs (decode): running the pairs one by one reads only the chosen experts' weights, at most
# one pass over the experts, where a grouped matmul may touch all of them (XLA's CPU ragged_dot is a masked dense
# matmul over every expert, plus a transposed copy of the weights). One expert is in flight at a time, so no
# [pairs, D, F] copy of the weights is ever formed.


# Many pairs on CPU (prefill): XLA's CPU ragged_dot computes every expert for every row, E times the work. A scan
# over row tiles that each lie within one expert's group computes about ceil(rows / TILE_ROWS) + E tiles instead.
TILE_ROWS = 32


def tiles_pay(rows: int, num_experts: int, kernels: str = "xla") -> bool:
    """Whether :meth:`Experts.tiled` should run ``rows`` sorted rows over ``num_experts`` experts (static): the
    XLA path on CPU only, and only when the tiles (at most ``rows / TILE_ROWS + E``) do less work than the dense
    ``E x rows`` of ragged_dot by a clear margin."""
    if kernels != "xla" or jax.default_backend() != "cpu" or num_experts < 2:
        return False
    return 4 * (-(-rows // TILE_ROWS) + num_experts) * TILE_ROWS <= num_experts * rows


def per_pair_pays(pairs: int, cfg: TextConfig, kernels: str = "xla") -> bool:
    """Whether :func:`per_pair_experts` should run ``pairs`` (token, expert) pairs (static).

    Only for the XLA path on CPU (whose ragged_dot is dense) and at most ``E`` pairs; accelerators and the Pallas
    grouped kernel skip empty experts by themselves, and a serial scan of tiny matmuls would waste them.
    """
    return kernels == "xla" and jax.default_backend() == "cpu" and pairs <= cfg.n_routed_experts


def per_pair_experts(tokens: jax.Array, weights: jax.Array, experts: jax.Array, routed: Experts) -> jax.Array:
    """``sum_k w_k E_k(x)`` one (token, expert) pair at a time (a scan): ``tokens [N, D]``, ``weights``/``experts
    [N, k]`` -> ``[N, D]`` float32. Same per-row math as :func:`dispatch_combine` (float32 accumulation)."""
    dt = routed.dtype
    n, k = experts.shape
    rows = jnp.repeat(tokens.astype(dt), k, axis=0)  # [N*k, D]

    def one(_, pair):
        x, e = pair
        return None, routed.swiglu_one(x, e)

    _, out = jax.lax.scan(one, None, (rows, experts.reshape(-1)))
    return jnp.einsum("nkd,nk->nd", out.reshape(n, k, -1), weights.astype(jnp.float32))
