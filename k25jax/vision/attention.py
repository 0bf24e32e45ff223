"""Bidirectional attention over packed media items: a patch attends only to patches of its own item.

Several images and video chunks run through the vision tower in one call, concatenated along the patch axis
(``P``). ``segment_ids [P]`` (non-decreasing, one id per item) says which item a patch belongs to. Items are
long (up to 16,384 patches for one image), so beyond one block the attention runs blockwise with an online
softmax (memory ``O(H * block^2)`` instead of ``O(H * P^2)``), and key blocks that share no item with the
query block are skipped. ``dense_segment_attention`` is the plain reference with the same semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30
DEFAULT_BLOCK = 1024


def dense_segment_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float
) -> jax.Array:
    """Reference: full ``[H, P, P]`` scores masked to same-segment pairs, float32 softmax.

    Args:
      q, k, v: ``[P, H, K]``. segment_ids: ``[P]`` int. scale: score multiplier (``K^-0.5``).
    Returns: ``[P, H, K]`` in ``q.dtype``.
    """
    scores = jnp.einsum("phk,shk->hps", q, k, preferred_element_type=jnp.float32) * scale
    same = segment_ids[:, None] == segment_ids[None, :]
    scores = jnp.where(same[None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("hps,shk->phk", probs, v).astype(q.dtype)


def segment_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float, block: int = DEFAULT_BLOCK
) -> jax.Array:
    """Same-segment bidirectional attention; blockwise with an online softmax when ``P > block``.

    Args:
      q, k, v: ``[P, H, K]``. segment_ids: ``[P]`` int, non-decreasing (items are contiguous).
      scale: score multiplier. block: query and key block length.
    Returns: ``[P, H, K]`` in ``q.dtype``.
    """
    P, H, K = q.shape
    if P <= block:
        return dense_segment_attention(q, k, v, segment_ids, scale)
    nb = -(-P // block)
    pad = nb * block - P
    # Padding patches get their own segment id (one past the last item): they attend only to each other,
    # so no real row ever sees them, and their outputs are dropped.
    pad_id = jnp.max(segment_ids) + 1
    seg = jnp.concatenate([segment_ids, jnp.full((pad,), pad_id, segment_ids.dtype)]).reshape(nb, block)
    qb, kb, vb = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))).reshape(nb, block, H, K) for x in (q, k, v))

    def one_query_block(args):
        q_blk, q_seg = args  # [B, H, K], [B]

        def step(carry, kv):
            m, denom, acc = carry
            k_blk, v_blk, k_seg = kv
            # Segments are sorted, so the blocks share an item iff their id ranges overlap.
            overlap = (q_seg[0] <= k_seg[-1]) & (k_seg[0] <= q_seg[-1])

            def attend(carry):
                m, denom, acc = carry
                s = jnp.einsum("qhk,shk->hqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
                mask = (q_seg[:, None] == k_seg[None, :])[None]
                s = jnp.where(mask, s, NEG_INF)
                m_new = jnp.maximum(m, s.max(axis=-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                denom = denom * correction + p.sum(axis=-1)
                pv = jnp.einsum("hqs,shk->hqk", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
                return m_new, denom, acc * correction[..., None] + pv

            return jax.lax.cond(overlap, attend, lambda c: c, carry), None

        init = (
            jnp.full((H, block), NEG_INF, jnp.float32),
            jnp.zeros((H, block), jnp.float32),
            jnp.zeros((H, block, K), jnp.float32),
        )
        (_, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, seg))
        return jnp.transpose(acc / denom[..., None], (1, 0, 2))  # [B, H, K]

    out = jax.lax.map(one_query_block, (qb, seg))  # [nb, B, H, K]
    return out.reshape(nb * block, H, K)[:P].astype(q.dtype)
