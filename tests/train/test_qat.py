"""INT4 QAT: fake-quant weights bit for bit at step 0 and at export, gradients, trainable subsets, the train step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k25jax
from k25jax.config import RunConfig, tiny
from k25jax.moe import Experts
from k25jax.quant import Int4Weight
from k25jax.train.fakequant import GRIDS, FakeQuantArray, FakeQuantWeight, fake_quant, group_scales, quantize_int4
from k25jax.train.qat import QATError, quantize_experts, to_fake_quant, to_int4, trainable_filter, trainable_paths
from k25jax.train.step import OptimizerConfig, make_train_step, model_loss, split_model
from pallas_kernels import int4_layout

F32 = RunConfig(compute_dtype="float32")


def _batch(vocab: int, batch: int = 2, length: int = 24, seed: int = 0) -> dict:
    """Two packed samples per row (segments 1 and 2), positions restarting, loss on the second half of each."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length + 1))
    half = length // 2
    segments = np.concatenate([np.ones(half), np.full(length - half, 2)]).astype(np.int32)
    positions = np.concatenate([np.arange(half), np.arange(length - half)]).astype(np.int32)
    mask = np.ones((batch, length), np.float32)
    mask[:, half - 1] = 0  # the target across the segment boundary is not a real next token
    mask[:, : half // 2] = 0
    return {
        "input_ids": jnp.asarray(ids[:, :-1], jnp.int32),
        "targets": jnp.asarray(ids[:, 1:], jnp.int32),
        "loss_mask": jnp.asarray(mask),
        "positions": jnp.broadcast_to(jnp.asarray(positions), (batch, length)),
        "segment_ids": jnp.broadcast_to(jnp.asarray(segments), (batch, length)),
    }


def _forward_and_loss(model, batch):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        return m(batch["input_ids"]), model_loss(m, batch)[0]

    logits, loss = run(state)
    return np.asarray(logits), float(loss)


@pytest.mark.parametrize(
    "scales, master_dtype", [("frozen", "float32"), ("dynamic", "float32"), ("frozen", "bfloat16")]
)
def test_step0_bitwise_on_a_kimi_grid_release(kimi_release, scales, master_dtype):
    """Loaded INT4 release vs the same release made fake-quant: logits and loss equal bit for bit."""
    model = k25jax.load_model(kimi_release, F32, progress=False)
    batch = _batch(model.cfg.text.vocab_size)
    want_logits, want_loss = _forward_and_loss(model, batch)
    report = to_fake_quant(model, grid="kimi", scales=scales, master_dtype=master_dtype)
    assert len(report.converted) == 3 and not report.kept_int4
    got_logits, got_loss = _forward_and_loss(model, batch)
    assert np.array_equal(got_logits, want_logits)
    assert got_loss == want_loss


def test_dynamic_scales_from_bf16_masters_are_not_the_release(kimi_release):
    """bf16 masters round ``q * s`` (up to 11 significant bits into 8): recomputed scales move one ulp in ~10% of the
    groups (q itself is unchanged), so dynamic scales need float32 masters to be bitwise (the README says so)."""
    model = k25jax.load_model(kimi_release, F32, progress=False)
    experts = [m for _, m in nnx.iter_modules(model) if isinstance(m, Experts)][0]
    value = experts.gate_proj[...]
    recomputed = group_scales(value.dequantize(jnp.bfloat16), GRIDS["kimi"])
    moved = float(jnp.mean(recomputed != value.scales))
    assert 0.01 < moved < 0.3
    assert bool(jnp.all(group_scales(value.dequantize(jnp.float32), GRIDS["kimi"]) == value.scales))


def test_compressed_tensors_grid_frozen_bitwise_dynamic_not(tmp_path):
    """A release quantized by compressed-tensors' own functions (the oracle writer): frozen scales reproduce it
    bit for bit; scales recomputed on the kimi rule do not (the grid audit's point)."""
    from convert_helpers import make_release

    path = make_release(dataclasses.replace(tiny(), vision=None), tmp_path / "ct", seed=1, vision=False)
    model = k25jax.load_model(path, F32, progress=False)
    batch = _batch(model.cfg.text.vocab_size)
    want_logits, want_loss = _forward_and_loss(model, batch)
    graphdef, state = nnx.split(model)
    frozen = nnx.merge(graphdef, state)
    to_fake_quant(frozen, grid="compressed-tensors", scales="frozen")
    logits, loss = _forward_and_loss(frozen, batch)
    assert np.array_equal(logits, want_logits) and loss == want_loss
    dynamic = nnx.merge(graphdef, state)
    to_fake_quant(dynamic, grid="kimi", scales="dynamic")
    logits, _ = _forward_and_loss(dynamic, batch)
    assert not np.array_equal(logits, want_logits)


def test_fake_quant_gradients():
    w = jax.random.normal(jax.random.key(0), (64, 16)) * 0.05
    s = group_scales(w, GRIDS["kimi"])
    g = jax.random.normal(jax.random.key(1), (64, 16))
    grid = GRIDS["kimi"]
    # Straight through: the gradient to the master is the incoming gradient, the scales get none.
    dw, ds = jax.grad(lambda w, s: jnp.sum(fake_quant(w, s, grid, jnp.float32, False) * g), argnums=(0, 1))(w, s)
    assert np.array_equal(np.asarray(dw), np.asarray(g)) and float(jnp.abs(ds).max()) == 0.0
    # LSQ: inside the grid the master gets g, the scale sum(g (q - w/s)) / sqrt(32 * 7) per group.
    half = s * 0.5  # halve the scales: about half the values fall outside [-7, 7] and are clamped
    dw, ds = jax.grad(lambda w, s: jnp.sum(fake_quant(w, s, grid, jnp.float32, True) * g), argnums=(0, 1))(w, half)
    ratio = (w.reshape(2, 32, 16) / half.astype(jnp.float32)).reshape(64, 16)
    inside = (ratio >= -7) & (ratio <= 7)
    assert 0.05 < float(jnp.mean(~inside)) < 0.95
    assert np.array_equal(np.asarray(dw), np.asarray(jnp.where(inside, g, 0.0)))
    q = jnp.clip(jnp.round(ratio), -7, 7)
    want = (jnp.where(inside, q - ratio, q) * g).reshape(2, 32, 16).sum(1, keepdims=True) / np.sqrt(32 * 7)
    np.testing.assert_allclose(np.asarray(ds, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-4)


def test_fake_quant_array_indexes_and_exports():
    w = jax.random.normal(jax.random.key(2), (3, 4, 64, 8)) * 0.1  # [L, E, K, N]
    value = quantize_int4(w, "kimi")
    fq = FakeQuantArray(value.dequantize(jnp.float32), value.scales, GRIDS["kimi"], "dynamic")
    assert fq[1, 2].shape == (64, 8) and fq[1].shape == (4, 64, 8)
    assert np.array_equal(np.asarray(fq.dequantize()), np.asarray(value.dequantize()))
    back = fq.to_int4()
    assert np.array_equal(np.asarray(back.packed), np.asarray(value.packed))
    assert np.array_equal(np.asarray(back.scales), np.asarray(value.scales))
    nibbles = np.asarray(int4_layout.unpack_device(value.packed))
    assert nibbles.min() >= -7 and nibbles.max() == 7  # the kimi grid never uses -8
    with pytest.raises(IndexError):
        fq[..., 0]


def test_bad_settings_are_named():
    model = k25jax.build_model(tiny(), F32)
    with pytest.raises(QATError, match="--qat-scales 'sometimes'"):
        to_fake_quant(model, scales="sometimes")
    with pytest.raises(ValueError, match="grid 'int3'"):
        to_fake_quant(model, grid="int3")


def test_training_a_subset_keeps_frozen_experts_packed_and_trains():
    """Attention-only training: experts stay INT4 (no float copy), optimizer state only for trainable leaves, loss
    falls; then full QAT of the experts: export to INT4 equals the trained fake-quant forward bit for bit."""
    model = k25jax.build_model(tiny(), F32, seed=1)
    quantize_experts(model, "kimi")
    batch = _batch(model.cfg.text.vocab_size, batch=4, length=32)
    # 1. attention only
    flt = trainable_filter(r"^text/.*/attn/")
    paths = trainable_paths(model, flt)
    assert paths and all("/attn/" in p for p in paths)
    graphdef, trainable, frozen = split_model(model, flt)
    packed = [v for p, v in nnx.to_flat_state(frozen) if p[-1] == "packed"]
    assert len(packed) == 3 and all(v.dtype == jnp.int32 for v in packed)
    floats_in_experts = [p for p, v in nnx.to_flat_state(frozen) if "experts" in p and v.dtype == jnp.float32]
    assert floats_in_experts == []
    config = OptimizerConfig(lr=1e-2, steps=12, warmup=2, weight_decay=0.01)
    tx = config.build()
    opt_state = tx.init(trainable)
    trainable_bytes = sum(a.nbytes for a in jax.tree.leaves(trainable))
    adam_bytes = sum(a.nbytes for a in jax.tree.leaves(opt_state) if a.ndim > 0)
    assert adam_bytes == 2 * trainable_bytes  # m and v, for the trainable leaves only
    step = make_train_step(graphdef, tx, config.schedule())
    losses = []
    for _ in range(12):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.3
    assert float(metrics["lr"]) < 1e-2 and float(metrics["tokens"]) == float(batch["loss_mask"].sum())
    # 2. full QAT on the experts too
    model = nnx.merge(graphdef, trainable, frozen)
    to_fake_quant(model, grid="kimi", scales="dynamic")
    flt = trainable_filter(r"^text/")
    assert any(p.endswith("experts/gate_proj/master") for p in trainable_paths(model, flt))
    graphdef, trainable, frozen = split_model(model, flt)
    opt_state = tx.init(trainable)
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainable)}
    full_step = make_train_step(graphdef, tx)  # once: a jitted step built per iteration compiles per iteration
    for _ in range(5):
        trainable, opt_state, metrics = full_step(trainable, opt_state, frozen, batch)
    masters = [(p, v) for p, v in nnx.to_flat_state(trainable) if p[-1] == "master"]
    moved = [p for p, v in masters if not np.array_equal(np.asarray(v.get_value()), before[p])]
    assert len(moved) == 3
    trained = nnx.merge(graphdef, trainable, frozen)
    fq_logits, _ = _forward_and_loss(trained, batch)
    assert len(to_int4(trained)) == 3
    assert all(isinstance(m.gate_proj, Int4Weight) for _, m in nnx.iter_modules(trained) if isinstance(m, Experts))
    int4_logits, _ = _forward_and_loss(trained, batch)
    assert np.array_equal(fq_logits, int4_logits)


def test_segments_keep_attention_within_a_sample():
    """Packed rows: a token's logits depend only on its own segment (changing the other sample changes nothing)."""
    model = k25jax.build_model(dataclasses.replace(tiny(), vision=None), F32, seed=2)
    batch = _batch(model.cfg.text.vocab_size, batch=1, length=20)
    other = dict(batch, input_ids=batch["input_ids"].at[:, 10:].set(7))
    a = np.asarray(model.text(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"]))
    b = np.asarray(model.text(other["input_ids"], other["positions"], segment_ids=other["segment_ids"]))
    assert np.array_equal(a[:, :10], b[:, :10])
    alone = np.asarray(model.text(batch["input_ids"][:, :10], batch["positions"][:, :10]))
    np.testing.assert_allclose(a[:, :10], alone, rtol=0, atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_fake_quant_weight_module_types():
    w = jax.random.normal(jax.random.key(3), (4, 64, 8)) * 0.1
    value = quantize_int4(w, "kimi")
    frozen = FakeQuantWeight(
        FakeQuantArray(value.dequantize(), value.scales, GRIDS["kimi"], "frozen"),
        ("experts", "expert_embed", "expert_mlp"),
    )
    learned = FakeQuantWeight(
        FakeQuantArray(value.dequantize(), value.scales, GRIDS["kimi"], "learned"),
        ("experts", "expert_embed", "expert_mlp"),
    )
    assert not isinstance(frozen.scales, nnx.Param) and isinstance(learned.scales, nnx.Param)
    assert frozen.shape == (4, 64, 8) and frozen[...].mode == "frozen"
