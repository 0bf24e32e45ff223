"""LoRA on the frozen INT4 experts: bitwise at step 0, only adapters train, both exports, gradients, strategies."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k25jax
from k25jax.config import RunConfig
from k25jax.moe import Experts
from k25jax.quant import Int4Array, Int4Weight
from k25jax.train.fakequant import quantize_int4
from k25jax.train.lora import (
    LoRAArray,
    LoRAError,
    LoRAParam,
    LoRAWeight,
    apply_lora,
    load_adapters,
    lora_filter,
    merge_lora,
    save_adapters,
    strip_lora,
)
from k25jax.train.qat import trainable_paths
from k25jax.train.step import OptimizerConfig, make_train_step, split_model
from pallas_kernels import int4_layout
from pallas_kernels.grouped_swiglu import SwiGLUWeights, grouped_swiglu

F32 = RunConfig(compute_dtype="float32")
RANK, ALPHA = 4, 8.0
STEPS, LR = 8, 3e-3
# Merge-and-requantize on the kimi grid after the fixture's training, tiny model, measured (deterministic on CPU):
# max |merged - lora| / max |lora| = 0.144 while the LoRA moved the logits by 0.690 of that max (so the merge keeps
# 1 - 0.144 / 0.690 = 79% of the adaptation); 61-72% of the q values and 98-99.6% of the group scales change.
# Bounds with margin:
MERGE_MAX_REL = 0.2
MERGE_KEPT = 0.7  # 1 - max|merged - lora| / max|lora - base| must stay above this


def _batch(vocab: int, batch: int = 4, length: int = 32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length + 1))
    mask = np.ones((batch, length), np.float32)
    mask[:, : length // 4] = 0
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return {
        "input_ids": jnp.asarray(ids[:, :-1], jnp.int32),
        "targets": jnp.asarray(ids[:, 1:], jnp.int32),
        "loss_mask": jnp.asarray(mask),
        "positions": jnp.asarray(positions),
        "segment_ids": jnp.ones((batch, length), jnp.int32),
    }


def _logits(model, ids) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s).text(ids))(state))


def _flat(model, flt=...) -> dict:
    return {p: np.array(v.get_value(), copy=True) for p, v in nnx.to_flat_state(nnx.state(model, flt))}


def _copy(model):
    return nnx.merge(*nnx.split(model))


@pytest.fixture(scope="module")
def release(kimi_release):
    """A release-format tiny model whose routed experts are on the kimi grid (tests/train/conftest.py)."""
    return kimi_release


@pytest.fixture(scope="module")
def trained(release):
    """The release with rank-4 LoRA on every routed expert, trained STEPS steps on the adapters only."""
    model = k25jax.load_model(release, F32, progress=False)
    batch = _batch(model.cfg.text.vocab_size)
    base_logits = _logits(model, batch["input_ids"])
    base_state = _flat(model)
    report = apply_lora(model, rank=RANK, alpha=ALPHA, seed=0)
    graphdef, trainable, frozen = split_model(model, lora_filter())
    before = {p: np.array(v.get_value(), copy=True) for p, v in nnx.to_flat_state(trainable)}  # donated below
    config = OptimizerConfig(lr=LR, steps=STEPS)
    tx = config.build()
    opt_state = tx.init(trainable)
    ns = types.SimpleNamespace(
        **{
            "report": report,
            "batch": batch,
            "base_logits": base_logits,
            "base_state": base_state,
            "before": before,
            "frozen": frozen,
            "trainable_paths": [p for p, _ in nnx.to_flat_state(trainable)],
            "trainable_bytes": sum(a.nbytes for a in jax.tree.leaves(trainable)),
            "adam_bytes": sum(a.nbytes for a in jax.tree.leaves(opt_state) if a.ndim > 0),
        }
    )
    step = make_train_step(graphdef, tx)
    ns.losses = []
    for _ in range(STEPS):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
        ns.losses.append(float(metrics["loss"]))
    ns.model = nnx.merge(graphdef, trainable, frozen)
    ns.logits = _logits(ns.model, batch["input_ids"])
    return ns


@pytest.mark.parametrize(
    "strategy, dtype", [("grouped", "float32"), ("tiled", "float32"), ("per_row", "float32"), ("auto", "bfloat16")]
)
def test_step0_equals_the_int4_base_bitwise(release, strategy, dtype):
    """b = 0: the adapter term adds exact zeros, so the LoRA model's logits are the base's bit for bit."""
    model = k25jax.load_model(release, RunConfig(compute_dtype=dtype, experts=strategy), progress=False)
    ids = _batch(model.cfg.text.vocab_size)["input_ids"]
    want = _logits(model, ids)
    report = apply_lora(model, rank=RANK, alpha=ALPHA)
    assert len(report.targets) == 3 and report.adapter_params == 2 * 3 * 8 * RANK * (64 + 32)  # [L=2, E=8]
    assert np.array_equal(_logits(model, ids), want)


def test_only_adapters_train_and_the_base_stays_packed(trained):
    assert trained.losses[-1] < trained.losses[0] - 0.1, trained.losses
    # The optimizer sees the six adapter matrices and nothing else; Adam state is m and v for them only.
    assert len(trained.trainable_paths) == 6
    assert all(p[-1] in ("a", "b") and "experts" in p for p in trained.trainable_paths)
    assert trained.trainable_bytes == trained.report.adapter_bytes
    assert trained.adam_bytes == 2 * trained.trainable_bytes
    # No float copy of an expert anywhere in the state: expert leaves are int32 words, bf16 scales, the adapters.
    experts = {p: v for p, v in _flat(trained.model).items() if "experts" in p}
    assert {p[-2:] for p in experts} == {("base", "packed"), ("base", "scales")} | {
        (n, w) for n in Experts.WEIGHTS for w in "ab"
    }
    assert all(v.dtype == np.int32 for p, v in experts.items() if p[-1] == "packed")
    assert all(v.dtype == jnp.bfloat16 for p, v in experts.items() if p[-1] == "scales")
    float_bytes = sum(v.nbytes for p, v in experts.items() if p[-1] in ("a", "b"))
    packed_bytes = sum(v.nbytes for p, v in experts.items() if p[-1] in ("packed", "scales"))
    assert float_bytes == trained.report.adapter_bytes
    assert packed_bytes == sum(v.nbytes for p, v in trained.base_state.items() if "experts" in p)
    # Every adapter moved; every other parameter (INT4 words, scales, attention, norms, router) is unchanged.
    after = _flat(trained.model)
    for p in trained.trainable_paths:
        assert not np.array_equal(after[p], trained.before[p]), p
    for p, v in trained.base_state.items():
        moved = p[:-1] + ("base", p[-1]) if "experts" in p else p
        assert after[moved].dtype == v.dtype and np.array_equal(after[moved], v), p


def test_adapters_beside_the_release_round_trip_bitwise(trained, release, tmp_path):
    out = save_adapters(trained.model, tmp_path / "adapters")
    import json

    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["rank"] == RANK and config["alpha"] == ALPHA and len(config["targets"]) == 3
    assert "text.moe_layers.mlp.experts.gate_proj.a" in config["tensors"]
    assert not [f for f in (tmp_path / "adapters").iterdir() if f.name.startswith(".tmp")]
    model = k25jax.load_model(release, F32, progress=False)
    report = load_adapters(model, out)
    assert report.targets == trained.report.targets and report.adapter_bytes == trained.report.adapter_bytes
    assert np.array_equal(_logits(model, trained.batch["input_ids"]), trained.logits)
    # Stripping the adapters leaves exactly the release's parameters.
    stripped = _copy(trained.model)
    assert len(strip_lora(stripped)) == 3
    state = _flat(stripped)
    assert state.keys() == trained.base_state.keys()
    assert all(np.array_equal(state[p], v) for p, v in trained.base_state.items())
    with pytest.raises(LoRAError, match="already has LoRA"):
        load_adapters(model, out)


def test_merged_int4_export_within_the_measured_bound(trained, tmp_path):
    from convert.to_release import export_model

    merged = _copy(trained.model)
    report = merge_lora(merged, "kimi")
    assert len(report.merged) == 3
    assert all(isinstance(m.gate_proj, Int4Weight) for _, m in nnx.iter_modules(merged) if isinstance(m, Experts))
    assert 0.4 < report.q_changed_overall < 0.9, report.q_changed
    export_model(merged, tmp_path / "merged", progress=False)
    loaded = k25jax.load_model(tmp_path / "merged", F32, progress=False)
    got = _logits(loaded, trained.batch["input_ids"])
    assert np.array_equal(got, _logits(merged, trained.batch["input_ids"]))  # INT4 export itself is exact
    top = np.abs(trained.logits).max()
    rel = np.abs(got - trained.logits).max() / top
    assert 0 < rel < MERGE_MAX_REL, rel
    kept = 1 - np.abs(got - trained.logits).max() / np.abs(trained.logits - trained.base_logits).max()
    assert kept > MERGE_KEPT, kept


def test_merging_zero_adapters_on_the_kimi_grid_is_the_base(release):
    """The kimi grid's fixed point: W + 0 re-quantized gives back every word and scale."""
    model = k25jax.load_model(release, F32, progress=False)
    want = _flat(model)
    apply_lora(model, rank=RANK)
    report = merge_lora(model, "kimi")
    assert report.q_changed_overall == 0.0 and all(v == 0.0 for v in report.scales_changed.values())
    got = _flat(model)
    assert got.keys() == want.keys() and all(np.array_equal(got[p], v) for p, v in want.items())


def _lora_value(key, lead=(4,), k=64, n=16, rank=3, alpha=6.0) -> LoRAArray:
    k1, k2, k3 = jax.random.split(key, 3)
    base = quantize_int4(jax.random.normal(k1, (*lead, k, n)) * 0.05, "kimi")
    a = jax.random.normal(k2, (*lead, k, rank)) / 8
    b = jax.random.normal(k3, (*lead, rank, n)) * 0.05
    return LoRAArray(base, a, b, alpha)


def test_grouped_matmul_gradients_match_a_dense_reference():
    value = _lora_value(jax.random.key(0))
    group_sizes = jnp.asarray([3, 0, 5, 4], jnp.int32)  # 12 rows of 14 belong to experts
    rows = jax.random.normal(jax.random.key(1), (14, 64))
    g = jax.random.normal(jax.random.key(2), (14, 16))
    expert_of_row = jnp.asarray([0] * 3 + [2] * 5 + [3] * 4 + [0, 0])
    valid = (jnp.arange(14) < 12)[:, None]
    hi = jax.lax.Precision.HIGHEST

    def lora_loss(rows, a, b):
        return jnp.sum(dataclasses.replace(value, a=a, b=b).grouped_matmul(rows, group_sizes) * g)

    def dense_loss(rows, a, b):
        w = value.base.dequantize(jnp.float32)[expert_of_row]
        low = jnp.einsum("mk,mkr->mr", rows, a[expert_of_row], precision=hi)
        out = jnp.einsum("mk,mkn->mn", rows, w, precision=hi)
        out = out + jnp.einsum("mr,mrn->mn", low, b[expert_of_row], precision=hi) * value.scale
        return jnp.sum(jnp.where(valid, out, 0.0) * g)

    args = (rows, value.a, value.b)
    np.testing.assert_allclose(lora_loss(*args), dense_loss(*args), rtol=1e-5)
    got = jax.grad(lora_loss, argnums=(0, 1, 2))(*args)
    want = jax.grad(dense_loss, argnums=(0, 1, 2))(*args)
    for name, x, y in zip(("rows", "a", "b"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow  # ~22 s
def test_expert_op_strategies_agree_with_lora_weights_and_layer_stacks():
    """grouped / tiled / per_row on a layer-stacked [L, E, ...] LoRA weight (the cached path indexes [layer, expert])
    agree within 1e-5, values and adapter gradients, with the per-layer slice."""
    keys = jax.random.split(jax.random.key(3), 3)
    d, f, e = 64, 32, 4
    gate, up = (_lora_value(k, lead=(2, e), k=d, n=f) for k in keys[:2])
    down = _lora_value(keys[2], lead=(2, e), k=f, n=d)
    rows = jax.random.normal(jax.random.key(4), (10, d))
    group_sizes = jnp.asarray([2, 3, 0, 4], jnp.int32)

    def run(strategy, weights, layer=None):
        return grouped_swiglu(rows, group_sizes, weights, dtype=jnp.float32, strategy=strategy, layer=layer)

    def adapters_loss(ab, strategy):
        ws = SwiGLUWeights(*(dataclasses.replace(w, a=a, b=b) for w, (a, b) in zip((gate, up, down), ab, strict=True)))
        return jnp.sum(run(strategy, ws, jnp.int32(1)) ** 2)

    sliced = SwiGLUWeights(gate[1], up[1], down[1])
    want = np.asarray(run("grouped", sliced))
    ab = [(w.a, w.b) for w in (gate, up, down)]
    want_grad = jax.grad(adapters_loss)(ab, "grouped")
    for strategy in ("grouped", "tiled", "per_row"):
        np.testing.assert_allclose(run(strategy, SwiGLUWeights(gate, up, down), jnp.int32(1)), want, atol=1e-5)
        for x, y in zip(
            jax.tree.leaves(jax.grad(adapters_loss)(ab, strategy)), jax.tree.leaves(want_grad), strict=True
        ):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=strategy)


@pytest.mark.parametrize("strategy", ["grouped", "tiled", "per_row"])
def test_model_strategies_give_the_same_logits_with_trained_lora(trained, release, strategy, tmp_path):
    save_adapters(trained.model, tmp_path)
    model = k25jax.load_model(release, dataclasses.replace(F32, experts=strategy), progress=False)
    load_adapters(model, tmp_path)
    got = _logits(model, trained.batch["input_ids"])
    np.testing.assert_allclose(got, trained.logits, rtol=0, atol=1e-5)
    assert np.abs(trained.logits - trained.base_logits).max() > 1e-2  # the adapters matter


def test_lora_array_indexing_and_dequantize():
    value = _lora_value(jax.random.key(5), lead=(2, 3))
    one = value[1, 2]
    assert one.shape == (64, 16) and value[1].shape == (3, 64, 16) and one.rank == 3 and one.scale == 2.0
    base = value.base[1, 2].dequantize(jnp.float32)
    want = base + np.asarray(value.a[1, 2]) @ np.asarray(value.b[1, 2]) * 2.0
    np.testing.assert_allclose(np.asarray(one.dequantize()), want, rtol=1e-6, atol=1e-7)
    zero = dataclasses.replace(one, b=jnp.zeros_like(one.b))
    assert np.array_equal(np.asarray(zero.dequantize(jnp.bfloat16)), np.asarray(one.base.dequantize(jnp.bfloat16)))
    with pytest.raises(IndexError):
        value[..., 0]
    plain = LoRAArray(value.base.dequantize(), value.a, jnp.zeros_like(value.b), 6.0)  # a plain-array base
    rows = jax.random.normal(jax.random.key(6), (5, 64))
    sizes = jnp.asarray([1, 2, 2], jnp.int32)
    want_rows = jax.lax.ragged_dot(rows, plain.base[0], sizes, preferred_element_type=jnp.float32)
    assert np.array_equal(np.asarray(plain[0].grouped_matmul(rows, sizes)), np.asarray(want_rows))


def test_targets_filter_and_errors(release):
    model = k25jax.load_model(release, F32, progress=False)
    with pytest.raises(LoRAError, match="matches no routed-expert"):
        apply_lora(model, experts="nothing_here")
    with pytest.raises(LoRAError, match="--lora-rank 0"):
        apply_lora(model, rank=0)
    report = apply_lora(model, experts=r"/(gate|up)_proj$", rank=2)
    assert [t.rsplit("/", 1)[1] for t in report.targets] == ["gate_proj", "up_proj"]
    assert report.skipped == ["text/moe_layers/mlp/experts/down_proj"] and report.alpha == 2.0
    experts = next(m for _, m in nnx.iter_modules(model) if isinstance(m, Experts))
    assert isinstance(experts.gate_proj, LoRAWeight) and isinstance(experts.down_proj, Int4Weight)
    assert isinstance(experts.gate_proj.base, Int4Weight) and isinstance(experts.gate_proj[...].base, Int4Array)
    assert experts.gate_proj.a.get_metadata()["out_sharding"] == ("layers", "experts", "expert_embed", None)
    assert experts.gate_proj.b.get_metadata()["out_sharding"] == ("layers", "experts", None, "expert_mlp")
    paths = trainable_paths(model, lora_filter())
    assert sorted(paths) == sorted(f"{t}/{w}" for t in report.targets for w in "ab")
    assert trainable_paths(model, lora_filter("up_proj")) == [f"{report.targets[1]}/a", f"{report.targets[1]}/b"]
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model, lora_filter())))
    assert int4_layout.unpack_device(experts.gate_proj.base.packed[...]).dtype == jnp.int8
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(model, experts="gate_proj")
