"""The visit schedule of a grouped matmul: which (row tile, group) pairs a kernel computes, in which order.

Rows are sorted by group (``group_sizes [G]``, some zero). A row tile of ``tm`` rows may hold rows of several
groups, and a group may span several tiles; each (tile, group) pair that shares at least one row is one
*visit*: the kernel multiplies the whole tile by that group's weights and keeps only the rows in
``[lo, hi)``. Visits are ordered by group then tile, which makes tile ids non-decreasing, so on TPU an
output tile stays in VMEM across its consecutive visits. Empty groups get no visit (their weights are never
read). The number of visits is at most ``tiles + min(G, M) - 1`` (each non-empty group adds at most one tile
boundary crossing), the static length of the arrays; entries past ``num_visits`` repeat the last real visit
(so a TPU grid step there fetches nothing new) with an empty row range.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Schedule(NamedTuple):
    group_ids: jax.Array  # int32 [V]: group (expert) of each visit
    tile_ids: jax.Array  # int32 [V]: row tile of each visit
    lo: jax.Array  # int32 [V]: first row (absolute) the visit owns
    hi: jax.Array  # int32 [V]: one past its last row (lo == hi: nothing, a padding visit)
    num_visits: jax.Array  # int32 scalar
    total_rows: jax.Array  # int32 scalar: rows covered by groups (later rows are outside every group)


def max_visits(m: int, tm: int, groups: int) -> int:
    return -(-m // tm) + min(groups, m) - 1


def visit_schedule(group_sizes: jax.Array, m: int, tm: int) -> Schedule:
    """The schedule for ``m`` rows in tiles of ``tm`` (static) and ``group_sizes [G]`` (traced, int32)."""
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(gs), m)  # rows past m (sizes summing to more than m) are ignored
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    nonempty = ends > starts
    first = starts // tm
    last = jnp.maximum(ends - 1, 0) // tm
    counts = jnp.where(nonempty, last - first + 1, 0)
    visit_end = jnp.cumsum(counts)
    num = visit_end[-1]
    v = max_visits(m, tm, gs.shape[0])
    i = jnp.arange(v, dtype=jnp.int32)
    real = i < num
    i_clamped = jnp.minimum(i, jnp.maximum(num - 1, 0))
    g = jnp.searchsorted(visit_end, i_clamped, side="right").astype(jnp.int32)
    g = jnp.minimum(g, gs.shape[0] - 1)
    tile = first[g] + i_clamped - (visit_end[g] - counts[g])
    lo = jnp.where(real, jnp.maximum(starts[g], tile * tm), 0)
    hi = jnp.where(real, jnp.minimum(ends[g], tile * tm + tm), 0)
    return Schedule(g, tile.astype(jnp.int32), lo.astype(jnp.int32), hi.astype(jnp.int32), num, ends[-1])


def zero_uncovered_rows(out: jax.Array, total_rows: jax.Array) -> jax.Array:
    """Rows outside every group are zero (as in ``jax.lax.ragged_dot``); kernels never write them."""
    rows = jnp.arange(out.shape[0], dtype=jnp.int32)[:, None]
    return jnp.where(rows < total_rows, out, jnp.zeros((), out.dtype))


class GroupTiles(NamedTuple):
    group_ids: jax.Array  # int32 [V]: group of each tile
    row0: jax.Array  # int32 [V]: the tile's first row (tiles start at their group's first row)
    hi: jax.Array  # int32 [V]: one past the group's last row (row0 >= hi: a padding tile)


def group_tiles(group_sizes: jax.Array, m: int, tm: int) -> GroupTiles:
    """Tiles of ``tm`` rows aligned to each group's start, for a loop that computes one tile at a time (the CPU
    strategy): every tile lies within one group (its last rows may spill into the next group and are masked), so no
    row is computed twice; ``ceil(size / tm)`` tiles per group, at most ``m / tm + G`` in all (the static length).
    A kernel that keeps output tiles in fast memory wants :func:`visit_schedule` instead (fixed tile boundaries)."""
    gs = group_sizes.astype(jnp.int32)
    g_count = gs.shape[0]
    ends = jnp.minimum(jnp.cumsum(gs), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    tiles = (jnp.maximum(ends - starts, 0) + tm - 1) // tm
    tile_end = jnp.cumsum(tiles)
    t = jnp.arange(-(-m // tm) + g_count, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), g_count - 1).astype(jnp.int32)
    row0 = starts[g] + (t - (tile_end - tiles)[g]) * tm
    hi = jnp.where(t < tile_end[-1], ends[g], 0)
    return GroupTiles(g, row0.astype(jnp.int32), hi.astype(jnp.int32))
