"""Loading release directories: exact logits, and a clear error for every kind of bad input."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from k25jax import load_model
from k25jax.release.keymap import release_tensor_count
from k25jax.release.reader import ReleaseError

import configs
import oracle


@pytest.fixture(scope="module")
def release():
    cfg = dataclasses.replace(configs.grouped(), vision=None)
    hf = oracle.make_hf_text_model(cfg, seed=7)
    return cfg, hf, oracle.release_tensors(hf, cfg)


def _write(tmp_path, cfg, tensors, **kw):
    return oracle.write_release(tensors, cfg, tmp_path / "release", **kw)


def test_loads_release_and_matches_oracle(tmp_path, release):
    cfg, hf, tensors = release
    path = _write(tmp_path, cfg, tensors, num_shards=3)
    assert len(tensors) == release_tensor_count(cfg)
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) == 3
    model = load_model(path, compute_dtype=jnp.float32, progress=False)
    ids = np.arange(40).reshape(2, 20) * 7
    ours, theirs = np.asarray(model(jnp.asarray(ids))), oracle.torch_logits(hf, ids)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_bf16_params_by_default(tmp_path, release):
    cfg, _, tensors = release
    model = load_model(_write(tmp_path, cfg, tensors), progress=False)
    assert model.text.embed_tokens[...].dtype == jnp.bfloat16
    assert model.text.moe_layers.mlp.correction_bias[...].dtype == jnp.float32
    assert np.asarray(model(jnp.ones((1, 4), jnp.int32))).dtype == np.float32


def _expect(tmp_path, cfg, tensors, match, **kw):
    path = _write(tmp_path, cfg, tensors, **kw)
    with pytest.raises(ReleaseError, match=match):
        load_model(path, progress=False)


def test_missing_tensor(tmp_path, release):
    cfg, _, tensors = release
    t = dict(tensors)
    del t["language_model.model.layers.1.self_attn.kv_b_proj.weight"]
    _expect(tmp_path, cfg, t, r"missing tensors: language_model\.model\.layers\.1\.self_attn\.kv_b_proj\.weight")


def test_unexpected_tensor(tmp_path, release):
    cfg, _, tensors = release
    t = dict(tensors, **{"language_model.model.layers.9.mlp.gate.weight": torch.zeros(2, 2, dtype=torch.bfloat16)})
    _expect(
        tmp_path,
        cfg,
        t,
        r"unexpected tensors \(in model-0000\d-of-00002\.safetensors\): "
        r"language_model\.model\.layers\.9\.mlp\.gate\.weight",
        num_shards=2,
    )


def test_misshaped_tensor(tmp_path, release):
    cfg, _, tensors = release
    name = "language_model.model.layers.0.self_attn.o_proj.weight"
    t = dict(tensors, **{name: tensors[name][:, :-1].contiguous()})
    _expect(
        tmp_path,
        cfg,
        t,
        r"model-\d+-of-\d+\.safetensors: tensor "
        + name.replace(".", r"\.")
        + r" has shape \[64, 47\], expected \[64, 48\]",
    )


def test_mistyped_tensor(tmp_path, release):
    cfg, _, tensors = release
    name = "language_model.model.layers.2.mlp.experts.3.down_proj.weight_scale"
    t = dict(tensors, **{name: tensors[name].float()})
    _expect(tmp_path, cfg, t, name.replace(".", r"\.") + " has dtype F32, expected BF16")


def test_weight_shape_disagrees(tmp_path, release):
    cfg, _, tensors = release
    name = "language_model.model.layers.1.mlp.experts.0.up_proj.weight_shape"
    t = dict(tensors, **{name: torch.tensor([64, 32], dtype=torch.int32)})
    _expect(tmp_path, cfg, t, r"weight_shape holds \[64, 32\], expected \[32, 64\]")


def test_config_disagrees_with_tensors(tmp_path, release):
    cfg, _, tensors = release
    path = _write(tmp_path, cfg, tensors)
    conf = json.loads(open(os.path.join(path, "config.json")).read())
    conf["text_config"]["vocab_size"] += 32
    open(os.path.join(path, "config.json"), "w").write(json.dumps(conf))
    with pytest.raises(ReleaseError, match=r"embed_tokens\.weight has shape \[1280, 64\], expected \[1312, 64\]"):
        load_model(path, progress=False)


def test_missing_shard(tmp_path, release):
    cfg, _, tensors = release
    path = _write(tmp_path, cfg, tensors, num_shards=3)
    os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
    with pytest.raises(
        ReleaseError,
        match=r"model-00002-of-00003\.safetensors: shard file named in "
        r"model\.safetensors\.index\.json is missing",
    ):
        load_model(path, progress=False)


def test_index_names_absent_tensor(tmp_path, release):
    cfg, _, tensors = release
    path = _write(tmp_path, cfg, tensors, num_shards=2)
    index_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["language_model.model.layers.0.ghost.weight"] = "model-00001-of-00002.safetensors"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(
        ReleaseError,
        match=r"tensor language_model\.model\.layers\.0\.ghost\.weight is mapped to "
        r"model-00001-of-00002\.safetensors but that file does not hold it",
    ):
        load_model(path, progress=False)


@pytest.mark.parametrize("damage", ["header", "truncate"])
def test_corrupt_shard(tmp_path, release, damage):
    cfg, _, tensors = release
    path = _write(tmp_path, cfg, tensors, num_shards=2)
    shard = os.path.join(path, "model-00002-of-00002.safetensors")
    data = open(shard, "rb").read()
    if damage == "header":
        data = data[:8] + b"{not json" + data[17:]
    else:
        data = data[: len(data) // 2]
    open(shard, "wb").write(data)
    with pytest.raises(
        ReleaseError,
        match=r"model-00002-of-00002\.safetensors: (unreadable safetensors header|"
        r"truncated)",
    ):
        load_model(path, progress=False)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_model(tmp_path / "absent")


def _expert_weights(model):
    from flax import nnx

    from k25jax.moe import Experts

    return [getattr(m, n) for _, m in nnx.iter_modules(model) if isinstance(m, Experts) for n in Experts.WEIGHTS]


def test_int4_experts_stay_packed_on_device(tmp_path, release):
    """Loaded INT4 experts are the INT4 type, <= 0.57 resident bytes per expert value, bit-exact to the files."""
    from k25jax.quant import Int4Weight

    cfg, _, tensors = release
    model = load_model(_write(tmp_path, cfg, tensors), progress=False)
    weights = _expert_weights(model)
    assert len(weights) == 3 and all(isinstance(w, Int4Weight) for w in weights)
    resident = sum(a.on_device_size_in_bytes() for w in weights for a in (w.packed[...], w.scales[...]))
    values = sum(int(np.prod(w.shape)) for w in weights)
    per_value = resident / values
    print(f"resident bytes per expert parameter: {per_value:.4f} ({resident} bytes / {values} values)")
    assert per_value <= 0.57
    # layer 2 is the second MoE layer (index 1 of the stack); expert 5's down_proj, back in release form
    packed, scale = weights[2][...][1, 5].to_release()
    name = "language_model.model.layers.2.mlp.experts.5.down_proj"
    np.testing.assert_array_equal(packed, tensors[f"{name}.weight_packed"].numpy())
    np.testing.assert_array_equal(scale.astype(np.float32), tensors[f"{name}.weight_scale"].float().numpy())


def test_unquantized_release_keeps_plain_experts(tmp_path):
    from flax import nnx

    cfg = dataclasses.replace(configs.grouped(), vision=None, quantization=None)
    hf = oracle.make_hf_text_model(cfg, seed=8)
    model = load_model(_write(tmp_path, cfg, oracle.release_tensors(hf, cfg)), progress=False)
    weights = _expert_weights(model)
    assert all(isinstance(w, nnx.Param) and w[...].dtype == jnp.bfloat16 for w in weights)
