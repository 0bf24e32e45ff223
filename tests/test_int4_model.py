"""INT4 experts inside the model: the type survives NNX, eval_shape, jit, sharded device_put and orbax;
the kernels setting switches implementations without changing results. The type itself: ``test_quant.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from k25jax import abstract_model, build_model, count_params
from k25jax.config import RunConfig, k25, tiny
from k25jax.moe import Experts
from k25jax.quant import Int4Array, Int4Packed, Int4Scales, Int4Weight
from k25jax.sharding import LOGICAL_AXES

TOL = 1e-5  # float32 logits: max |diff| <= TOL x max |logits|


def _experts(model):
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Experts)]


def _ids(length=12):
    return jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, length)))


def _close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


def test_quantized_config_gives_int4_experts_with_logical_axes():
    model = build_model(tiny(), RunConfig(compute_dtype=jnp.float32))
    (experts,) = _experts(model)
    assert isinstance(experts.gate_proj, Int4Weight) and experts.gate_proj.shape == (2, 8, 64, 32)
    assert isinstance(experts.gate_proj.packed, Int4Packed) and isinstance(experts.down_proj.scales, Int4Scales)
    assert experts.gate_proj.packed.get_metadata()["out_sharding"] == (
        "layers",
        "experts",
        "expert_embed",
        "expert_mlp",
    )
    assert experts.down_proj.scales.get_metadata()["out_sharding"] == (
        "layers",
        "experts",
        "expert_mlp",
        None,
        "expert_embed",
    )
    assert experts.gate_proj.packed[...].dtype == jnp.int32 and experts.gate_proj.packed[...].shape == (2, 8, 8, 32)
    assert experts.up_proj.scales[...].dtype == jnp.bfloat16 and experts.up_proj.scales[...].shape == (2, 8, 2, 1, 32)
    value = experts.gate_proj[...]
    assert isinstance(value, Int4Array) and value[1, 3].shape == (64, 32)


def test_full_size_int4_model_is_abstract_and_counts_unpacked():
    model = abstract_model(k25())
    gate = _experts(model)[0].gate_proj
    assert gate.shape == (60, 384, 7168, 2048)
    packed, scales = gate.packed.get_value(), gate.scales.get_value()
    assert isinstance(packed, jax.ShapeDtypeStruct) and packed.shape == (60, 384, 896, 2048)
    assert scales.shape == (60, 384, 224, 1, 2048)
    assert count_params(model) == 1_026_879_376_368  # text stack 1,026,408,232,448 + vision and projector


def test_split_merge_roundtrip():
    model = build_model(tiny(), RunConfig(compute_dtype=jnp.float32))
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    again = nnx.merge(graphdef, state)
    _close(again(_ids()), model(_ids()), 0.0)


def test_kernels_setting_switches_and_agrees():
    model = build_model(tiny(), RunConfig(compute_dtype=jnp.float32))
    ids = _ids()
    xla = np.asarray(model(ids))
    for kernels in ("pallas", "pallas:gpu", "pallas:tpu"):
        model.set_run(kernels=kernels)
        assert all(e.run.kernels == kernels for e in _experts(model))
        _close(nnx.jit(lambda m, x: m(x))(model, ids), xla)
    with pytest.raises(ValueError, match="not one of"):
        model.set_run(kernels="triton")


def test_gradient_flows_through_int4_experts():
    """QAT/LoRA need gradients w.r.t. activations through the packed experts (custom_vjp), same as XLA's."""
    model = build_model(tiny(), RunConfig(compute_dtype=jnp.float32))
    ids = _ids(8)
    emb = model.text.embed(ids)

    def loss(h, m):
        return (m.text(ids, inputs_embeds=h) ** 2).mean()

    want = jax.grad(loss)(emb, model.set_run(kernels="xla"))
    got = jax.grad(loss)(emb, model.set_run(kernels="pallas"))
    _close(got, want)


def test_sharded_device_put_by_logical_axes():
    """Every INT4 leaf gets a NamedSharding from its own logical axes; the sharded model computes the same."""
    model = build_model(tiny(), RunConfig(compute_dtype=jnp.float32))
    ids = _ids()
    want = np.asarray(model(ids))
    mesh = jax.make_mesh((4, 2), ("expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    # gate/up shard their K (= D, 2 groups of 32) and down its N: values and scales split alike along K.
    chosen = {"experts": "expert", "expert_embed": "tensor"}
    rules = tuple((axis, chosen.get(axis)) for axis in LOGICAL_AXES)  # every other logical axis replicated
    graphdef, state = nnx.split(model)
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    sharded = jax.device_put(state, shardings)
    gate = sharded["text"]["moe_layers"]["mlp"]["experts"]["gate_proj"]
    assert gate["packed"][...].sharding.spec == PartitionSpec(None, "expert", "tensor", None)
    assert gate["scales"][...].sharding.spec == PartitionSpec(None, "expert", "tensor", None, None)
    assert gate["packed"][...].addressable_shards[0].data.shape == (2, 2, 4, 32)  # K/8 = 8 words -> 4 per shard
    assert gate["scales"][...].addressable_shards[0].data.shape == (2, 2, 1, 1, 32)  # 2 groups -> 1 per shard
    got = nnx.jit(lambda m, x: m(x))(nnx.merge(graphdef, sharded), ids)
    _close(got, want)


def test_orbax_save_restore_roundtrip(tmp_path):
    model = build_model(tiny(), RunConfig(compute_dtype=jnp.float32))
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
    abstract = nnx.state(abstract_model(tiny(), RunConfig(compute_dtype=jnp.float32)))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    gate = restored["text"]["moe_layers"]["mlp"]["experts"]["gate_proj"]
    assert isinstance(gate["packed"], Int4Packed)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("platform,call", [("tpu", "tpu_custom_call"), ("cuda", "xla.gpu.triton")])
def test_whole_model_lowers_with_pallas_kernels(platform, call):
    model = build_model(tiny(), RunConfig(compute_dtype=jnp.bfloat16, kernels="pallas"))
    graphdef, state = nnx.split(model)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    text = jax.jit(forward).trace(state, _ids()).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(call) >= 3  # gate, up, down expert matmuls (in the scanned MoE layer body)
