"""Two CPU strategies for the grouped SwiGLU. XLA:CPU's ``ragged_dot`` is a masked dense matmul over every expert
(``E`` times the work, plus a transposed copy of the weights), so on CPU:

- :func:`tiled` (many rows, prefill): a scan over row tiles aligned to each expert's group
  (:func:`pallas_kernels.int4_gmm.schedule.group_tiles`: no row computed twice, unlike the fixed tile boundaries
  the kernels' visit schedule uses): about ``M / tile + E`` small matmuls, and experts with no rows are never
  read (nor dequantized). ``ops.cpu_tile`` sizes the tiles to the mean group (at most ``TILE_ROWS``).
- :func:`per_row` (few rows, decode): a scan over the rows, each through its own expert: only the chosen experts'
  weights are read, one expert in flight at a time, so no ``[rows, D, F]`` copy of the weights is ever formed.

Both compute each row exactly as :func:`pallas_kernels.grouped_swiglu.reference.grouped_swiglu` does (float32
accumulation, the hidden activation cast to the compute dtype) and take a layer-stacked weight ``[L, E, in, out]``
with ``layer``: then each step reads ``[layer, expert]`` only, never a copy of a whole layer's experts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.int4_gmm.schedule import group_tiles

TILE_ROWS = 32  # the most rows per tile of :func:`tiled` (training batches; ``ops.cpu_tile``)


def expert_weight(weight, expert: jax.Array, layer: jax.Array | None, dtype) -> jax.Array:
    """One expert's ``[in, out]`` in ``dtype`` (only that expert is read). A value type other than a plain array
    indexes its leading axes and has ``dequantize(dtype)``."""
    w = weight[expert] if layer is None else weight[layer, expert]
    dequantize = getattr(w, "dequantize", None)
    return (dequantize(dtype) if dequantize is not None else w).astype(dtype)


def swiglu_one(x: jax.Array, expert: jax.Array, gate, up, down, layer, dtype) -> jax.Array:
    """SwiGLU of ``x [..., D]`` (compute dtype) through one ``expert`` -> float32."""

    def mm(a, w):
        return jnp.dot(a, expert_weight(w, expert, layer, dtype), preferred_element_type=jnp.float32)

    hidden = (jax.nn.silu(mm(x, gate)) * mm(x, up)).astype(dtype)
    return mm(hidden, down)


def tiled(rows, group_sizes, gate, up, down, *, dtype, layer=None, tile: int = TILE_ROWS) -> jax.Array:
    """The grouped SwiGLU as a scan over row tiles aligned to each expert's group -> ``[M, D]`` float32.

    Per-layer weights get a backward of their own (:func:`_tiled_vjp`): autodiff of the scan would add a
    cotangent the size of all the experts at every tile; the custom backward accumulates each tile's weight
    gradient into its expert's slice and pulls the result back through the weight types' ``dequantize`` once."""
    if layer is None:
        return _tiled_vjp(rows, group_sizes, (gate, up, down), jnp.dtype(dtype), tile)
    return _tiled_forward(rows, group_sizes, gate, up, down, dtype, layer, tile)


def _tiled_forward(rows, group_sizes, gate, up, down, dtype, layer, tile):
    m, d = rows.shape
    schedule = group_tiles(group_sizes, m, tile)
    x_padded = jnp.pad(rows.astype(dtype), ((0, tile), (0, 0)))
    offsets = jnp.arange(tile, dtype=jnp.int32)

    def compute(out, expert, r0, hi):
        y = swiglu_one(jax.lax.dynamic_slice_in_dim(x_padded, r0, tile), expert, gate, up, down, layer, dtype)
        current = jax.lax.dynamic_slice_in_dim(out, r0, tile)
        mine = (r0 + offsets < hi)[:, None]  # a tile's last rows may belong to the next group: keep those
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, current), r0, 0)

    def body(out, visit):
        expert, r0, hi = visit
        return jax.lax.cond(hi > r0, compute, lambda out, *_: out, out, expert, r0, hi), None

    visits = (schedule.group_ids, schedule.row0, schedule.hi)
    out, _ = jax.lax.scan(body, jnp.zeros((m + tile, d), jnp.float32), visits)
    return out[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled_vjp(rows, group_sizes, weights, dtype, tile):
    return _tiled_forward(rows, group_sizes, *weights, dtype, None, tile)


def _tiled_fwd(rows, group_sizes, weights, dtype, tile):
    return _tiled_forward(rows, group_sizes, *weights, dtype, None, tile), (rows, group_sizes, weights)


def _dense(weight, dtype):
    dequantize = getattr(weight, "dequantize", None)
    return (dequantize(dtype) if dequantize is not None else weight).astype(dtype)


def _tiled_bwd(dtype, tile, residuals, g):
    """Per tile: recompute the SwiGLU, ``dx`` into the tile's rows and ``dW`` into its expert's slice (in place);
    then one pull-back of the dense gradients through each weight's ``dequantize`` (straight-through for fake-quant,
    none for INT4 words)."""
    rows, group_sizes, weights = residuals
    m, d = rows.shape
    schedule = group_tiles(group_sizes, m, tile)
    x_padded = jnp.pad(rows.astype(dtype), ((0, tile), (0, 0)))
    g_padded = jnp.pad(g.astype(jnp.float32), ((0, tile), (0, 0)))
    offsets = jnp.arange(tile, dtype=jnp.int32)
    dense, pullback = jax.vjp(lambda ws: tuple(_dense(w, dtype) for w in ws), weights)
    gate, up, down = dense

    def mm(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32)

    def compute(carry, expert, r0, hi):
        dx, d_gate, d_up, d_down = carry
        mine = (r0 + offsets < hi)[:, None]
        x = jax.lax.dynamic_slice_in_dim(x_padded, r0, tile)
        dy = jnp.where(mine, jax.lax.dynamic_slice_in_dim(g_padded, r0, tile), 0.0)
        a, b = mm(x, gate[expert]), mm(x, up[expert])
        sig = jax.nn.sigmoid(a)
        silu = a * sig
        hidden = (silu * b).astype(dtype)
        dh = mm(dy.astype(dtype), down[expert].T)
        da = dh * b * sig * (1 + a * (1 - sig))
        db = dh * silu
        dx_tile = mm(da.astype(dtype), gate[expert].T) + mm(db.astype(dtype), up[expert].T)
        dx_tile = jnp.where(mine, dx_tile, 0.0)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, jax.lax.dynamic_slice_in_dim(dx, r0, tile) + dx_tile, r0, 0)
        d_gate = d_gate.at[expert].add(mm(x.T, da.astype(dtype)))
        d_up = d_up.at[expert].add(mm(x.T, db.astype(dtype)))
        d_down = d_down.at[expert].add(mm(hidden.T, dy.astype(dtype)))
        return dx, d_gate, d_up, d_down

    def body(carry, visit):
        expert, r0, hi = visit
        return jax.lax.cond(hi > r0, compute, lambda c, *_: c, carry, expert, r0, hi), None

    zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in dense)
    init = (jnp.zeros((m + tile, d), jnp.float32), *zeros)
    (dx, *dw), _ = jax.lax.scan(body, init, (schedule.group_ids, schedule.row0, schedule.hi))
    (d_weights,) = pullback(tuple(w.astype(dtype) for w in dw))
    return dx[:m].astype(rows.dtype), None, d_weights


_tiled_vjp.defvjp(_tiled_fwd, _tiled_bwd)


def per_row(rows, group_sizes, gate, up, down, *, dtype, layer=None) -> jax.Array:
    """The grouped SwiGLU one row at a time (a scan) -> ``[M, D]`` float32; rows past ``sum(group_sizes)`` are
    zero and cost no matmul."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    index = jnp.arange(rows.shape[0], dtype=jnp.int32)
    experts = jnp.minimum(jnp.searchsorted(ends, index, side="right"), group_sizes.shape[0] - 1).astype(jnp.int32)
    valid = index < ends[-1]

    def one(_, row):
        x, expert, ok = row
        y = jax.lax.cond(
            ok,
            lambda: swiglu_one(x, expert, gate, up, down, layer, dtype),
            lambda: jnp.zeros((rows.shape[1],), jnp.float32),
        )
        return None, y

    _, out = jax.lax.scan(one, None, (rows.astype(dtype), experts, valid))
    return out
