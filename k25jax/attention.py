"""Multi-head latent attention (MLA): the full form for prefill and training, the absorbed form for decode.

Math: ``shared/docs/k25-architecture.md`` section 2. Weights keep the layout the math wants:
``q_b_proj [Q, H, K]``, ``kv_b_proj`` split into ``k_up [C, H, Kn]`` and ``v_up [C, H, Kv]`` (the W_UK / W_UV
blocks the absorbed decode form uses), ``o_proj [H, Kv, D]``.

The full form expands every key and value per head (``[S, H, Kn + Kv]``); it is the cheaper one when queries
and keys are the same tokens (prefill: scores cost ``H (Kn + R)`` per query-key pair). The absorbed form never
expands: queries move into the latent space (``q~ = W_UK^T q_nope``, ``C`` wide), scores and the weighted sum
run over the cached latents ``[c | k_pe]`` directly, and ``W_UV`` is applied once to the result. It is what
decode wants: per new token it reads ``C + R`` values per cached token instead of ``H (Kn + Kv)``.

Both forms come plain (the whole ``[B, H, T, S]`` score tensor and a dense ``[B, T, S]`` mask: the reference) and
blockwise (:func:`blockwise_attention`: an online softmax over key blocks inside a loop over query blocks, each
block's mask computed from positions, key validity and segment ids, and a ``custom_vjp`` whose backward recomputes
one block's scores at a time, so score memory is one ``[B, H, block, block]`` block forward and backward). At K2.5
size the plain form holds ``64 T^2`` float32 scores per sequence and layer (275 GB at T = 32K; about 825 GB with the
probabilities and their gradient); ``Positions.block`` (``RunConfig.attention_block``) picks the blockwise form.
"""

from __future__ import annotations

import dataclasses
import functools

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

    The plain forms read the dense ``mask``; with ``block`` set the forms run blockwise and build each block's mask
    from ``positions`` (causal), ``key_valid`` and ``segment_ids`` instead, so ``mask`` may be None.

    Attributes:
      positions: ``[B, T]`` int32 token positions (a row's positions are consecutive; with a cache they are also
        the slots its latents are written to).
      cos, sin: ``[B, T, R/2]`` rope tables of those positions.
      mask: ``[B, T, S]`` boolean, True where query t may attend key (or cache slot) s; None when ``block`` is set.
      key_valid: optional ``[B, T]`` boolean, False for padding keys (blockwise forms over the new tokens).
      segment_ids: optional ``[B, T]`` int packed-sample ids: a query sees keys of its own segment only (blockwise
        forms over the new tokens).
      block: None (plain forms, dense ``mask``) or the query/key block length of the blockwise forms (static).
        Over a cache (absorbed form) the blockwise mask is the slot mask (slot s visible when ``s <= position``).
    """

    positions: jax.Array
    cos: jax.Array
    sin: jax.Array
    mask: jax.Array | None = None
    key_valid: jax.Array | None = None
    segment_ids: jax.Array | None = None
    block: int | None = dataclasses.field(default=None, metadata=dict(static=True))


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
            without a cache or with ``form="full"``, over the cache slots with ``form="absorbed"`` and a cache);
            with ``pos.block`` set, the blockwise version of the form, masks built per block (:class:`Positions`).
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
            if pos.block is not None:
                return self.full_blockwise(q_nope, q_pe, c_kv, k_pe, pos), cache
            return self.full(q_nope, q_pe, c_kv, k_pe, pos.mask), cache
        if form == "absorbed":
            cached = latents if cache is None else cache[layer]
            if pos.block is not None:
                return self.absorbed_blockwise(q_nope, q_pe, cached, pos, over_cache=cache is not None), cache
            return self.absorbed(q_nope, q_pe, cached, pos.mask), cache
        raise ValueError(f"MLA form {form!r} is not 'full' or 'absorbed'")

    # -- full form -------------------------------------------------------------------------------------
    def expand(self, c_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Latents ``c_kv [B, S, C]`` -> per-head keys ``k_nope [B, S, H, Kn]`` and values ``v [B, S, H, Kv]``."""
        dt = self.dtype
        k_nope = jnp.einsum("bsc,chk->bshk", c_kv, self.k_up[...].astype(dt))
        v = jnp.einsum("bsc,chk->bshk", c_kv, self.v_up[...].astype(dt))
        return k_nope, v

    def full(self, q_nope, q_pe, c_kv, k_pe, mask: jax.Array) -> jax.Array:
        """Full-form MLA: keys and values expanded per head from the latents ``c_kv [B, S, C]``, ``k_pe [B, S, R]``.

        ``q_nope [B, T, H, Kn]``, ``q_pe [B, T, H, R]`` from :meth:`queries`; ``mask [B, T, S]`` boolean, True where
        query t may attend key s. Returns ``[B, T, D]`` in the compute dtype.
        """
        dt = self.dtype
        k_nope, v = self.expand(c_kv)
        scores = jnp.einsum("bthk,bshk->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthr,bsr->bhts", q_pe, k_pe, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, :, :], scores * self.cfg.attention_scale, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        o = jnp.einsum("bhts,bshk->bthk", probs, v)
        return self.out(o)

    def full_blockwise(self, q_nope, q_pe, c_kv, k_pe, pos: Positions) -> jax.Array:
        """:meth:`full` with :func:`blockwise_attention` over the new tokens: causal over ``pos.positions``, keys
        restricted by ``pos.key_valid`` and ``pos.segment_ids`` when given, blocks of ``pos.block`` tokens.
        Returns ``[B, T, D]`` in the compute dtype."""
        k_nope, v = self.expand(c_kv)
        o = blockwise_attention(
            (q_nope, q_pe),
            (k_nope, k_pe),
            v,
            pos.positions,
            pos.positions,
            key_valid=pos.key_valid,
            q_segments=pos.segment_ids,
            k_segments=pos.segment_ids,
            scale=self.cfg.attention_scale,
            block=pos.block,
        )
        return self.out(o.astype(self.dtype))

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

    def absorbed_blockwise(self, q_nope, q_pe, cached: jax.Array, pos: Positions, *, over_cache: bool) -> jax.Array:
        """:meth:`absorbed` with :func:`blockwise_attention`: keys and values are the latents ``cached [B, S, C + R]``
        themselves, shared by every head. ``over_cache``: ``cached`` is the cache (slot s visible when
        ``s <= position``: slots are positions); otherwise it is the new tokens' own latents, masked like
        :meth:`full_blockwise`. Returns ``[B, T, D]`` in the compute dtype."""
        dt, C = self.dtype, self.cfg.kv_lora_rank
        cached = cached.astype(dt)
        c, k_pe = cached[..., :C], cached[..., C:]
        q_latent = jnp.einsum("bthk,chk->bthc", q_nope, self.k_up[...].astype(dt))
        if over_cache:
            B, S = cached.shape[0], cached.shape[1]
            slots = jnp.broadcast_to(jnp.arange(S, dtype=pos.positions.dtype), (B, S))
            masking = dict(k_positions=slots)
        else:
            masking = dict(
                k_positions=pos.positions,
                key_valid=pos.key_valid,
                q_segments=pos.segment_ids,
                k_segments=pos.segment_ids,
            )
        u = blockwise_attention(
            (q_latent, q_pe), (c, k_pe), c, pos.positions, scale=self.cfg.attention_scale, block=pos.block, **masking
        )
        o = jnp.einsum("bthc,chk->bthk", u.astype(dt), self.v_up[...].astype(dt))
        return self.out(o)


def causal_mask(q_positions: jax.Array, k_positions: jax.Array, k_valid: jax.Array | None = None) -> jax.Array:
    """``[B, T, S]`` mask: key s visible to query t when ``k_pos <= q_pos`` (and the key is valid)."""
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask


# -- blockwise attention: online softmax, one block of scores at a time ----------------------------------------
# Inside a block keys and values are per head ([B, bk, H, K]) or shared by all heads ([B, bk, K]: MLA's k_pe, the
# absorbed form's latents); queries are [B, bq, H, K], the output and its cotangent [B, H, bq, Kv], scores
# [B, H, bq, bk]. One einsum spec per product and case (per head, shared).
_SPECS = {
    "scores": ("bthk,bshk->bhts", "bthk,bsk->bhts"),  # q . k
    "out": ("bhts,bshk->bhtk", "bhts,bsk->bhtk"),  # p . v
    "d_probs": ("bhtk,bshk->bhts", "bhtk,bsk->bhts"),  # do . v
    "d_query": ("bhts,bshk->bthk", "bhts,bsk->bthk"),  # ds . k
    "d_key": ("bhts,bthk->bshk", "bhts,bthk->bsk"),  # ds^T . q (summed over heads when shared)
    "d_value": ("bhts,bhtk->bshk", "bhts,bhtk->bsk"),  # p^T . do
}


def _einsum(product: str, a, b, kv):
    spec = _SPECS[product][0 if kv.ndim == 4 else 1]
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _blocks(x: jax.Array, size: int, count: int) -> jax.Array:
    """``[B, N, ...]`` -> ``[count, B, size, ...]``, zero-padded to ``count * size`` along N."""
    x = jnp.pad(x, [(0, 0), (0, count * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], count, size, *x.shape[2:]), 1, 0)


def _visible(qm: dict, km: dict) -> jax.Array:
    """``[B, bq, bk]``: key visible to query (causal: key position <= query position; a valid key; the same
    segment) and a real key, not block padding."""
    visible = km["positions"][:, None, :] <= qm["positions"][:, :, None]
    if "valid" in km:
        visible &= km["valid"][:, None, :]
    if "segments" in km:
        visible &= qm["segments"][:, :, None] == km["segments"][:, None, :]
    return visible & km["real"][None, None, :]


def _scores(q_blk, k_blk, qm, km, scale) -> tuple[jax.Array, jax.Array]:
    """Scaled, masked float32 scores ``[B, H, bq, bk]`` of one (query block, key block) pair, and ``_visible``.

    Masked real keys score ``NEG_INF`` as in the plain form (so a query that sees no key averages every real key,
    as the plain softmax over all ``-1e30`` does); block padding scores ``-inf`` and weighs exactly 0.
    """
    s = sum(_einsum("scores", q, k, k) for q, k in zip(q_blk, k_blk, strict=True)) * scale
    visible = _visible(qm, km)
    s = jnp.where(visible[:, None], s, NEG_INF)
    return jnp.where(km["real"][None, None, None, :], s, -jnp.inf), visible


def _needed(visible: jax.Array, m: jax.Array, q_real: jax.Array) -> jax.Array:
    """Whether a key block can change a query block's result: some query sees one of its keys, or some real query
    has seen no key yet (running max still ``NEG_INF``: it averages every real key). Skips causal blocks above the
    diagonal, forward and backward."""
    return jnp.any(visible) | jnp.any((m <= NEG_INF / 2) & q_real[None, None, :])


def _flash_forward(scale, qb, kb, vb, qm, km):
    """Online softmax over key blocks (``lax.scan``) for each query block in turn (``lax.map``).

    Returns the float32 output ``[nq, B, H, bq, Kv]`` and the final running max ``m`` and sum ``denom``
    ``[nq, B, H, bq]`` (kept apart, not as ``m + log denom``: for a query that sees nothing ``m = -1e30`` would swallow
    ``log denom``).
    """

    def one_query_block(args):
        q_blk, qm_i = args
        B, bq, H = q_blk[0].shape[:3]

        def step(carry, xs):
            k_blk, v_blk, km_j = xs

            def attend(carry):
                m, denom, acc = carry
                s, _ = _scores(q_blk, k_blk, qm_i, km_j, scale)
                m_new = jnp.maximum(m, s.max(axis=-1))  # finite: key block 0 holds a real key (score >= NEG_INF)
                p = jnp.exp(s - m_new[..., None])
                correction = jnp.exp(m - m_new)  # rescales what was summed under the old max
                out = _einsum("out", p.astype(v_blk.dtype), v_blk, v_blk)
                return m_new, denom * correction + p.sum(axis=-1), acc * correction[..., None] + out

            needed = _needed(_visible(qm_i, km_j), carry[0], qm_i["real"])
            return jax.lax.cond(needed, attend, lambda c: c, carry), None

        init = (
            jnp.full((B, H, bq), -jnp.inf, jnp.float32),
            jnp.zeros((B, H, bq), jnp.float32),
            jnp.zeros((B, H, bq, vb.shape[-1]), jnp.float32),
        )
        (m, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, km))
        return acc / denom[..., None], m, denom

    return jax.lax.map(one_query_block, (qb, qm))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(scale, qb, kb, vb, qm, km):
    return _flash_forward(scale, qb, kb, vb, qm, km)[0]


def _flash_fwd(scale, qb, kb, vb, qm, km):
    o, m, denom = _flash_forward(scale, qb, kb, vb, qm, km)
    return o, (qb, kb, vb, qm, km, o, m, denom)  # O(T) residuals: no scores


def _flash_bwd(scale, residuals, do):
    """Flash-attention backward: per (query block, key block) recompute ``p = exp(s - m) / denom``, then
    ``ds = p (dp - D)`` with ``dp = do . v`` and ``D = rowsum(do * o)``; masked scores get no gradient (the plain
    form's ``where``). Each query block's key and value gradients are added into full-size accumulators."""
    qb, kb, vb, qm, km, o, m, denom = residuals
    D = jnp.sum(do * o, axis=-1)
    zeros = lambda xs: tuple(jnp.zeros(x.shape, jnp.float32) for x in xs)  # noqa: E731

    def one_query_block(acc, args):
        q_blk, qm_i, do_i, m_i, denom_i, D_i = args

        def step(dq, xs):
            k_blk, v_blk, km_j = xs

            def grads(_):
                s, visible = _scores(q_blk, k_blk, qm_i, km_j, scale)
                p = jnp.exp(s - m_i[..., None]) / denom_i[..., None]
                ds = jnp.where(visible[:, None], p * (_einsum("d_probs", do_i, v_blk, v_blk) - D_i[..., None]), 0.0)
                ds = ds * scale
                dq_j = tuple(_einsum("d_query", ds, k, k) for k in k_blk)
                dk_j = tuple(_einsum("d_key", ds, q, k) for q, k in zip(q_blk, k_blk, strict=True))
                return dq_j, dk_j, _einsum("d_value", p, do_i, v_blk)

            def nothing(_):
                return zeros(q_blk), zeros(k_blk), zeros((v_blk,))[0]

            needed = _needed(_visible(qm_i, km_j), m_i, qm_i["real"])
            dq_j, dk_j, dv_j = jax.lax.cond(needed, grads, nothing, None)
            return tuple(a + b for a, b in zip(dq, dq_j, strict=True)), (dk_j, dv_j)

        dq, (dk_i, dv_i) = jax.lax.scan(step, zeros(q_blk), (kb, vb, km))
        dk, dv = acc
        return (tuple(a + b for a, b in zip(dk, dk_i, strict=True)), dv + dv_i), dq

    (dk, dv), dq = jax.lax.scan(one_query_block, (zeros(kb), zeros((vb,))[0]), (qb, qm, do, m, denom, D))
    cast = lambda grads, like: tuple(g.astype(x.dtype) for g, x in zip(grads, like, strict=True))  # noqa: E731
    return cast(dq, qb), cast(dk, kb), dv.astype(vb.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    queries: tuple[jax.Array, ...],
    keys: tuple[jax.Array, ...],
    values: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    scale: float,
    block: int,
    key_valid: jax.Array | None = None,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
) -> jax.Array:
    """Masked softmax attention with score memory of one block, forward and backward (flash attention in jnp).

    ``scores = scale * sum_i q_i . k_i``; query t sees key s when ``k_positions[s] <= q_positions[t]``, and
    ``key_valid[s]``, and ``q_segments[t] == k_segments[s]`` (those given). Same math as a dense float32
    ``softmax(where(mask, scores, -1e30)) @ values``, fully masked queries included (they average every key).
    T and S need not be multiples of ``block``: both are padded, padding keys weigh 0, padding queries are dropped.

    Args:
      queries: parts ``[B, T, H, K_i]`` (MLA: ``q_nope``, ``q_pe``).
      keys: matching parts, per head ``[B, S, H, K_i]`` or shared by every head ``[B, S, K_i]``.
      values: ``[B, S, H, Kv]`` or shared ``[B, S, Kv]``.
      q_positions, k_positions: ``[B, T]``, ``[B, S]`` int. key_valid: ``[B, S]`` bool. q_segments, k_segments:
        ``[B, T]``, ``[B, S]`` int (both or neither).
      scale: score multiplier. block: query and key block length (each capped at T, S).
    Returns: float32 ``[B, T, H, Kv]``.
    """
    T, S = q_positions.shape[1], k_positions.shape[1]
    bq, bk = min(block, T), min(block, S)
    nq, nk = -(-T // bq), -(-S // bk)
    qb = tuple(_blocks(q, bq, nq) for q in queries)
    kb = tuple(_blocks(k, bk, nk) for k in keys)
    vb = _blocks(values, bk, nk)
    qm = {"positions": _blocks(q_positions, bq, nq), "real": (jnp.arange(nq * bq) < T).reshape(nq, bq)}
    km = {"positions": _blocks(k_positions, bk, nk), "real": (jnp.arange(nk * bk) < S).reshape(nk, bk)}
    if key_valid is not None:
        km["valid"] = _blocks(key_valid, bk, nk)
    if (q_segments is None) != (k_segments is None):
        raise ValueError("blockwise_attention: give both q_segments and k_segments, or neither")
    if q_segments is not None:
        qm["segments"], km["segments"] = _blocks(q_segments, bq, nq), _blocks(k_segments, bk, nk)
    o = _flash(float(scale), qb, kb, vb, qm, km)  # [nq, B, H, bq, Kv]
    o = jnp.moveaxis(o, 0, 2).reshape(o.shape[1], o.shape[2], nq * bq, o.shape[-1])[:, :, :T]
    return jnp.transpose(o, (0, 2, 1, 3))
