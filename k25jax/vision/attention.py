"""Bidirectional attention over packed media items: a patch attends only to patches of its own item.

Several images and video chunks run through the vision tower in one call, concatenated along the patch axis
(``P``). ``segment_ids [P]`` (non-decreasing, one id per item) says which item a patch belongs to. Items are
long (up to 16,384 patches for one image), so beyond one block the attention runs blockwise with an online
softmax (memory ``O(H * block^2)`` instead of ``O(H * P^2)``), and key blocks that share no item with the
query block are skipped. ``dense_segment_attention`` is the plain reference with the same semantics.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

NEG_INF = -1e30
DEFAULT_BLOCK = 512


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

    The blockwise form has its own backward pass (FlashAttention's): the forward keeps only the output and the
    row log-sum-exp, the backward recomputes the probabilities block pair by block pair, and block pairs that
    share no item are skipped in both directions. (Differentiating the forward scan directly would store the
    ``[H, block, block]`` probabilities of every block pair, skipped or not: ``O(H * P^2)`` memory traffic.)

    Args:
      q, k, v: ``[P, H, K]``. segment_ids: ``[P]`` int, non-decreasing (items are contiguous).
      scale: score multiplier. block: query and key block length.
    Returns: ``[P, H, K]`` in ``q.dtype``.
    """
    P = q.shape[0]
    if P <= block:
        return dense_segment_attention(q, k, v, segment_ids, scale)
    return _blockwise(q, k, v, segment_ids, float(scale), int(block))


def _blocks(q, k, v, segment_ids, block):
    """Pad to whole blocks: ``[nb, block, H, K]`` each and ``[nb, block]`` segment ids. Padding rows get their own
    segment id (one past the last item), so no real row sees them; their outputs are dropped."""
    P, H, K = q.shape
    nb = -(-P // block)
    pad = nb * block - P
    pad_id = jnp.max(segment_ids) + 1
    seg = jnp.concatenate([segment_ids, jnp.full((pad,), pad_id, segment_ids.dtype)]).reshape(nb, block)
    qb, kb, vb = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))).reshape(nb, block, H, K) for x in (q, k, v))
    return qb, kb, vb, seg


def _overlap(a_seg, b_seg):
    """Whether two blocks of sorted segment ids share an item."""
    return (a_seg[0] <= b_seg[-1]) & (b_seg[0] <= a_seg[-1])


def _probs(q_blk, k_blk, q_seg, k_seg, lse, scale):
    """``[H, Bq, Bk]`` attention probabilities of a block pair from the rows' log-sum-exp ``lse [H, Bq]``."""
    s = jnp.einsum("qhk,shk->hqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    mask = (q_seg[:, None] == k_seg[None, :])[None]
    return jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)


def _forward(q, k, v, segment_ids, scale, block):
    P, H, K = q.shape
    qb, kb, vb, seg = _blocks(q, k, v, segment_ids, block)

    def one_query_block(args):
        q_blk, q_seg = args  # [B, H, K], [B]

        def step(carry, kv):
            k_blk, v_blk, k_seg = kv

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

            return jax.lax.cond(_overlap(q_seg, k_seg), attend, lambda c: c, carry), None

        init = (
            jnp.full((H, block), NEG_INF, jnp.float32),
            jnp.zeros((H, block), jnp.float32),
            jnp.zeros((H, block, K), jnp.float32),
        )
        (m, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, seg))
        # every row sees at least itself, so denom > 0
        return jnp.transpose(acc / denom[..., None], (1, 0, 2)), m + jnp.log(denom)  # [B, H, K], [H, B]

    out, lse = jax.lax.map(one_query_block, (qb, seg))  # [nb, B, H, K], [nb, H, B]
    return out.reshape(-1, H, K)[:P].astype(q.dtype), lse


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, segment_ids, scale, block):
    return _forward(q, k, v, segment_ids, scale, block)[0]


def _blockwise_fwd(q, k, v, segment_ids, scale, block):
    out, lse = _forward(q, k, v, segment_ids, scale, block)
    return out, (q, k, v, segment_ids, out, lse)


def _blockwise_bwd(scale, block, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    P, H, K = q.shape
    qb, kb, vb, seg = _blocks(q, k, v, segment_ids, block)
    dob, ob = (
        jnp.pad(x.astype(jnp.float32), ((0, qb.shape[0] * block - P), (0, 0), (0, 0))).reshape(qb.shape)
        for x in (d_out, out)
    )
    delta = jnp.einsum("nqhk,nqhk->nhq", dob, ob)  # [nb, H, B]: rowsum(dO * O)

    def ds_of(q_blk, k_blk, v_blk, do_blk, q_seg, k_seg, lse_blk, delta_blk):
        p = _probs(q_blk, k_blk, q_seg, k_seg, lse_blk, scale)  # [H, Bq, Bk]
        dp = jnp.einsum("qhk,shk->hqs", do_blk, v_blk, preferred_element_type=jnp.float32)
        return p, p * (dp - delta_blk[..., None])

    def key_block(args):  # dK, dV of one key block: a scan over the query blocks
        k_blk, v_blk, k_seg = args

        def step(carry, xs):
            q_blk, do_blk, q_seg, lse_blk, delta_blk = xs

            def add(carry):
                dk, dv = carry
                p, ds = ds_of(q_blk, k_blk, v_blk, do_blk, q_seg, k_seg, lse_blk, delta_blk)
                dv = dv + jnp.einsum("hqs,qhk->shk", p, do_blk)
                dk = dk + jnp.einsum("hqs,qhk->shk", ds, q_blk.astype(jnp.float32)) * scale
                return dk, dv

            return jax.lax.cond(_overlap(q_seg, k_seg), add, lambda c: c, carry), None

        zeros = jnp.zeros((block, H, K), jnp.float32)
        (dk, dv), _ = jax.lax.scan(step, (zeros, zeros), (qb, dob, seg, lse, delta))
        return dk, dv

    def query_block(args):  # dQ of one query block: a scan over the key blocks
        q_blk, do_blk, q_seg, lse_blk, delta_blk = args

        def step(dq, xs):
            k_blk, v_blk, k_seg = xs

            def add(dq):
                _, ds = ds_of(q_blk, k_blk, v_blk, do_blk, q_seg, k_seg, lse_blk, delta_blk)
                return dq + jnp.einsum("hqs,shk->qhk", ds, k_blk.astype(jnp.float32)) * scale

            return jax.lax.cond(_overlap(q_seg, k_seg), add, lambda c: c, dq), None

        dq, _ = jax.lax.scan(step, jnp.zeros((block, H, K), jnp.float32), (kb, vb, seg))
        return dq

    dk, dv = jax.lax.map(key_block, (kb, vb, seg))
    dq = jax.lax.map(query_block, (qb, dob, seg, lse, delta))
    dq, dk, dv = (x.reshape(-1, H, K)[:P].astype(like.dtype) for x, like in ((dq, q), (dk, k), (dv, v)))
    return dq, dk, dv, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
