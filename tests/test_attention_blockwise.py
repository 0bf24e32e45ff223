"""Blockwise MLA (``k25jax.attention.blockwise_attention``, ``RunConfig.attention_block``) against the plain forms:
values and gradients (inputs and attention weights) in float32, the whole text model, cached prefill and decode,
and the compiled temp memory of forward + backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k25jax import build_model
from k25jax import cache as kv_cache
from k25jax.attention import MLA, Positions, causal_mask
from k25jax.cache import LatentCache
from k25jax.config import ConfigError, RunConfig, tiny
from k25jax.quant import Int4Scales
from k25jax.rope import rope_angles, text_inv_freq, text_rope_scale
from k25jax.serve.steps import extend, prefill

from configs import no_q_lora
from tiny_models import scaled_mla

REL = 1e-5  # float32: max |diff| <= REL x max |plain form|, values and every gradient array
WEIGHT_STD = 0.2  # as in test_attention.py: scores of order 1, far from a uniform softmax


def _mla(cfg, seed=0):
    return scaled_mla(cfg, seed, WEIGHT_STD)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))  # 0 when both are zero (no-gradient leaves)


def _both(cfg, positions, block, key_valid=None, segment_ids=None):
    """The plain ``Positions`` (dense mask) and the blockwise one (mask ingredients) of the same attention."""
    positions = jnp.asarray(positions, jnp.int32)
    cos, sin = rope_angles(positions, text_inv_freq(cfg), text_rope_scale(cfg))
    mask = causal_mask(positions, positions, key_valid)
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    plain = Positions(positions, cos, sin, mask)
    return plain, Positions(positions, cos, sin, key_valid=key_valid, segment_ids=segment_ids, block=block)


def _value_and_grads(attn, x, pos, **kwargs):
    """Output and the gradients of a nonlinear loss w.r.t. ``x`` and every attention weight."""

    def loss(attn, x):
        out = attn(x, pos, **kwargs)[0]
        return jnp.sum(jnp.sin(3.0 * out)), out

    (_, out), (g_attn, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(attn, x)
    return out, {"x": g_x, **{"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(g_attn))}}


def _case(name, T):
    """Key validity and segment ids of one test case, batch 2 (row 1 starts at position 3)."""
    positions = np.arange(T)[None, :] + np.array([[0], [3]])
    valid = segments = None
    if name == "padding":  # right padding in row 0; row 1's first 4 keys invalid: its queries 0..3 see no key
        valid = np.ones((2, T), bool)
        valid[0, T - 3 :] = False
        valid[1, :4] = False
        valid = jnp.asarray(valid)
    if name == "segments":  # packed rows: positions restart per segment
        cut = [5, 8]
        segments = jnp.asarray([[0] * c + [1] * (T - c) for c in cut])
        positions = np.stack([np.concatenate([np.arange(c), np.arange(T - c)]) for c in cut])
    return positions, valid, segments


CASES = [  # (case, T, block): T not a multiple of the block, a block larger than T, padding, segments
    ("causal", 13, 4),
    ("causal", 10, 64),
    ("padding", 13, 5),
    ("segments", 14, 4),
]


@pytest.mark.parametrize("make_cfg", [tiny, no_q_lora], ids=["q_lora", "no_q_lora"])
@pytest.mark.parametrize("form", ["full", "absorbed"])
@pytest.mark.parametrize("case,T,block", CASES, ids=[f"{c}-T{t}-block{b}" for c, t, b in CASES])
def test_blockwise_matches_plain_values_and_gradients(make_cfg, form, case, T, block):
    """Blockwise vs plain over the new tokens: outputs and gradients (x and all weights) within 1e-5 relative
    (max seen 3.1e-6). Fully masked queries (case "padding") average every key in both, without NaN."""
    cfg = make_cfg().text
    attn = _mla(cfg)
    x = jnp.asarray(np.random.default_rng(T).normal(size=(2, T, cfg.hidden_size)), jnp.float32)
    positions, valid, segments = _case(case, T)
    plain, blockwise = _both(cfg, positions, block, valid, segments)
    want, want_grads = _value_and_grads(attn, x, plain, form=form)
    got, got_grads = _value_and_grads(attn, x, blockwise, form=form)
    assert np.isfinite(np.asarray(got)).all()
    errors = {"out": _rel(got, want), **{k: _rel(got_grads[k], g) for k, g in want_grads.items()}}
    assert set(got_grads) == set(want_grads) and len(want_grads) >= 7
    print(f"max relative error {max(errors.values()):.1e}")
    assert max(errors.values()) <= REL, errors


def test_blockwise_absorbed_over_the_cache():
    """The absorbed form over a latent cache (slot mask built per block; slots past the prefill are stale zeros)
    vs the plain form with the dense slot mask: values and gradients within 1e-5 relative."""
    cfg = tiny().text
    attn = _mla(cfg, seed=2)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 11, cfg.hidden_size)), jnp.float32)
    S = 24
    cache = jnp.zeros((1, 2, S, cfg.latent_cache_dim), jnp.float32)
    head_pos, _ = _both(cfg, np.broadcast_to(np.arange(6), (2, 6)), None)
    _, cache = attn(x[:, :6], head_pos, cache, layer=0, form="full")
    rest = jnp.asarray(np.broadcast_to(np.arange(6, 11), (2, 5)), jnp.int32)
    cos, sin = rope_angles(rest, text_inv_freq(cfg), text_rope_scale(cfg))
    plain = Positions(rest, cos, sin, kv_cache.slot_mask(rest, S))
    for block in (5, 7, 64):
        blockwise = Positions(rest, cos, sin, block=block)

        def loss(attn, x, cache, pos):
            out = attn(x, pos, cache, layer=0, form="absorbed")[0]
            return jnp.sum(jnp.sin(3.0 * out)), out

        grad = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (_, want), want_g = grad(attn, x[:, 6:], cache, plain)
        (_, got), got_g = grad(attn, x[:, 6:], cache, blockwise)
        errors = [_rel(got, want)] + [
            _rel(a, b) for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True)
        ]
        print(f"block {block}: max relative error {max(errors):.1e}")
        assert max(errors) <= REL, (block, errors)


@pytest.fixture(scope="module")
def models():
    """The same tiny float32 model (same seed) run plainly and blockwise (block 4)."""
    run = RunConfig(compute_dtype=jnp.float32)
    return build_model(tiny(), run, seed=5), build_model(tiny(), run.replace(attention_block=4), seed=5)


def _float_params(path, value):
    """An nnx filter: float parameters (not the frozen INT4 experts' words and scales)."""
    frozen = isinstance(value, Int4Scales) or not jnp.issubdtype(value.dtype, jnp.floating)
    return isinstance(value, nnx.Param) and not frozen


def _text_loss(text, ids, mask, segments, positions):
    logits = text(ids, positions, attention_mask=mask, segment_ids=segments)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)), logits


# remat="full" is slow-marked (CI time, 12 s); "none" stays in CI
@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_text_model_blockwise_logits_and_gradients(models, remat):
    """``RunConfig(attention_block=4)`` vs the plain model, T = 15 with key padding and packed segments: logits and
    the gradients of a next-token loss w.r.t. every float parameter within 1e-5 relative (max seen: logits 3.1e-7,
    gradients 6.1e-7)."""
    plain, blockwise = (m.text for m in models)
    for m in (plain, blockwise):
        m.run = m.run.replace(remat=remat)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 1000, (2, 15)), jnp.int32)
    mask = jnp.asarray(np.arange(15)[None, :] < np.array([[15], [12]]))
    segments = jnp.asarray([[0] * 6 + [1] * 9, [0] * 15])
    positions = jnp.asarray([list(range(6)) + list(range(9)), list(range(15))], jnp.int32)
    grad = nnx.value_and_grad(_text_loss, argnums=nnx.DiffState(0, _float_params), has_aux=True)
    (_, want), want_g = grad(plain, ids, mask, segments, positions)
    (_, got), got_g = grad(blockwise, ids, mask, segments, positions)
    assert _rel(got, want) <= REL, _rel(got, want)
    flat_want, flat_got = nnx.to_flat_state(want_g), nnx.to_flat_state(got_g)
    errors = {"/".join(map(str, k)): _rel(g, w) for (k, w), (_, g) in zip(flat_want, flat_got, strict=True)}
    print(f"logits {_rel(got, want):.1e}, gradients {max(errors.values()):.1e} over {len(errors)} arrays")
    assert len(errors) > 20 and max(errors.values()) <= REL, max(errors.items(), key=lambda kv: kv[1])


def test_blockwise_prefill_and_decode_match_plain(models):
    """Cached prefill (full form among the prompt, blockwise) and absorbed extend/decode over the cache
    (blockwise slot mask) give the plain model's logits within 1e-5 relative."""
    plain, blockwise = models
    ids = np.random.default_rng(1).integers(0, 1000, (2, 19))
    logits = []
    for model in (plain, blockwise):
        cache = LatentCache.zeros(model.cfg.text, 2, 32, jnp.float32)
        first, cache = prefill(model, ids[:, :9], [9, 7], cache)
        chunk, cache = extend(model, ids[:, 9:15], cache)
        step, cache = extend(model, ids[:, 15:16], cache)
        logits.append((first, chunk, step))
    errors = [_rel(b, a) for a, b in zip(*logits, strict=True)]
    print(f"prefill / extend / decode max relative error {max(errors):.1e}")
    assert max(errors) <= REL, errors


def test_attention_block_is_validated():
    assert RunConfig(attention_block=512).attention_block == 512
    for bad in (0, -4, 2.5, True, "512"):
        with pytest.raises(ConfigError, match="RunConfig.attention_block"):
            RunConfig(attention_block=bad)


def _temp_bytes(cfg, T, block):
    """Compiled temp bytes of forward + backward (gradients w.r.t. x and the weights) of one MLA, full form."""
    attn = MLA(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(attn)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, T))
    x = jax.ShapeDtypeStruct((1, T, cfg.hidden_size), jnp.float32)

    def grads(state, x):
        cos, sin = rope_angles(positions, text_inv_freq(cfg), text_rope_scale(cfg))
        if block is None:
            pos = Positions(positions, cos, sin, causal_mask(positions, positions))
        else:
            pos = Positions(positions, cos, sin, block=block)
        return jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x, pos)[0] ** 2), argnums=(0, 1))(state, x)

    return jax.jit(grads).lower(state, x).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_temp_memory_is_bounded_by_a_block():
    """T = 2048, 4 heads (tiny), forward + backward: one [1, 4, 2048, 2048] float32 score tensor is 64 MiB, and
    the plain form's compiled temp memory is 323 MiB; blockwise with 128-token blocks needs 8.3 MiB (39x less;
    a score block is 256 KiB). Asserted: at least 10x less, and the plain form above 3 score tensors."""
    cfg = tiny().text
    T = 2048
    plain, blockwise = _temp_bytes(cfg, T, None), _temp_bytes(cfg, T, 128)
    scores = 4 * T * T * 4
    print(f"temp bytes: plain {plain / 2**20:.1f} MiB, blockwise(128) {blockwise / 2**20:.1f} MiB")
    assert plain > 3 * scores, plain
    assert blockwise * 10 < plain, (plain, blockwise)
