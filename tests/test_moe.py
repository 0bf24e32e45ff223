"""The routed experts: one grouped-SwiGLU op (``pallas_kernels.grouped_swiglu``) with its strategies (grouped
matmuls, the CPU tiled and per-row scans), layer-stacked weights, the choice made when lowering, and the model
with each strategy forced."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k25jax.config import RunConfig, k25, tiny
from k25jax.moe import Experts, dispatch_combine, route
from pallas_kernels.grouped_swiglu import grouped_swiglu
from pallas_kernels.grouped_swiglu.ops import cpu_strategy, cpu_tile, tiles_pay

F32 = RunConfig(compute_dtype="float32")


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _experts(int4: bool, run: RunConfig = F32) -> Experts:
    cfg = dataclasses.replace(tiny().text, n_routed_experts=8, hidden_size=64, moe_intermediate_size=64)
    experts = Experts(cfg, run, rngs=nnx.Rngs(0))
    if int4:
        experts.to_int4()
    return experts


# group sizes: empty experts, a group of exactly one tile of 8, groups spanning 2-3 tiles, a one-row group
GROUPS = [0, 8, 19, 0, 1, 30, 0, 5]


def _op(strategy, x, group_sizes, weights, layer=None, **kw):
    return grouped_swiglu(x, group_sizes, weights, dtype=jnp.float32, strategy=strategy, layer=layer, **kw)


@pytest.mark.parametrize("int4", [False, True])
@pytest.mark.parametrize("strategy, tile", [("tiled", 8), ("tiled", 32), ("per_row", None)])
def test_cpu_strategies_match_grouped_matmul(int4, strategy, tile):
    from pallas_kernels.grouped_swiglu import cpu

    weights = _experts(int4).values()
    group_sizes = jnp.asarray(GROUPS, jnp.int32)
    x = jax.random.normal(jax.random.key(1), (sum(GROUPS) + 5, 64))  # 5 rows past every group: must come out zero
    dense = _op("grouped", x, group_sizes, weights)
    if tile == cpu.TILE_ROWS:  # through the op (cpu_tile picks 32 for 68 rows over 8 experts)
        got = jax.jit(lambda x, g: _op(strategy, x, g, weights))(x, group_sizes)
    elif tile:
        got = jax.jit(lambda x, g: cpu.tiled(x, g, *weights, dtype=jnp.float32, tile=tile))(x, group_sizes)
    else:
        got = jax.jit(lambda x, g: _op(strategy, x, g, weights))(x, group_sizes)
    assert got.shape == dense.shape == (68, 64)
    assert _rel(got, dense) <= 1e-6
    assert float(jnp.abs(got[63:]).max()) == 0.0 and float(jnp.abs(dense[63:]).max()) == 0.0


@pytest.mark.parametrize("strategy", ["grouped", "tiled", "per_row"])
def test_layer_stacked_weights_read_the_given_layer(strategy):
    """A cached layer scan passes whole ``[L, E, ...]`` weights and the layer index; each strategy must compute
    with that layer's experts (and only differ from another layer's)."""
    layers = [_experts(True).values() for _ in range(1)]
    other = Experts(
        dataclasses.replace(tiny().text, n_routed_experts=8, hidden_size=64, moe_intermediate_size=64),
        F32,
        rngs=nnx.Rngs(7),
    )
    other.to_int4()
    layers.append(other.values())
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    group_sizes = jnp.asarray(GROUPS, jnp.int32)
    x = jax.random.normal(jax.random.key(2), (sum(GROUPS), 64))
    for index in (0, 1):
        want = _op("grouped", x, group_sizes, layers[index])
        got = jax.jit(lambda x, i: _op(strategy, x, group_sizes, stacked, layer=i))(x, jnp.int32(index))
        assert _rel(got, want) <= 1e-6
    assert _rel(_op("grouped", x, group_sizes, layers[0]), _op("grouped", x, group_sizes, layers[1])) > 0.1


@pytest.mark.parametrize("strategy", ["tiled", "per_row"])
def test_cpu_strategy_gradients_match(strategy):
    weights = _experts(False).values()
    group_sizes = jnp.asarray(GROUPS, jnp.int32)
    x = jax.random.normal(jax.random.key(2), (sum(GROUPS), 64))
    target = jax.random.normal(jax.random.key(3), (sum(GROUPS), 64))

    def loss(strategy, x, weights):
        return jnp.sum(_op(strategy, x, group_sizes, weights) * target)

    want = jax.grad(loss, argnums=(1, 2))("grouped", x, weights)
    got = jax.grad(loss, argnums=(1, 2))(strategy, x, weights)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _rel(g, w) <= 1e-5


def test_cpu_choice_prefill_tiles_decode_rows():
    e = k25().text.n_routed_experts
    assert cpu_strategy(512 * 8, e) == "tiled"  # a 512-token prefill chunk of K2.5: ~512 tiles, not 384 x 4096 rows
    assert tiles_pay(512 * 8, e) and not tiles_pay(8, e, tile=32)  # tiles of 32 for 8 rows: more work than ragged_dot
    assert cpu_strategy(32 * 4, 32) == "tiled"  # a 32-token prefill of the benchmark's small model (top-4 of 32)
    assert cpu_strategy(8 * 4, 32) == "tiled"  # an 8-token decode step: tiles of 2, ~one visit per chosen expert
    # Fewer rows than experts: one row at a time (K2.5, 384 experts top-8, decodes batches of up to 47 so).
    assert cpu_strategy(47 * 8, e) == "per_row" and cpu_strategy(48 * 8, e) == "tiled"
    assert cpu_strategy(31, 32) == "per_row"
    assert cpu_strategy(100, 1) == "grouped"  # one expert: ragged_dot is already the plain matmul


def test_cpu_tile_follows_the_mean_group():
    # twice the mean rows per expert as a power of two, within [2, TILE_ROWS]
    assert [cpu_tile(m, 32) for m in (32, 33, 64, 128, 256, 512, 4096)] == [2, 4, 4, 8, 16, 32, 32]
    assert cpu_tile(2048 * 8, 8) == 32  # a training batch: the largest tiles
    assert cpu_tile(3, 1) == 8 and cpu_tile(1, 384) == 2


def test_bad_strategy_and_kernels_named():
    weights = _experts(False).values()
    x, g = jnp.zeros((4, 64)), jnp.asarray([4, 0, 0, 0, 0, 0, 0, 0], jnp.int32)
    with pytest.raises(ValueError, match="strategy 'dense'"):
        _op("dense", x, g, weights)
    with pytest.raises(ValueError, match="'triton'"):
        _op("auto", x, g, weights, kernels="triton")


def test_per_row_matches_grouped_dispatch_in_a_layer():
    """Decode's per-row path (few token-expert pairs) computes what the sorted grouped matmul computes, through the
    MoE's own dispatch and combine."""
    from k25jax import build_model

    model = build_model(tiny(), F32, seed=1)
    graphdef, state = nnx.split(model.text.moe_layers)
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[1], state))
    x = jax.random.normal(jax.random.key(0), (5, model.cfg.text.hidden_size))
    weights, experts = route(x, layer.mlp.router[...], layer.mlp.correction_bias[...], model.cfg.text)
    values = layer.mlp.experts.values()

    def run(strategy):
        fn = lambda rows, g: _op(strategy, rows, g, values)  # noqa: E731
        return dispatch_combine(x, weights, experts, fn, model.cfg.text.n_routed_experts)

    assert _rel(run("per_row"), run("grouped")) <= 1e-6


@pytest.mark.parametrize("int4", [False, True])
def test_model_logits_with_each_strategy_forced(int4):
    """The whole model (layer scan, INT4 experts) and the cached prefill give the same logits on every strategy."""
    from k25jax import build_model
    from k25jax.cache import LatentCache
    from k25jax.serve.steps import prefill

    cfg = tiny()
    if not int4:
        cfg = dataclasses.replace(cfg, quantization=None)
    model = build_model(cfg, F32, seed=5)
    ids = jax.random.randint(jax.random.key(4), (2, 40), 0, cfg.text.vocab_size)
    outputs = {}
    for strategy in ("grouped", "tiled", "per_row"):
        model.set_run(experts=strategy)
        full = np.asarray(model(ids))
        cache = LatentCache.zeros(cfg.text, batch=2, max_len=48, dtype=jnp.float32)
        cached, _ = prefill(model, ids, jnp.asarray([40, 33]), cache)
        outputs[strategy] = (full, np.asarray(cached))
    for strategy in ("tiled", "per_row"):
        assert _rel(outputs[strategy][0], outputs["grouped"][0]) <= 1e-5
        assert _rel(outputs[strategy][1], outputs["grouped"][1]) <= 1e-5
    assert _rel(outputs["tiled"][0][0, -1], outputs["tiled"][1][0]) <= 1e-5  # cached prefill equals the full pass


def test_lowering_for_tpu_from_a_cpu_host_emits_no_cpu_expert_path():
    """The strategy is chosen when lowering (``jax.lax.platform_dependent``), not from the host's backend: lowering
    the model for TPU on this CPU host gives grouped matmuls only; lowering it for CPU gives the CPU scan (the
    control: the check can see it)."""
    from k25jax import build_model

    model = build_model(tiny(), F32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    ids = jnp.zeros((2, 64), jnp.int32)  # 1024 (token, expert) pairs over 8 experts: the CPU tiles pay

    def hlo(platform):
        return forward.trace(state, ids).lower(lowering_platforms=(platform,)).as_text(debug_info=True)

    tpu, cpu_text = hlo("tpu"), hlo("cpu")
    assert "grouped_swiglu_cpu" not in tpu
    assert "grouped_swiglu_grouped" in tpu
    assert "grouped_swiglu_cpu_tiled" in cpu_text
    # The Pallas grouped kernel skips empty experts itself: with kernels="pallas" no CPU scan, even on CPU.
    model.set_run(kernels="pallas")
    graphdef, state = nnx.split(model)
    pallas = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)).trace(state, ids).lower(lowering_platforms=("cpu",))
    assert "grouped_swiglu_cpu" not in pallas.as_text(debug_info=True)
