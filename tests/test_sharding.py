"""Sharded inference on 8 fake CPU devices: logits equal the single-device ones, experts stay where they live,
no collective moves expert weights, the planner's bytes equal the real buffers, FSDP gradients agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k25jax import build_model
from k25jax.cache import LatentCache
from k25jax.config import RunConfig, k25, tiny
from k25jax.moe import Experts
from k25jax.plan import cache_bytes, collectives, param_bytes, plan, trainable_bytes
from k25jax.quant import Int4Packed, Int4Scales
from k25jax.serve import steps as engine_steps
from k25jax.serve.steps import extend, prefill
from k25jax.sharding import (
    ShardingError,
    abstract_mesh,
    expert_layout,
    logical_spec,
    make_mesh,
    mesh_sizes,
    shard_model,
    use_mesh,
)
from k25jax.vision import expand_media_pads

from configs import text_variant

REL = 1e-5  # max |sharded - single| <= REL * max |single| (float32)
ZERO_GRAD_ATOL = 1e-9  # a gradient that is exactly zero on one device: |sharded| <= this (float32, absolute)
MESHES = {
    "expert8": dict(expert=8),
    "expert4_tensor2": dict(expert=4, tensor=2),
    "dp2_ep2_tp2": dict(data=2, expert=2, tensor=2),
}
# Tokens enter the MoE split over the batch: B=4 does not divide expert=8 (tokens replicated, outputs summed), but
# does divide expert=4 and data x expert = 4 (tokens all-gathered, outputs reduce-scattered): both paths run.
B, T, S = 4, 8, 16
LENGTHS = np.array([5, 8, 3, 8])


def variant():
    # Expert width 64 = 2 INT4 groups, so the down projection's K splits over tensor=2; 8 experts for expert=8.
    return text_variant(tiny(), moe_intermediate_size=64)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model():
    return build_model(variant(), RunConfig(compute_dtype=jnp.float32), seed=1)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (B, T)).astype(np.int32)
    steps = rng.integers(0, 1000, (2, B, 1)).astype(np.int32)
    return ids, steps


def _run(model, ids, steps, mesh=None):
    """Full forward logits, prefill logits, two decode-step logits, and the cache."""
    with use_mesh(mesh):
        full = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    cache = LatentCache.zeros(model.cfg.text, B, S, jnp.float32, mesh=mesh)
    logits, cache = prefill(model, ids, LENGTHS, cache)
    out = [np.asarray(full), np.asarray(logits)]
    for tokens in steps:
        logits, cache = extend(model, tokens, cache)
        out.append(np.asarray(logits))
    return out, cache


@pytest.fixture(scope="module")
def reference(model, inputs):
    return _run(model, *inputs)[0]


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_logits_match_single_device(model, inputs, reference, name):
    mesh = make_mesh(**MESHES[name])
    placed = shard_model(model, mesh)
    outs, cache = _run(placed, *inputs, mesh=mesh)
    errors = [_rel(o, r) for o, r in zip(outs, reference, strict=True)]
    print(f"{name}: relative errors full/prefill/decode1/decode2 = {[f'{e:.1e}' for e in errors]}")
    assert max(errors) <= REL, errors
    # The cache stays split by batch row like the activations (data x expert), whole over tensor.
    rows = logical_spec(("batch",), (B,), mesh, fit=True)[0]
    spec = tuple(cache.stacks["moe_layers"].sharding.spec)
    assert spec + (None,) * (4 - len(spec)) == (None, rows, None, None)
    assert list(np.asarray(cache.lengths)) == list(LENGTHS + 2)


def test_pallas_kernels_on_the_mesh(model, inputs, reference):
    """The INT4 Pallas grouped kernel (interpreted on CPU) runs inside the expert-parallel shard_map too."""
    mesh = make_mesh(expert=4, tensor=2)
    placed = shard_model(model, mesh).set_run(kernels="pallas")
    with use_mesh(mesh):
        full = nnx.jit(lambda m, x: m(x))(placed, jnp.asarray(inputs[0]))
    assert _rel(full, reference[0]) <= REL


@pytest.mark.parametrize("name", list(MESHES))
def test_each_device_holds_only_its_experts(model, name):
    mesh = make_mesh(**MESHES[name])
    placed = shard_model(model, mesh)
    per_device = 8 // mesh.shape["expert"]
    experts = placed.text.moe_layers.mlp.experts
    checked = 0
    for weight_name in Experts.WEIGHTS:
        for leaf in (getattr(experts, weight_name).packed, getattr(experts, weight_name).scales):
            array = leaf.get_value()
            whole = np.asarray(array)
            for shard in array.addressable_shards:
                assert shard.data.shape[1] == per_device  # [L, E/expert, ...] on every device
                np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index])
                checked += 1
    assert checked == 6 * 8


def _expert_slices(model):
    """(dtype name, elements of one expert's slice) of every INT4 expert leaf of ``model``, and of the float32 form
    of one expert's weight (what the XLA path dequantizes to, in this float32 model: 8 values per packed word)."""
    out = []
    for _, var in nnx.to_flat_state(nnx.state(model)):
        if isinstance(var, Int4Packed | Int4Scales) and var.shape[1] == 8:
            per_expert = var.size // (var.shape[0] * var.shape[1])
            out.append((str(jnp.dtype(var.dtype)), per_expert))
            if isinstance(var, Int4Packed):
                out.append(("float32", 8 * per_expert))
    return out


def _hlo(model, mesh, ids, steps):
    """Compiled HLO text of the prefill and the decode step of ``model`` on ``mesh``."""
    graphdef, state = nnx.split(model.text)
    cache = LatentCache.zeros(model.cfg.text, B, S, jnp.float32, mesh=mesh)
    with use_mesh(mesh):
        first = engine_steps._prefill.lower(graphdef, state, ids, jnp.asarray(LENGTHS), cache, None, None)
        step = engine_steps._extend.lower(graphdef, state, steps[0], jnp.ones((B,), jnp.int32), cache, True)
        return first.compile().as_text() + step.compile().as_text()


def _weight_sized(ops, slices):
    names = {"int32": "s32", "bfloat16": "bf16", "float32": "f32"}
    bad = []
    for op in ops:
        for dtype, dims in op.arrays:
            if any(dtype == names[t] and int(np.prod(dims)) >= n for t, n in slices):
                bad.append((op.op, dtype, dims))
    return bad


def test_no_collective_moves_expert_weights(model, inputs, monkeypatch):
    """In the compiled prefill and decode step, no collective carries as much as one expert's weight slice."""
    mesh = make_mesh(expert=4, tensor=2)
    placed = shard_model(model, mesh)
    slices = _expert_slices(placed)
    ids, steps = (jnp.asarray(a) for a in inputs)
    ops = collectives(_hlo(placed, mesh, ids, steps))
    kinds = {op.op for op in ops}
    assert {"all-gather", "reduce-scatter", "all-reduce"} <= kinds  # tokens gathered, outputs reduced, TP sums
    assert _weight_sized(ops, slices) == []
    # Control: the same program without the expert-parallel shard_map (plain jit propagation) does move expert
    # weights, so the check above can fail.
    monkeypatch.setattr("k25jax.moe.expert_layout", lambda *a: None)
    jax.clear_caches()
    control_ops = collectives(_hlo(placed, mesh, ids, steps))
    jax.clear_caches()
    assert _weight_sized(control_ops, slices), "the control program should gather expert weights"
    # float32 counts too: the control also moves one expert's weight as float32 values (dequantized), which a
    # check of the int32 words and bf16 scales alone would not see.
    assert _weight_sized(control_ops, [s for s in slices if s[0] == "float32"])


def test_expert_layout_paths_and_errors():
    with use_mesh(make_mesh(data=2, expert=4)):
        split = expert_layout(8, 8)  # 8 rows over data x expert: gathered over expert
        assert split.gather_axes == ("expert",) and split.sum_axes == () and split.expert_shards == 4
        small = expert_layout(2, 8)  # 2 rows: over data only; experts summed over expert
        assert small.token_axes == ("data",) and small.sum_axes == ("expert",)
        with pytest.raises(ShardingError, match="6 routed experts do not divide"):
            expert_layout(8, 6)
    with use_mesh(make_mesh(data=8)):
        assert expert_layout(8, 8) is None  # data parallel only: plain jit
    assert expert_layout(8, 8) is None  # no mesh: the single-device path


def test_plan_bytes_equal_real_buffers(model):
    """Planner parameter and cache bytes per device == the bytes each device really holds."""
    cfg = variant()
    abstract = nnx.eval_shape(lambda: build_model(cfg, RunConfig(compute_dtype=jnp.float32), seed=1))
    for sizes, batch in [(dict(expert=4, tensor=2), 4), (dict(data=2, expert=2, tensor=2), 2)]:
        mesh = make_mesh(**sizes)
        placed = shard_model(model, mesh)
        held = {d: 0 for d in jax.devices()}
        for array in jax.tree.leaves(nnx.state(placed)):
            for shard in array.addressable_shards:
                held[shard.device] += shard.data.nbytes
        planned = sum(param_bytes(abstract, abstract_mesh(**sizes)).values())
        assert set(held.values()) == {planned}, (sizes, set(held.values()), planned)
        cache = LatentCache.zeros(cfg.text, batch, 32, jnp.bfloat16, mesh=mesh)
        cache_held = {d: 0 for d in jax.devices()}
        for array in jax.tree.leaves(cache):
            for shard in array.addressable_shards:
                cache_held[shard.device] += shard.data.nbytes
        planned_cache = cache_bytes(LatentCache.abstract(cfg.text, batch, 32, jnp.bfloat16), abstract_mesh(**sizes))
        assert set(cache_held.values()) == {planned_cache}, (sizes, set(cache_held.values()), planned_cache)


def test_plan_that_does_not_fit_says_so():
    """K2.5 on 8 v5e chips (16 GB each): the routed experts alone (71 GB per chip) exceed the usable HBM."""
    cfg = k25()
    small = plan(cfg, {"expert": 8}, batch=8, context=32768, device="v5e")
    usable = 16e9 * 0.95
    assert small.usable == usable and small.params["routed experts"] > usable
    total = sum(small.params.values()) + small.cache + sum(small.activations.values())
    assert small.total == total and total > usable
    assert small.fits is False
    report = small.report()
    assert f"does NOT fit ({(usable - total) / 1e9:+.2f} GB headroom)" in report and " fits " not in report
    # the same layout on H200 (141 GB) fits, with the same parameter bytes: the verdict follows the numbers
    big = plan(cfg, {"expert": 8}, batch=8, context=32768, device="h200")
    assert big.params == small.params and big.total <= big.usable and big.fits is True
    assert f"fits ({(big.usable - big.total) / 1e9:+.2f} GB headroom)" in big.report()


def test_plan_full_k25_arithmetic():
    """The README's figures: K2.5 on 8 x H200 (expert=8) and on v5p-64 (32 chips, expert=8 x tensor=4)."""
    cfg = k25()
    t = cfg.text
    int4 = 0.5 + 2 / 32  # bytes per INT4 value: half a byte plus a bf16 scale per group of 32
    experts = t.num_moe_layers * t.n_routed_experts * 3 * t.hidden_size * t.moe_intermediate_size * int4
    h200 = plan(cfg, {"expert": 8}, batch=8, context=32768, device="h200")
    assert h200.params["routed experts"] == experts / 8
    assert h200.params["embedding + lm_head"] == 2 * t.vocab_size * t.hidden_size * 2  # replicated (tensor=1)
    assert h200.cache == 61 * 576 * 2 * 32768 * 8 // 8 + 4  # one sequence per device, plus its length
    assert h200.fits
    v5p = plan(cfg, {"expert": 8, "tensor": 4}, batch=8, context=32768, device="v5p")
    assert v5p.params["routed experts"] == experts / 32
    assert v5p.params["embedding + lm_head"] == 2 * t.vocab_size * t.hidden_size * 2 / 4
    assert v5p.fits and "fits" in v5p.report()
    train = plan(cfg, {"fsdp": 4, "expert": 8}, batch=8, context=4096, device="v5p", train=True)
    count, grads = trainable_bytes(nnx.eval_shape(lambda: build_model(cfg)), abstract_mesh(fsdp=4, expert=8))
    assert train.optimizer == 8 * count and train.gradients == grads
    with pytest.raises(ShardingError, match="does not divide over mesh axes"):
        plan(cfg, {"expert": 7}, batch=8, context=1024)


def test_mesh_sizes_fill_data():
    assert mesh_sizes("expert=4,tensor=2", 16) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 2}
    assert mesh_sizes("expert=8", 8)["data"] == 1
    with pytest.raises(ShardingError, match="needs 6 devices, but 8 are available"):
        mesh_sizes("data=3,expert=2", 8)
    with pytest.raises(ShardingError, match="given twice"):
        mesh_sizes("expert=2,expert=4", 8)


def test_fsdp_training_gradients_match_single_device(model, inputs):
    """A loss gradient under the train rules (FSDP + expert + tensor) equals the single-device gradient."""
    ids = jnp.asarray(inputs[0])

    def loss(m, x):
        logits = m(x)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0])

    trainable = nnx.All(nnx.Param, nnx.Not(nnx.Any(nnx.OfType(Int4Packed), nnx.OfType(Int4Scales))))
    grad = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, trainable)))
    ref = nnx.to_flat_state(grad(model, ids))
    mesh = make_mesh(fsdp=2, expert=2, tensor=2)
    placed = shard_model(model, mesh, "train")
    assert tuple(placed.text.moe_layers.attn.q_a_proj.get_value().sharding.spec) == (None, "fsdp", None)
    with use_mesh(mesh):
        got = dict(nnx.to_flat_state(grad(placed, ids)))
    ref = dict(ref)
    assert got.keys() == ref.keys()
    errors, zero = {}, {}
    for p, v in ref.items():
        want, have = np.asarray(v.get_value()), np.asarray(got[p].get_value())
        assert have.shape == want.shape and have.dtype == want.dtype, p
        scale = np.abs(want).max()
        if scale:
            errors[p] = float(np.abs(have - want).max() / scale)
        else:  # a zero reference gradient (the vision tower, unused here): the sharded one must be zero too
            zero[p] = float(np.abs(have).max())
    # Gradients that cross the expert-parallel shard_map: the router (replicated in, per-token use) and the
    # attention feeding the MoE tokens.
    assert ("text", "moe_layers", "mlp", "router") in errors and ("text", "moe_layers", "attn", "q_b_proj") in errors
    worst = max(errors, key=errors.get)
    print(
        f"FSDP gradients: {len(errors)} arrays, worst relative error {errors[worst]:.1e} at {worst}; "
        f"{len(zero)} zero reference arrays, largest sharded value {max(zero.values(), default=0.0):.1e}"
    )
    assert errors[worst] <= REL
    assert zero and max(zero.values()) <= ZERO_GRAD_ATOL


@pytest.fixture(scope="module")
def biased_model():
    """The test model with a non-zero router correction bias (``build_model`` starts it at zero)."""
    biased = build_model(variant(), RunConfig(compute_dtype=jnp.float32), seed=1)
    bias = biased.text.moe_layers.mlp.correction_bias
    values = np.random.default_rng(5).standard_normal(bias.shape).astype(np.float32) * 0.1  # [L, E]
    bias.set_value(jnp.asarray(values))
    return biased


@pytest.mark.parametrize("name", list(MESHES))
def test_biased_routing_on_the_mesh_matches_single_device(model, biased_model, inputs, reference, name):
    """A non-zero correction bias (selection only) changes which experts are chosen, and the expert-parallel path
    on the mesh chooses the same ones: logits equal the single-device logits of the biased model."""
    ids = jnp.asarray(inputs[0])
    forward = nnx.jit(lambda m, x: m(x))
    single = np.asarray(forward(biased_model, ids))
    # The bias only selects experts, so different logits mean different experts chosen, here far beyond REL:
    # a mesh path that dropped the bias would give the zero-bias logits and fail below.
    changed = _rel(single, reference[0])
    assert changed > 1e3 * REL, changed
    mesh = make_mesh(**MESHES[name])
    placed = shard_model(biased_model, mesh)
    bias = placed.text.moe_layers.mlp.correction_bias.get_value()
    np.testing.assert_array_equal(np.asarray(bias), np.asarray(biased_model.text.moe_layers.mlp.correction_bias[...]))
    with use_mesh(mesh):
        sharded = np.asarray(forward(placed, ids))
    error = _rel(sharded, single)
    print(f"{name}: biased routing, logits moved {changed:.1e} by the bias, sharded vs single {error:.1e}")
    assert error <= REL


def test_vision_runs_on_the_mesh(model):
    """Image + text logits on a mesh (vision tower replicated, text sharded) equal the single-device ones."""
    grid = np.array([[1, 4, 4]])
    pad = model.cfg.media_placeholder_token_id
    ids = jnp.asarray([expand_media_pads([3, pad, 4, 5], grid, pad)] * 2)
    pixels = jnp.asarray(np.random.default_rng(2).standard_normal((16, 3, 14, 14)).astype(np.float32))
    run = nnx.jit(lambda m, i, p: m(i, pixel_values=p, grid_thw=grid))
    ref = run(model, ids, pixels)
    mesh = make_mesh(data=2, expert=2, tensor=2)
    with use_mesh(mesh):
        got = run(shard_model(model, mesh), ids, pixels)
    assert _rel(got, ref) <= REL
