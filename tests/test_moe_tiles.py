"""The CPU tiled expert path (a scan over row tiles inside each expert's group) against the grouped ragged_dot."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k25jax.config import k25, tiny
from k25jax.moe import TILE_ROWS, Experts, expert_swiglu, tiles_pay


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _experts(int4: bool):
    cfg = dataclasses.replace(tiny().text, n_routed_experts=8, hidden_size=64, moe_intermediate_size=64)
    experts = Experts(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    if int4:
        experts.to_int4()
    return experts


# group sizes: empty experts, a group of exactly one tile, groups spanning 2-3 tiles, a one-row group
GROUPS = [0, 8, 19, 0, 1, 30, 0, 5]


@pytest.mark.parametrize("int4", [False, True])
@pytest.mark.parametrize("tile", [8, None])
def test_tiles_match_grouped_matmul(int4, tile):
    experts = _experts(int4)
    group_sizes = jnp.asarray(GROUPS, jnp.int32)
    x = jax.random.normal(jax.random.key(1), (sum(GROUPS), 64))
    gate, up, down = (experts.weight(n) for n in Experts.WEIGHTS)
    dense = expert_swiglu(x, group_sizes, gate, up, down, dtype=jnp.float32)
    tiled = jax.jit(lambda x, g: experts.tiled(x, g, tile))(x, group_sizes)
    assert tiled.shape == dense.shape == (63, 64)
    assert _rel(tiled, dense) <= 1e-6


def test_tile_gradients_match():
    experts = _experts(False)
    group_sizes = jnp.asarray(GROUPS, jnp.int32)
    x = jax.random.normal(jax.random.key(2), (sum(GROUPS), 64))
    target = jax.random.normal(jax.random.key(3), (sum(GROUPS), 64))
    gate, up, down = (experts.weight(n) for n in Experts.WEIGHTS)

    def loss_dense(x):
        return jnp.sum(expert_swiglu(x, group_sizes, gate, up, down, dtype=jnp.float32) * target)

    def loss_tiled(x):
        return jnp.sum(experts.tiled(x, group_sizes, 8) * target)

    assert _rel(jax.grad(loss_tiled)(x), jax.grad(loss_dense)(x)) <= 1e-5


def test_tiles_pay_for_prefill_not_decode():
    e = k25().text.n_routed_experts
    assert tiles_pay(512 * 8, e)  # a 512-token prefill chunk of K2.5: 512 tiles instead of 384 x 4096 rows
    assert not tiles_pay(8 * 8, e)  # decode: the tiles would outnumber the rows
    assert not tiles_pay(512 * 8, e, kernels="pallas")  # the Pallas kernel skips empty experts itself
    assert TILE_ROWS == 32


@pytest.mark.parametrize("int4", [False, True])
def test_model_logits_with_tiles_forced(monkeypatch, int4):
    """The whole model (layer scan, INT4 experts) and the cached prefill give the same logits on either path."""
    from k25jax import build_model, moe
    from k25jax.cache import LatentCache
    from k25jax.generate import prefill

    cfg = tiny()
    if not int4:
        cfg = dataclasses.replace(cfg, quantization=None)
    model = build_model(cfg, dtype=jnp.float32, seed=5)
    ids = jax.random.randint(jax.random.key(4), (2, 40), 0, cfg.text.vocab_size)
    outputs = {}
    for forced in (True, False):
        monkeypatch.setattr(moe, "tiles_pay", lambda *a, forced=forced, **k: forced)
        jax.clear_caches()
        full = np.asarray(model(ids))
        cache = LatentCache.zeros(cfg.text, batch=2, max_len=48, dtype=jnp.float32)
        cached, _ = prefill(model, ids, jnp.asarray([40, 33]), cache)
        outputs[forced] = (full, np.asarray(cached))
    assert _rel(outputs[True][0], outputs[False][0]) <= 1e-5
    assert _rel(outputs[True][1], outputs[False][1]) <= 1e-5
    assert _rel(outputs[True][0][0, -1], outputs[True][1][0]) <= 1e-5  # and the cached prefill equals the full pass
