"""The decoder stack: embeddings, dense layer(s), scanned MoE layers, final norm, untied ``lm_head``.

Layers of one kind are identical in shape, so their parameters are stacked with a leading ``"layers"`` axis
and run with ``jax.lax.scan``: compile time does not grow with depth (61 layers at full size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax import cache as kv_cache
from k25jax.attention import MLA, Positions, causal_mask
from k25jax.cache import LatentCache
from k25jax.config import RunConfig, TextConfig
from k25jax.layers import MLP, RMSNorm, param
from k25jax.moe import MoE
from k25jax.quant import kept_whole
from k25jax.rope import rope_angles, text_inv_freq, text_rope_scale
from k25jax.sharding import constrain

RESIDUAL = ("batch", "seq", "act_embed")  # logical axes of the residual stream [B, T, D]


class DecoderLayer(nnx.Module):
    """``h += attn(norm(h)); h += mlp(norm(h))`` with a dense SwiGLU or an MoE as the MLP."""

    def __init__(self, cfg: TextConfig, moe: bool, run: RunConfig, *, rngs: nnx.Rngs):
        dt, pdt = run.compute, run.params
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = MLA(cfg, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        if moe:
            self.mlp = MoE(cfg, run, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(
        self, h: jax.Array, pos: Positions, cache: jax.Array | None = None, *, layer=None, form: str = "full"
    ) -> tuple[jax.Array, jax.Array | None]:
        """``h [B, T, D]`` -> ``(h, cache)``. With ``cache`` (this stack's ``[L, B, S, C + R]`` latents) the layer
        writes its new tokens' latents into layer ``layer`` of it; ``form`` is the MLA form
        (:meth:`k25jax.attention.MLA.__call__`). ``layer`` also tells an MoE whose experts are kept layer-stacked
        which layer it is."""
        h, x, cache = self._attend(h, pos, cache, layer, form)
        mlp_out = self.mlp(x, layer) if isinstance(self.mlp, MoE) else self.mlp(x)
        return constrain(h + mlp_out.astype(h.dtype), RESIDUAL), cache

    def with_load(self, h: jax.Array, pos: Positions, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """An MoE layer without a cache: ``(self(h, pos)[0], load [E])``, the tokens with ``valid [B, T]`` routed
        to each expert (:meth:`k25jax.moe.MoE.with_load`; the training loss's router statistics)."""
        h, x, _ = self._attend(h, pos, None, None, "full")
        mlp_out, load = self.mlp.with_load(x, valid)
        return constrain(h + mlp_out.astype(h.dtype), RESIDUAL), load

    def _attend(self, h, pos, cache, layer, form):
        """``h += attn(norm(h))``; returns ``(h, post_attn_norm(h), cache)``."""
        attn_out, cache = self.attn(self.input_norm(h), pos, cache, layer=layer, form=form)
        h = h + attn_out.astype(h.dtype)
        return h, self.post_attn_norm(h), cache


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """``count`` copies of ``make``'s module with parameters stacked on a leading ``"layers"`` axis."""
    keys = jax.random.split(rngs.params(), count)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(key):
        return make(nnx.Rngs(params=key))

    return build(keys)


REMAT = {
    "none": None,
    "full": None,  # jax.checkpoint's default: save nothing inside a layer, recompute it on the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Routed-expert weights stay whole ([L, E, ...]) in a cached scan instead of being sliced per layer: a slice is a
# copy of every expert of the layer, while a decode step reads only the few experts its tokens chose (the expert
# op indexes [layer, expert] itself, told the layer by DecoderLayer's ``layer`` argument).
EXPERTS_WHOLE = nnx.PathContains("experts")


def scan_layers(stack: nnx.Module, carry, step: Callable, *, remat: str = "none", keep_whole=None, outputs=False):
    """Run the stacked layers of ``stack`` with ``jax.lax.scan``: ``step(layer, carry, index) -> carry`` for each
    layer ``index`` in order; returns the final carry. With ``outputs``, ``step`` returns ``(carry, y)`` and this
    ``(carry, ys)``, the ``y`` s stacked on a leading layer axis.

    ``keep_whole``: an nnx filter of parameters passed whole (``[L, ...]``) to every step instead of sliced per
    layer (the cached decoder passes :data:`EXPERTS_WHOLE`); a module holding such parameters reads layer
    ``index`` of them itself. Variables :func:`~k25jax.quant.kept_whole` selects (a layer-subset fake-quant
    weight's halves) are always passed whole. ``remat``: a :data:`REMAT` policy name, applied to each layer. A
    latent cache rides in the carry and each layer writes only its new slots in place (the cache is never rebuilt
    as a scan output, which would copy all of it every step).
    """
    keep = kept_whole if keep_whole is None else nnx.Any(keep_whole, kept_whole)
    graphdef, kept, sliced = nnx.split(stack, keep, ...)
    whole = (kept,)
    count = int(jax.tree.leaves(sliced)[0].shape[0])

    def body(carry, xs):
        layer_state, index = xs
        out = step(nnx.merge(graphdef, *whole, layer_state), carry, index)
        return out if outputs else (out, None)

    if remat not in REMAT:
        raise ValueError(f"remat policy {remat!r} is not one of {sorted(REMAT)}")
    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT[remat])
    carry, ys = jax.lax.scan(body, carry, (sliced, jnp.arange(count, dtype=jnp.int32)))
    return (carry, ys) if outputs else carry


class TextModel(nnx.Module):
    """The K2.5 text stack. ``model(input_ids)`` returns float32 logits ``[B, T, V]``."""

    def __init__(self, cfg: TextConfig, run: RunConfig | None = None, *, rngs: nnx.Rngs):
        run = run or RunConfig()
        self.cfg = cfg
        self.run = run
        pdt = run.params
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt, what="embed_tokens")

        def layer(moe: bool):
            return lambda r: DecoderLayer(cfg, moe, run, rngs=r)

        self.dense_layers = stacked(layer(False), cfg.num_dense_layers, rngs) if cfg.num_dense_layers else None
        self.moe_layers = stacked(layer(True), cfg.num_moe_layers, rngs) if cfg.num_moe_layers else None
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt, what="lm_head")

    @property
    def dtype(self):
        """The compute dtype (``run.compute_dtype``)."""
        return self.run.compute

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``[B, T]`` int ids -> ``[B, T, D]`` in the compute dtype."""
        # On a mesh the table is split over the vocabulary: each shard looks up the ids it holds, one all-reduce.
        return constrain(jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype), RESIDUAL)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rope_angles(positions, text_inv_freq(self.cfg), text_rope_scale(self.cfg))

    def stacks(self) -> dict[str, nnx.Module]:
        """The layer stacks in execution order, keyed like :class:`k25jax.cache.LatentCache` stacks."""
        named = {"dense_layers": self.dense_layers, "moe_layers": self.moe_layers}
        return {k: v for k, v in named.items() if v is not None}

    def forward(
        self,
        h: jax.Array,
        positions: jax.Array,
        cache: LatentCache | None = None,
        *,
        form: str = "full",
        key_valid: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, LatentCache | None]:
        """The decoder layers and the final norm over embeddings ``h [B, T, D]`` at ``positions [B, T]``.

        Without ``cache``: attention among these tokens (causal, and only over keys with ``key_valid [B, T]``
        when given, and only within a query's own segment with ``segment_ids [B, T]``: packed training rows,
        whose positions restart per segment). With ``cache``: the tokens' latents are written into slots
        ``positions`` first, then ``form="full"`` attends among the new tokens only (prefill: valid when the cache
        holds nothing before them; right padding needs no mask, a real query never sees a later padded key) and
        ``form="absorbed"`` over every cache slot up to each query's position (decode, continuation). Returns the
        final-normed hidden ``[B, T, D]`` and the cache with its new latents (``lengths`` untouched: callers set
        them), or None. With ``run.attention_block`` set, every form runs blockwise (masks built per block, none
        dense: :func:`k25jax.attention.blockwise_attention`).
        """
        pos = self._attention_positions(positions, cache, form, key_valid, segment_ids)
        if cache is None:
            for stack in self.stacks().values():
                h = scan_layers(stack, h, lambda layer, h, i: layer(h, pos, form=form)[0], remat=self.run.remat)
            return self.norm(h), None
        stacks = dict(cache.stacks)
        for name, stack in self.stacks().items():

            def step(layer: DecoderLayer, carry, index):
                return layer(carry[0], pos, carry[1], layer=index, form=form)

            h, stacks[name] = scan_layers(stack, (h, stacks[name]), step, keep_whole=EXPERTS_WHOLE)
        return self.norm(h), dataclasses.replace(cache, stacks=stacks)

    def forward_with_load(
        self,
        h: jax.Array,
        positions: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        valid: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """``forward(h, positions, segment_ids=segment_ids)`` (no cache) that also counts the router's choices:
        returns ``(h, load)``, ``load [L, E]`` int32 the tokens with ``valid [B, T]`` (default all) routed to each
        expert of each MoE layer (None without MoE layers). The training loss's router statistics; inference calls
        :meth:`forward`, which counts nothing."""
        pos = self._attention_positions(positions, None, "full", None, segment_ids)
        valid = jnp.ones(h.shape[:2], jnp.bool_) if valid is None else valid
        load = None
        for stack in self.stacks().values():
            if isinstance(stack.mlp, MoE):
                step = lambda layer, h, i: layer.with_load(h, pos, valid)  # noqa: E731
                h, load = scan_layers(stack, h, step, remat=self.run.remat, outputs=True)
            else:
                h = scan_layers(stack, h, lambda layer, h, i: layer(h, pos)[0], remat=self.run.remat)
        return self.norm(h), load

    def _attention_positions(self, positions, cache, form, key_valid, segment_ids) -> Positions:
        """The rope angles and masks of :meth:`forward` (see there)."""
        cos, sin = self.rope(positions)
        over_cache = cache is not None and form == "absorbed"
        if self.run.attention_block is not None:
            # Blockwise attention builds each block's mask from these (over a cache: the slot mask); no dense mask.
            pos = Positions(
                positions,
                cos,
                sin,
                key_valid=key_valid if cache is None else None,
                segment_ids=None if over_cache else segment_ids,
                block=self.run.attention_block,
            )
        else:
            if over_cache:
                mask = kv_cache.slot_mask(positions, cache.max_len)
            else:
                mask = causal_mask(positions, positions, key_valid if cache is None else None)
                if segment_ids is not None:
                    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
            pos = Positions(positions, cos, sin, mask)
        return pos

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
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits for a batch of token ids.

        Args:
          input_ids: ``[B, T]`` int token ids.
          positions: ``[B, T]`` positions (default ``0..T-1``).
          inputs_embeds: optional ``[B, T, D]`` embeddings replacing the lookup (multimodal merge).
          attention_mask: optional ``[B, T]`` with 1 for real tokens, 0 for padding keys.
          segment_ids: optional ``[B, T]`` packed-sample ids: attention stays within a segment.
        Returns: float32 logits ``[B, T, V]``.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        valid = None if attention_mask is None else attention_mask.astype(bool)
        return self.logits(self.forward(h, positions, key_valid=valid, segment_ids=segment_ids)[0])
