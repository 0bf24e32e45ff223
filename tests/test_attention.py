"""MLA (``k25jax.attention``): the full and absorbed forms against a plain softmax attention and each other,
the attention scale, the causal mask, and the absorbed form over a latent cache."""

import jax.numpy as jnp
import numpy as np
import pytest

from k25jax import cache as kv_cache
from k25jax.attention import Positions, causal_mask
from k25jax.config import tiny
from k25jax.rope import rope_angles, text_inv_freq, text_rope_scale

from configs import no_q_lora
from tiny_models import scaled_mla

REL = 1e-5  # float32: max |diff| <= REL x max |reference|
WEIGHT_STD = (
    0.2  # scaled up from the init's INIT_STD (0.02) so that the softmax is far from uniform (scores of order 1)
)


def _mla(cfg, seed=0):
    return scaled_mla(cfg, seed, WEIGHT_STD)


def _positions(cfg, positions, mask=None):
    positions = jnp.asarray(positions, jnp.int32)
    cos, sin = rope_angles(positions, text_inv_freq(cfg), text_rope_scale(cfg))
    return Positions(positions, cos, sin, causal_mask(positions, positions) if mask is None else mask)


def _inputs(cfg, batch=2, length=10, seed=0):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, cfg.hidden_size)), jnp.float32)
    positions = np.arange(length)[None, :] + np.array([[0], [3]])[:batch]  # row 1 starts at position 3
    return x, positions


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _reference(attn, x, pos, scale):
    """Softmax attention written out in float64 from the module's own projections, keys expanded per head."""
    q_nope, q_pe = (np.asarray(a, np.float64) for a in attn.queries(x, pos.cos, pos.sin))
    c_kv, k_pe = (np.asarray(a, np.float64) for a in attn.latents(x, pos.cos, pos.sin))
    k_up, v_up, o_proj = (np.asarray(w[...], np.float64) for w in (attn.k_up, attn.v_up, attn.o_proj))
    k_nope = np.einsum("bsc,chk->bshk", c_kv, k_up)
    v = np.einsum("bsc,chk->bshk", c_kv, v_up)
    scores = np.einsum("bthk,bshk->bhts", q_nope, k_nope) + np.einsum("bthr,bsr->bhts", q_pe, k_pe)
    scores = np.where(np.asarray(pos.mask)[:, None], scores * scale, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bthk,hkd->btd", np.einsum("bhts,bshk->bthk", probs, v), o_proj)


@pytest.mark.parametrize("make_cfg", [tiny, no_q_lora], ids=["q_lora", "no_q_lora"])
@pytest.mark.parametrize("form", ["full", "absorbed"])
def test_forms_match_plain_softmax_attention(make_cfg, form):
    cfg = make_cfg().text
    attn = _mla(cfg)
    x, positions = _inputs(cfg)
    pos = _positions(cfg, positions)
    out, cache = attn(x, pos, form=form)
    assert cache is None and out.shape == x.shape and out.dtype == jnp.float32
    want = _reference(attn, x, pos, cfg.attention_scale)
    assert _rel(out, want) <= REL, _rel(out, want)


def test_attention_scale_is_the_yarn_one():
    """tiny's YaRN (factor 16, mscale_all_dim 1) scales scores by qk_head_dim^-0.5 * m^2, m = 0.1 ln 16 + 1;
    the plain qk_head_dim^-0.5 gives a different output, far outside the tolerance."""
    cfg = tiny().text
    m = 0.1 * np.log(16.0) + 1.0
    assert cfg.attention_scale == pytest.approx(cfg.qk_head_dim**-0.5 * m * m, rel=1e-12)
    attn = _mla(cfg)
    x, positions = _inputs(cfg)
    pos = _positions(cfg, positions)
    out = attn(x, pos)[0]
    assert _rel(out, _reference(attn, x, pos, cfg.attention_scale)) <= REL
    assert _rel(out, _reference(attn, x, pos, cfg.qk_head_dim**-0.5)) > 100 * REL


def test_full_and_absorbed_forms_agree():
    cfg = tiny().text
    attn = _mla(cfg, seed=1)
    x, positions = _inputs(cfg, seed=1)
    pos = _positions(cfg, positions)
    full, absorbed = attn(x, pos, form="full")[0], attn(x, pos, form="absorbed")[0]
    assert _rel(absorbed, full) <= REL, _rel(absorbed, full)


def test_causal_mask():
    q = jnp.asarray([[0, 1, 2], [3, 4, 5]])
    mask = np.asarray(causal_mask(q, q))
    np.testing.assert_array_equal(mask, np.broadcast_to(np.tri(3, dtype=bool), (2, 3, 3)))
    valid = jnp.asarray([[True, False, True], [True, True, True]])
    masked = np.asarray(causal_mask(q, q, valid))
    np.testing.assert_array_equal(masked[0], np.tri(3, dtype=bool) & [True, False, True])
    np.testing.assert_array_equal(masked[1], mask[1])
    # One query at position 4 over keys at 2..6: sees 2, 3, 4.
    one = np.asarray(causal_mask(jnp.asarray([[4]]), jnp.asarray([[2, 3, 4, 5, 6]])))
    np.testing.assert_array_equal(one, [[[True, True, True, False, False]]])


@pytest.mark.parametrize("form", ["full", "absorbed"])
def test_later_tokens_do_not_change_earlier_outputs(form):
    cfg = tiny().text
    attn = _mla(cfg)
    x, positions = _inputs(cfg)
    pos = _positions(cfg, positions)
    out = np.asarray(attn(x, pos, form=form)[0])
    changed = np.asarray(attn(x.at[:, 6:].set(1.0), pos, form=form)[0])
    assert np.abs(changed[:, :6] - out[:, :6]).max() <= REL * np.abs(out).max()
    assert np.abs(changed[:, 6:] - out[:, 6:]).max() > 1e-2 * np.abs(out).max()


def test_absorbed_over_the_cache_continues_a_full_prefill():
    """Full form over the first 6 tokens writing the cache, then the absorbed form over the cache for the rest:
    the outputs of the whole sequence in one full pass. Slots are positions, so every row starts at 0."""
    cfg = tiny().text
    attn = _mla(cfg)
    x, _ = _inputs(cfg)
    positions = np.broadcast_to(np.arange(10), (2, 10))
    whole = _positions(cfg, positions)
    want = np.asarray(attn(x, whole)[0])
    S = 24
    cache = jnp.zeros((2, 2, S, cfg.latent_cache_dim), jnp.float32)  # a stack of 2 layers; this is layer 1
    head, cache = attn(x[:, :6], _positions(cfg, positions[:, :6]), cache, layer=1, form="full")
    rest = positions[:, 6:]
    tail, cache = attn(
        x[:, 6:], _positions(cfg, rest, kv_cache.slot_mask(jnp.asarray(rest), S)), cache, layer=1, form="absorbed"
    )
    errors = _rel(head, want[:, :6]), _rel(tail, want[:, 6:])
    assert max(errors) <= REL, errors
    # The cache holds each row's latents at slots = positions, in layer 1 only.
    c_kv, k_pe = attn.latents(x, whole.cos, whole.sin)
    latents = np.concatenate([c_kv, k_pe], -1)
    cache = np.asarray(cache)
    assert not cache[0].any()
    for b in range(2):
        np.testing.assert_allclose(cache[1, b, positions[b]], latents[b], rtol=0, atol=1e-6)
        assert not np.delete(cache[1, b], positions[b], axis=0).any()


def test_unknown_form_is_named():
    cfg = tiny().text
    x, positions = _inputs(cfg)
    with pytest.raises(ValueError, match="MLA form 'flash' is not 'full' or 'absorbed'"):
        _mla(cfg)(x, _positions(cfg, positions), form="flash")
