"""The absorbed-MLA latent KV cache.

Per token and layer the cache keeps ``[normed c_kv | roped k_pe]``: ``kv_lora_rank + qk_rope_head_dim`` values
(576 for K2.5, against ``H (Kn + Kv)`` = 20480 for expanded keys and values; architecture doc section 2). It is
stacked per layer stack exactly like the parameters (``dense_layers`` ``[Ld, B, S, C + R]``, ``moe_layers``
``[Lm, B, S, C + R]``) so ``jax.lax.scan`` walks layers and cache together.

Slots are positions: the token at position ``p`` of sequence ``b`` lives in slot ``p`` of row ``b``. Sequences of
different lengths share one batch (right-padded); ``lengths [B]`` counts the valid slots of each row. A slot at
or beyond ``lengths[b]`` may hold stale values (padding written by a batched prefill, or an abandoned
continuation): attention masks every slot above the query position, so stale slots are never read before
they are overwritten.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from k25jax.config import TextConfig
from k25jax.sharding import CACHE_AXES, cache_spec

STACKS = ("dense_layers", "moe_layers")


def stack_sizes(cfg: TextConfig) -> dict[str, int]:
    """Layers per stack, matching ``TextModel``'s stacks (a stack of zero layers is absent)."""
    sizes = {"dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers}
    return {k: v for k, v in sizes.items() if v}


def values_per_token(cfg: TextConfig) -> int:
    """Cached values per token over all layers: ``num_hidden_layers * (kv_lora_rank + qk_rope_head_dim)``."""
    return cfg.num_hidden_layers * cfg.latent_cache_dim


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
    """Latent KV cache of a batch of sequences.

    Attributes:
      stacks: stack name (``"dense_layers"`` / ``"moe_layers"``) -> ``[L, B, S, C + R]`` latents; logical axes
        :data:`k25jax.sharding.CACHE_AXES`.
      lengths: ``[B]`` int32, valid slots per sequence (the position of its next token).
    """

    stacks: dict[str, jax.Array]
    lengths: jax.Array

    axes = CACHE_AXES  # logical axes of every array in ``stacks`` (a class constant, not a pytree leaf)

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.bfloat16, mesh=None) -> LatentCache:
        """An empty cache of ``max_len`` slots per sequence; with a ``mesh``, created in place already sharded
        (:meth:`shardings`), so no device ever holds the whole cache."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"LatentCache: batch ({batch}) and max_len ({max_len}) must be positive")

        def build():
            width = cfg.latent_cache_dim
            stacks = {name: jnp.zeros((n, batch, max_len, width), dtype) for name, n in stack_sizes(cfg).items()}
            return cls(stacks=stacks, lengths=jnp.zeros((batch,), jnp.int32))

        if mesh is None:
            return build()
        return jax.jit(build, out_shardings=cls.shardings(jax.eval_shape(build), mesh))()

    @staticmethod
    def shardings(cache: LatentCache, mesh) -> LatentCache:
        """``NamedSharding``s for a (possibly abstract) cache on ``mesh``: batch rows split like activations
        (``k25jax.sharding.cache_spec``), the latents whole (they are per token, shared by all heads)."""
        from jax.sharding import NamedSharding

        stacks = {k: NamedSharding(mesh, cache_spec(tuple(v.shape), mesh)) for k, v in cache.stacks.items()}
        rows = next(iter(stacks.values())).spec[1]
        return LatentCache(stacks=stacks, lengths=NamedSharding(mesh, jax.sharding.PartitionSpec(rows)))

    @classmethod
    def abstract(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> LatentCache:
        """The cache as ``jax.ShapeDtypeStruct`` leaves (no memory): for sizing full-scale caches."""
        return jax.eval_shape(lambda: cls.zeros(cfg, batch, max_len, dtype))

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_len(self) -> int:
        return int(next(iter(self.stacks.values())).shape[2])

    @property
    def dtype(self):
        return next(iter(self.stacks.values())).dtype

    def values_per_token(self) -> int:
        """Values one cached token occupies over all layers (``L * (C + R)``)."""
        return sum(int(a.shape[0]) * int(a.shape[3]) for a in self.stacks.values())

    def bytes_per_token(self) -> int:
        return self.values_per_token() * jnp.dtype(self.dtype).itemsize

    def nbytes(self) -> int:
        """Bytes of the latent arrays (lengths excluded)."""
        return self.bytes_per_token() * self.batch * self.max_len


def write(stack_cache: jax.Array, layer: jax.Array | int, starts: jax.Array, values: jax.Array) -> jax.Array:
    """Write ``values [B, T, C + R]`` into slots ``starts[b] .. starts[b] + T - 1`` of layer ``layer``.

    ``stack_cache`` is ``[L, B, S, C + R]``. Writes past slot ``S - 1`` are dropped (never clamped onto valid
    slots); callers keep real tokens inside the cache.
    """
    B, T = values.shape[:2]
    # One scatter at (layer, row, slot) indices, no batching dims: a vmapped per-row write lowers to a scatter with
    # batching dims, which XLA:CPU runs on a row-major transposed copy of the whole stack and copies back (two
    # copies of every layer's cache per layer per decode step). The row index is an iota, which the SPMD
    # partitioner reads as a parallel dim, so on a mesh each shard still writes its own rows.
    rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
    slots = starts.astype(jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    return stack_cache.at[layer, rows, slots].set(values.astype(stack_cache.dtype), mode="drop")


def slot_mask(positions: jax.Array, max_len: int) -> jax.Array:
    """``[B, T, S]`` mask for queries at ``positions [B, T]`` over cache slots: slot s visible when ``s <= pos``.

    Slots are positions, so this is the causal mask; stale slots lie above every query position (module doc).
    """
    return jnp.arange(max_len, dtype=positions.dtype)[None, None, :] <= positions[:, :, None]
