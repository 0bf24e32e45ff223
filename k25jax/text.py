"""The decoder stack: embeddings, dense layer(s), scanned MoE layers, final norm, untied ``lm_head``.

Layers of one kind are identical in shape, so their parameters are stacked with a leading ``"layers"`` axis
and run with ``jax.lax.scan``: compile time does not grow with depth (61 layers at full size).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax import cache as kv_cache
from k25jax.attention import MLA, causal_mask
from k25jax.cache import LatentCache
from k25jax.config import TextConfig
from k25jax.layers import MLP, RMSNorm, param
from k25jax.moe import Experts, MoE
from k25jax.rope import rope_angles, text_inv_freq, text_rope_scale
from k25jax.sharding import constrain

RESIDUAL = ("batch", "seq", "act_embed")  # logical axes of the residual stream [B, T, D]


class DecoderLayer(nnx.Module):
    """``h += attn(norm(h)); h += mlp(norm(h))`` with a dense SwiGLU or an MoE as the MLP."""

    def __init__(self, cfg: TextConfig, moe: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = MLA(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        if moe:
            self.mlp = MoE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.attn(self.input_norm(h), cos, sin, mask).astype(h.dtype)
        return constrain(h + self.mlp(self.post_attn_norm(h)).astype(h.dtype), RESIDUAL)

    def prefill(self, h, cos, sin, mask, stack_cache, index, starts) -> tuple[jax.Array, jax.Array]:
        """Full-form layer that also writes its tokens' latents into slots ``starts[b] + t`` of layer ``index``.

        ``stack_cache [L, B, S, C + R]`` is the cache of this layer's stack; returns ``(h, stack_cache)``.
        """
        attn_out, latents = self.attn.full(self.input_norm(h), cos, sin, mask)
        stack_cache = kv_cache.write(stack_cache, index, starts, latents)
        h = h + attn_out.astype(h.dtype)
        return constrain(h + self.mlp(self.post_attn_norm(h)).astype(h.dtype), RESIDUAL), stack_cache

    def extend(self, h, cos, sin, mask, stack_cache, index, starts) -> tuple[jax.Array, jax.Array]:
        """Absorbed-form layer over the cache: write the new tokens' latents, then attend over all slots.

        ``h [B, T, D]`` are new tokens at positions ``starts[b] + t``; ``mask [B, T, S]`` over cache slots.
        """
        x = self.input_norm(h).astype(self.attn.dtype)
        q_nope, q_pe = self.attn.queries(x, cos, sin)
        c_kv, k_pe = self.attn.latents(x, cos, sin)
        stack_cache = kv_cache.write(stack_cache, index, starts, jnp.concatenate([c_kv, k_pe], axis=-1))
        attn_out = self.attn.absorbed(q_nope, q_pe, stack_cache[index], mask)
        h = h + attn_out.astype(h.dtype)
        return constrain(h + self.mlp(self.post_attn_norm(h)).astype(h.dtype), RESIDUAL), stack_cache


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """``count`` copies of ``make``'s module with parameters stacked on a leading ``"layers"`` axis."""
    keys = jax.random.split(rngs.params(), count)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(key):
        return make(nnx.Rngs(params=key))

    return build(keys)


def scan_layers(
    stack: nnx.Module, h: jax.Array, step: Callable, *, remat: bool = False, cache: jax.Array | None = None
):
    """Run the stacked layers of ``stack`` over ``h`` with ``jax.lax.scan``.

    Without ``cache``: ``step(layer, h) -> h``; returns ``h``. With ``cache`` (this stack's latent cache
    ``[L, B, S, C + R]``): ``step(layer, h, cache, index) -> (h, cache)``; returns ``(h, cache)``. The whole cache
    rides in the scan carry and each layer writes only its new slots in place (the cache is never rebuilt as a
    scan output, which would copy all of it every step).
    """
    graphdef, state = nnx.split(stack)

    if cache is None:

        def body(carry, layer_state):
            return step(nnx.merge(graphdef, layer_state), carry), None

        if remat:
            body = jax.checkpoint(body)
        h, _ = jax.lax.scan(body, h, state)
        return h

    # Routed-expert weights stay whole ([L, E, ...]) instead of being sliced per layer by the scan: a slice is a
    # copy of every expert of the layer, while a decode step reads only the few experts its tokens chose
    # (moe.Experts indexes [layer, expert] itself).
    graphdef, whole, sliced = nnx.split(stack, nnx.PathContains("experts"), ...)
    count = int(jax.tree.leaves(sliced)[0].shape[0])

    def cached_body(carry, xs):
        layer_state, index = xs
        layer = nnx.merge(graphdef, whole, layer_state)
        for _, module in nnx.iter_modules(layer):
            if isinstance(module, Experts):
                module.layer_index = index
        return step(layer, *carry, index), None

    (h, cache), _ = jax.lax.scan(cached_body, (h, cache), (sliced, jnp.arange(count)))
    return h, cache


class TextModel(nnx.Module):
    """The K2.5 text stack. ``model(input_ids)`` returns float32 logits ``[B, T, V]``."""

    def __init__(self, cfg: TextConfig, *, dtype=jnp.bfloat16, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.cfg = cfg
        self.dtype = dtype
        self.remat = False
        self.embed_tokens = param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype, what="embed_tokens"
        )

        def layer(moe: bool):
            return lambda r: DecoderLayer(cfg, moe, dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.dense_layers = stacked(layer(False), cfg.num_dense_layers, rngs) if cfg.num_dense_layers else None
        self.moe_layers = stacked(layer(True), cfg.num_moe_layers, rngs) if cfg.num_moe_layers else None
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype, what="lm_head")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``[B, T]`` int ids -> ``[B, T, D]`` in the compute dtype."""
        # On a mesh the table is split over the vocabulary: each shard looks up the ids it holds, one all-reduce.
        return constrain(jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype), RESIDUAL)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rope_angles(positions, text_inv_freq(self.cfg), text_rope_scale(self.cfg))

    def hidden(self, h: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """Run the decoder layers and the final norm over embeddings ``h [B, T, D]``."""
        cos, sin = self.rope(positions)

        def step(layer: DecoderLayer, carry: jax.Array) -> jax.Array:
            return layer(carry, cos, sin, mask)

        for stack in (self.dense_layers, self.moe_layers):
            if stack is not None:
                h = scan_layers(stack, h, step, remat=self.remat)
        return self.norm(h)

    def stacks(self) -> dict[str, nnx.Module]:
        """The layer stacks in execution order, keyed like :class:`k25jax.cache.LatentCache` stacks."""
        named = {"dense_layers": self.dense_layers, "moe_layers": self.moe_layers}
        return {k: v for k, v in named.items() if v is not None}

    def hidden_cached(
        self, h: jax.Array, starts: jax.Array, new_lengths: jax.Array, cache: LatentCache, absorbed: bool
    ) -> tuple[jax.Array, LatentCache]:
        """Run the decoder over new tokens ``h [B, T, D]`` at positions ``starts[b] + t``, filling ``cache``.

        ``absorbed=False`` (prefill): full-form attention among the new tokens only, valid when the cache holds
        nothing before them (``starts`` all zero). ``absorbed=True`` (decode, continuation): absorbed attention
        over every cache slot up to each query's position. Returns the final-normed hidden ``[B, T, D]`` and the
        cache with ``lengths = new_lengths``.
        """
        T = h.shape[1]
        positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        cos, sin = self.rope(positions)
        if absorbed:
            mask = kv_cache.slot_mask(positions, cache.max_len)
        else:
            # Right padding: a real query never sees a padded key under the causal mask alone.
            mask = causal_mask(positions, positions)
        stacks = dict(cache.stacks)
        for name, stack in self.stacks().items():

            def step(layer: DecoderLayer, carry, stack_cache, index):
                run = layer.extend if absorbed else layer.prefill
                return run(carry, cos, sin, mask, stack_cache, index, starts)

            h, stacks[name] = scan_layers(stack, h, step, cache=stacks[name])
        return self.norm(h), LatentCache(stacks=stacks, lengths=new_lengths.astype(jnp.int32))

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden ``[..., D]`` -> float32 logits ``[..., V]`` (on a mesh: split over the vocabulary)."""
        logits = jnp.einsum(
            "...d,dv->...v", h, self.lm_head[...].astype(self.dtype), preferred_element_type=jnp.float32
        )
        axes = {2: ("batch", "act_vocab"), 3: ("batch", "seq", "act_vocab")}.get(logits.ndim, (None,) * logits.ndim)
        return constrain(logits, axes)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits for a batch of token ids.

        Args:
          input_ids: ``[B, T]`` int token ids.
          positions: ``[B, T]`` positions (default ``0..T-1``).
          inputs_embeds: optional ``[B, T, D]`` embeddings replacing the lookup (multimodal merge).
          attention_mask: optional ``[B, T]`` with 1 for real tokens, 0 for padding keys.
        Returns: float32 logits ``[B, T, V]``.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        valid = None if attention_mask is None else attention_mask.astype(bool)
        mask = causal_mask(positions, positions, valid)
        return self.logits(self.hidden(h, positions, mask))
