"""Expert parallelism: the routed experts under ``shard_map``, each device running only the experts it holds.

Layout (``k25jax.sharding.ExpertLayout``): the experts are split over the expert mesh axes (each device holds
``E / shards`` of them, and never receives another device's), their SwiGLU width over the tensor axes; tokens
arrive split by batch row. Dispatch is **all-gather + reduce-scatter**:

1. each device routes its own tokens (the router is replicated); tokens and routing are all-gathered over the
   expert axes the tokens are split over, so every device of an expert group sees the group's tokens;
2. each device sorts the (token, choice) pairs that chose one of *its* experts to the front (pairs for other
   devices' experts go last and are not computed) and runs them as a grouped matmul over its local experts
   (:func:`pallas_kernels.grouped_swiglu.grouped_swiglu`: INT4 or plain weights, XLA or Pallas);
3. the weighted rows are summed back per token, and the per-device partial outputs are reduce-scattered over
   the gathered axes (psum over tensor axes for the split SwiGLU width, and over expert axes the tokens were
   not split over, e.g. a decode batch smaller than the expert group).

Dropless: the row buffer holds every pair that can land on a device, ``N * min(k, E_local)`` (a token picks k
distinct experts, at most ``E_local`` of them local), so no pair is ever dropped and there is no capacity
factor; no ``[tokens, experts]`` tensor is formed. Why this rather than an all-to-all: per MoE layer each device
sends ``2 (ep-1)/ep N D`` values here against ``2 (ep-1)/ep N k D / ep`` for an exact ragged all-to-all: the same
at K2.5's ``k = 8`` on 8 expert shards (measured from the compiled program, ``benchmarks/moe_comm.py``: 205.8 vs
204.7 MB for an 8 x 512-token prefill chunk in float32). A ragged all-to-all is unimplemented on XLA:CPU (no test
could run it here) and limited in peers on GPU; the padded all-to-all that stands in for it moves 8x more. With
more expert shards than ``k`` the all-to-all would move less (``k / ep``): see the README section "Sharding,
multi-host and memory planning".
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from k25jax.sharding import ExpertLayout
from pallas_kernels.grouped_swiglu import SwiGLUWeights

ExpertFn = Callable  # (rows [M, D], group_sizes [E_local], local weights, layer) -> [M, D] float32


def weight_specs(weights: SwiGLUWeights, axes: SwiGLUWeights, layout: ExpertLayout) -> SwiGLUWeights:
    """``PartitionSpec`` pytrees for expert weights: a plain array gets one spec; a weight value type (INT4,
    fake-quant, LoRA) one per leaf, from the per-leaf logical axes its ``leaf_axes`` gives."""
    specs = []
    for name, w, w_axes in zip(SwiGLUWeights._fields, weights, axes, strict=True):
        what = f"Experts.{name}"
        if hasattr(w, "leaf_axes"):
            leaf_axes = w.leaf_axes(tuple(w_axes))
            is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
            specs.append(
                jax.tree.map(lambda ax, leaf: layout.weight_spec(ax, leaf.shape, what), leaf_axes, w, is_leaf=is_axes)
            )
        else:
            specs.append(layout.weight_spec(tuple(w_axes), w.shape, what))
    return SwiGLUWeights(*specs)


def local_dispatch_combine(
    tokens: jax.Array,
    route_weights: jax.Array,
    route_experts: jax.Array,
    first_expert: jax.Array,
    local_count: int,
    expert_fn: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """One device's share: the pairs routed to experts ``first_expert .. first_expert + local_count - 1``.

    ``tokens [N, D]``, ``route_weights``/``route_experts [N, k]`` -> partial output ``[N, D]`` float32 (zero for
    tokens none of whose experts are local). ``expert_fn(rows, group_sizes [local_count])`` runs the local experts.
    """
    n, k = route_experts.shape
    local = route_experts.reshape(-1) - first_expert
    mine = (local >= 0) & (local < local_count)
    key = jnp.where(mine, local, local_count)  # other devices' pairs sort last
    capacity = n * min(k, local_count)  # every local pair fits: dropless
    order = jnp.argsort(key, stable=True)[:capacity]
    group_sizes = jnp.bincount(key, length=local_count + 1)[:local_count].astype(jnp.int32)
    token_of_row = order // k
    rows = expert_fn(tokens[token_of_row], group_sizes)
    row_weights = jnp.where(mine, route_weights.reshape(-1).astype(jnp.float32), 0.0)[order]
    # Rows past the local pairs belong to no group; zero them whatever the matmul left there.
    rows = jnp.where(mine[order][:, None], rows.astype(jnp.float32) * row_weights[:, None], 0.0)
    return jnp.zeros((n, tokens.shape[-1]), jnp.float32).at[token_of_row].add(rows)


def dispatch_combine(
    tokens: jax.Array,
    route_fn: Callable,
    route_params: tuple,
    expert_weights: SwiGLUWeights,
    weight_axes: SwiGLUWeights,
    layer_index: jax.Array | None,
    expert_fn: ExpertFn,
    num_experts: int,
    layout: ExpertLayout,
    out_dtype,
) -> jax.Array:
    """``sum_k w_k E_k(x)`` with the experts split over the mesh (module doc): ``tokens [N, D]`` -> ``[N, D]`` in
    ``out_dtype``. ``route_fn(tokens, *route_params)`` gives ``(weights, experts) [N, k]`` (params replicated).

    ``expert_weights`` are the whole expert weights ``[E, in, out]`` (``[L, E, in, out]`` with ``layer_index``,
    the cached layer scan's whole stacks), ``weight_axes`` their logical axes. ``expert_fn(rows, group_sizes,
    local_weights, layer_index)`` computes the local experts' rows in float32 (reading only ``layer_index``'s
    experts of a layer-stacked weight).
    """
    local_count = num_experts // layout.expert_shards
    token_spec = layout.token_spec
    specs = weight_specs(expert_weights, weight_axes, layout)
    gather, summed = layout.gather_axes, layout.sum_axes

    def body(tokens, route_params, weights, *index):
        route_weights, route_experts = route_fn(tokens, *route_params)
        if gather:
            tokens, route_weights, route_experts = (
                jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (tokens, route_weights, route_experts)
            )
        first = layout.shard_index() * local_count
        layer = index[0] if index else None

        def local(rows, group_sizes):
            return expert_fn(rows, group_sizes, weights, layer)

        out = local_dispatch_combine(tokens, route_weights, route_experts, first, local_count, local)
        out = out.astype(out_dtype)  # partial sums travel in the compute dtype
        if gather:
            out = jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True)
        if summed:
            out = jax.lax.psum(out, summed)
        return out

    args = (tokens, tuple(route_params), expert_weights)
    in_specs = (token_spec, PartitionSpec(), specs)
    if layer_index is not None:
        args += (jnp.asarray(layer_index, jnp.int32),)
        in_specs += (PartitionSpec(),)
    # check_vma=False: Pallas kernels inside shard_map (the INT4 grouped kernel) cannot declare how their outputs
    # vary over the mesh under jax 0.10; gradients through this map are checked against one device in the tests.
    return jax.shard_map(body, in_specs=in_specs, out_specs=token_spec, check_vma=False)(*args)
