"""Sharding core: mesh construction, logical -> mesh specs with clear errors, model placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from k25jax import abstract_model, build_model
from k25jax.config import RunConfig, k25, tiny
from k25jax.sharding import ShardingError, logical_spec, make_mesh, parse_mesh, shard_model, state_shardings

from configs import text_variant


def test_make_mesh_shapes_and_errors():
    mesh = make_mesh(expert=4, tensor=2)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 2}
    with pytest.raises(ShardingError, match="needs 6 devices, but 8 are available"):
        make_mesh(expert=3, tensor=2)
    assert parse_mesh("expert=8,tensor=4") == {"expert": 8, "tensor": 4}
    with pytest.raises(ShardingError, match="--mesh: expected NAME=SIZE"):
        parse_mesh("experts=8")


def test_logical_spec_rules_and_errors():
    mesh = make_mesh(expert=4, tensor=2)
    spec = logical_spec(("layers", "experts", "expert_embed", "expert_mlp"), (2, 8, 64, 32), mesh)
    assert spec == P(None, "expert", None, "tensor")
    with pytest.raises(ShardingError, match=r"w: dim 1 \('experts', size 6\) does not divide over mesh axes"):
        logical_spec(("layers", "experts"), (2, 6), mesh, what="w")
    with pytest.raises(ShardingError, match="both map to mesh axis 'tensor'"):
        logical_spec(("heads", "mlp"), (4, 4), mesh)
    with pytest.raises(ShardingError, match="has no rule"):
        logical_spec(("embed",), (4,), mesh, strategy={"vocab": "tensor"})


def test_full_k25_shardings_divide_on_target_meshes():
    model = abstract_model(k25())
    devices = np.array(jax.devices() * 8)[:64]  # abstract check: device identity does not matter for specs
    for sizes, strategy in [({"expert": 8, "tensor": 8}, "inference"), ({"fsdp": 8, "expert": 8}, "train")]:
        mesh = jax.sharding.Mesh(
            devices.reshape(1, sizes.get("fsdp", 1), sizes["expert"], sizes.get("tensor", 1)),
            ("data", "fsdp", "expert", "tensor"),
        )
        shardings = state_shardings(model, mesh, strategy)
        flat = dict(nnx.to_flat_state(shardings))
        experts = flat[("text", "moe_layers", "mlp", "experts", "gate_proj", "packed")].get_value()
        assert experts.spec[1] == "expert"


def test_sharded_tiny_model_matches_single_device():
    # expert width 64 = 2 INT4 groups, so the down projection's K splits over tensor=2
    model = build_model(text_variant(tiny(), moe_intermediate_size=64), RunConfig(compute_dtype=jnp.float32))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 8)))
    ref = np.asarray(model(ids))
    mesh = make_mesh(expert=4, tensor=2)
    placed = shard_model(model, mesh)
    gate = placed.text.moe_layers.mlp.experts.gate_proj.packed.get_value()
    assert gate.sharding.spec[1] == "expert"
    assert {s.data.shape[1] for s in gate.addressable_shards} == {2}  # 8 experts / 4
    with jax.set_mesh(mesh):
        out = np.asarray(nnx.jit(lambda m, x: m(x))(placed, ids))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
