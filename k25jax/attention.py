"""Multi-head latent attention (MLA): the full form for prefill and training, the absorbed form for decode.

Math: ``shared/docs/k25-architecture.md`` section 2. Weights keep the layout the math wants:
``q_b_proj [Q, H, K]``, ``kv_b_proj`` split into ``k_up [C, H, Kn]`` and ``v_up [C, H, Kv]`` (the W_UK / W_UV
blocks the absorbed decode form uses), ``o_proj [H, Kv, D]``.

The full form expands every key and value per head (``[S, H, Kn + Kv]``); it is the cheaper one when queries
and keys are the same tokens (prefill: scores cost ``H (Kn + R)`` per query-key pair). The absorbed form never
expands: queries move into the latent space (``q~ = W_UK^T q_nope``, ``C`` wide), scores and the weighted sum
run over the cached latents ``[c | k_pe]`` directly, and ``W_UV`` is applied once to the result. It is what
decode wants: per new token it reads ``C + R`` values per cached token instead of ``H (Kn + Kv)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax import cache as kv_cache
from k25jax.config import TextConfig
from k25jax.layers import RMSNorm, param
from k25jax.rope import apply_rope_interleaved
from k25jax.sharding import constrain

HEADS = ("batch", "seq", "act_heads", None)  # logical axes of per-head activations [B, T, H, .]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Positions:
    """Where one forward pass's new tokens sit, shared by every layer.

    Attributes:
      positions: ``[B, T]`` int32 token positions (a row's positions are consecutive; with a cache they are also
        the slots its latents are written to).
      cos, sin: ``[B, T, R/2]`` rope tables of those positions.
      mask: ``[B, T, S]`` boolean, True where query t may attend key (or cache slot) s.
    """

    positions: jax.Array
    cos: jax.Array
    sin: jax.Array
    mask: jax.Array


NEG_INF = -1e30


class MLA(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        D, H = cfg.hidden_size, cfg.num_attention_heads
        C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = param(
                rngs, (D, H, cfg.qk_head_dim), ("embed", "heads", "head_dim"), param_dtype, what="MLA.q_proj"
            )
        else:
            Q = cfg.q_lora_rank
            self.q_a_proj = param(rngs, (D, Q), ("embed", "q_lora"), param_dtype, what="MLA.q_a_proj")
            self.q_a_norm = RMSNorm(Q, cfg.latent_norm_eps, param_dtype=param_dtype, rngs=rngs)
            self.q_b_proj = param(
                rngs, (Q, H, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), param_dtype, what="MLA.q_b_proj"
            )
        self.kv_a_proj = param(rngs, (D, C + R), ("embed", "kv_lora"), param_dtype, what="MLA.kv_a_proj")
        self.kv_a_norm = RMSNorm(C, cfg.latent_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.k_up = param(
            rngs, (C, H, cfg.qk_nope_head_dim), ("kv_lora", "heads", "head_dim"), param_dtype, what="MLA.k_up"
        )
        self.v_up = param(rngs, (C, H, cfg.v_head_dim), ("kv_lora", "heads", "head_dim"), param_dtype, what="MLA.v_up")
        self.o_proj = param(
            rngs, (H, cfg.v_head_dim, D), ("heads", "head_dim", "embed"), param_dtype, what="MLA.o_proj"
        )

    # -- projections shared by the full and absorbed forms ---------------------------------------------
    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, T, D]`` -> ``q_nope [B, T, H, Kn]`` and roped ``q_pe [B, T, H, R]``."""
        cfg, dt = self.cfg, self.dtype
        if cfg.q_lora_rank is None:
            q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(dt))
        else:
            c_q = self.q_a_norm(jnp.einsum("btd,dq->btq", x, self.q_a_proj[...].astype(dt)))
            q = jnp.einsum("btq,qhk->bthk", c_q, self.q_b_proj[...].astype(dt))
        q_nope, q_pe = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]
        q_pe = apply_rope_interleaved(q_pe, cos[:, :, None, :], sin[:, :, None, :])
        return constrain(q_nope, HEADS), constrain(q_pe, HEADS)

    def latents(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, T, D]`` -> normed ``c_kv [B, T, C]`` and roped ``k_pe [B, T, R]`` (what the latent cache holds)."""
        C = self.cfg.kv_lora_rank
        kv = jnp.einsum("btd,dc->btc", x, self.kv_a_proj[...].astype(self.dtype))
        c_kv = self.kv_a_norm(kv[..., :C])
        k_pe = apply_rope_interleaved(kv[..., C:], cos, sin)
        # Per-token latents are shared by all heads: whole on every tensor shard (batch rows split).
        return constrain(c_kv, ("batch", "seq", None)), constrain(k_pe, ("batch", "seq", None))

    def out(self, o: jax.Array) -> jax.Array:
        """``o [B, T, H, Kv]`` -> ``[B, T, D]`` (on a mesh: the sum over head shards happens here)."""
        out = jnp.einsum("bthk,hkd->btd", constrain(o, HEADS), self.o_proj[...].astype(self.dtype))
        return constrain(out, ("batch", "seq", "act_embed"))

    # -- the one call --------------------------------------------------------------------------------
    def __call__(
        self, x: jax.Array, pos: Positions, cache: jax.Array | None = None, *, layer=None, form: str = "full"
    ) -> tuple[jax.Array, jax.Array | None]:
        """MLA over the new tokens ``x [B, T, D]`` (normed hidden states) at ``pos``.

        Args:
          x: ``[B, T, D]``.
          pos: the tokens' positions, rope tables and mask (``pos.mask [B, T, S]``: over the new tokens themselves
            without a cache or with ``form="full"``, over the cache slots with ``form="absorbed"`` and a cache).
          cache: optional ``[L, B, S, C + R]`` latent cache of this layer's stack; the new tokens' latents are
            written into slots ``pos.positions`` of layer ``layer`` first.
          form: ``"full"`` (keys and values expanded per head; prefill and training: attends among the new tokens
            only, valid when the cache holds nothing before them) or ``"absorbed"`` (over the cached latents, or
            the new tokens' own latents without a cache; decode and continuation).
        Returns: ``([B, T, D]`` in the compute dtype, the cache with the new latents, or None without one).
        """
        x = x.astype(self.dtype)
        q_nope, q_pe = self.queries(x, pos.cos, pos.sin)
        c_kv, k_pe = self.latents(x, pos.cos, pos.sin)
        latents = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)  # what the cache keeps per token
        if cache is not None:
            cache = kv_cache.write(cache, layer, pos.positions[:, 0], latents)
        if form == "full":
            return self.full(q_nope, q_pe, c_kv, k_pe, pos.mask), cache
        if form == "absorbed":
            return self.absorbed(q_nope, q_pe, latents if cache is None else cache[layer], pos.mask), cache
        raise ValueError(f"MLA form {form!r} is not 'full' or 'absorbed'")

    # -- full form -------------------------------------------------------------------------------------
    def full(self, q_nope, q_pe, c_kv, k_pe, mask: jax.Array) -> jax.Array:
        """Full-form MLA: keys and values expanded per head from the latents ``c_kv [B, S, C]``, ``k_pe [B, S, R]``.

        ``q_nope [B, T, H, Kn]``, ``q_pe [B, T, H, R]`` from :meth:`queries`; ``mask [B, T, S]`` boolean, True where
        query t may attend key s. Returns ``[B, T, D]`` in the compute dtype.
        """
        dt = self.dtype
        k_nope = jnp.einsum("bsc,chk->bshk", c_kv, self.k_up[...].astype(dt))
        v = jnp.einsum("bsc,chk->bshk", c_kv, self.v_up[...].astype(dt))
        scores = jnp.einsum("bthk,bshk->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthr,bsr->bhts", q_pe, k_pe, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, :, :], scores * self.cfg.attention_scale, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        o = jnp.einsum("bhts,bshk->bthk", probs, v)
        return self.out(o)

    # -- absorbed form ---------------------------------------------------------------------------------
    def absorbed(self, q_nope: jax.Array, q_pe: jax.Array, cached: jax.Array, mask: jax.Array) -> jax.Array:
        """Absorbed-form MLA over cached latents (architecture doc section 2, "Absorbed MLA").

        Args:
          q_nope: ``[B, T, H, Kn]`` and q_pe: ``[B, T, H, R]`` (roped) from :meth:`queries`.
          cached: ``[B, S, C + R]`` latent cache of this layer, ``[normed c_kv | roped k_pe]`` per slot.
          mask: ``[B, T, S]`` boolean, True where query t may attend cache slot s.
        Returns: ``[B, T, D]`` in the compute dtype.
        """
        dt, C = self.dtype, self.cfg.kv_lora_rank
        cached = cached.astype(dt)
        c, k_pe = cached[..., :C], cached[..., C:]
        # q~ = W_UK^T q_nope: the query in the C-wide latent space, so no key is ever expanded.
        q_latent = jnp.einsum("bthk,chk->bthc", q_nope, self.k_up[...].astype(dt))
        scores = jnp.einsum("bthc,bsc->bhts", q_latent, c, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthr,bsr->bhts", q_pe, k_pe, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, :, :], scores * self.cfg.attention_scale, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        u = jnp.einsum("bhts,bsc->bthc", probs, c)  # the attended latent per head
        o = jnp.einsum("bthc,chk->bthk", u, self.v_up[...].astype(dt))  # o_h = W_UV u
        return self.out(o)


def causal_mask(q_positions: jax.Array, k_positions: jax.Array, k_valid: jax.Array | None = None) -> jax.Array:
    """``[B, T, S]`` mask: key s visible to query t when ``k_pos <= q_pos`` (and the key is valid)."""
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask
