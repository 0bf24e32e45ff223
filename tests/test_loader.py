"""Loading release directories: exact logits, and a clear error for every kind of bad input."""

import dataclasses
import json
import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from k25jax import load_model
from k25jax.config import RunConfig
from k25jax.release.keymap import release_tensor_count
from k25jax.release.reader import ReleaseCastWarning, ReleaseError, ReleaseReader

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
    model = load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False)
    ids = np.arange(40).reshape(2, 20) * 7
    ours, theirs = np.asarray(model(jnp.asarray(ids))), oracle.torch_logits(hf, ids)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


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


@pytest.mark.parametrize(
    "name, stored, message",
    [  # integer data never converts to or from float: an error naming the file and tensor
        ("language_model.model.layers.2.mlp.experts.3.down_proj.weight_packed", torch.float32, "F32, expected I32"),
        ("language_model.model.layers.2.mlp.experts.3.down_proj.weight_scale", torch.int16, "I16, expected BF16"),
        ("language_model.model.layers.1.mlp.gate.e_score_correction_bias", torch.int32, "I32, expected F32"),
    ],
)
def test_mistyped_tensor(tmp_path, release, name, stored, message):
    cfg, _, tensors = release
    t = dict(tensors, **{name: tensors[name].to(stored)})
    _expect(
        tmp_path, cfg, t, r"model-\d+-of-\d+\.safetensors: tensor " + name.replace(".", r"\.") + " has dtype " + message
    )


BIASES = "e_score_correction_bias"


def _with_bias(tensors, dtype, zero=False):
    """``tensors`` with every correction bias replaced: multiples of 1/64 below 2 in magnitude (exact in bf16),
    about 6x the spread of the sigmoid scores' differences, so they change which experts are chosen."""
    gen = torch.Generator().manual_seed(3)
    out = dict(tensors)
    for name, value in tensors.items():
        if name.endswith(BIASES):
            bias = torch.round(torch.randn(value.shape, generator=gen) * 24) / 64
            out[name] = (torch.zeros_like(bias) if zero else bias).to(dtype)
    return out


def _cast_warnings(caught):
    return [w for w in caught if issubclass(w.category, ReleaseCastWarning)]


def test_bf16_correction_bias_loads_like_the_f32_one(tmp_path, release):
    """transformers' save_pretrained of a bf16 model writes the bias BF16 (the release: F32): it loads, silently
    (an exact upcast), and the logits equal those of the same release with the F32 bias, bit for bit."""
    import convert_helpers as helpers

    from k25jax.sharding import make_mesh

    cfg, _, tensors = release
    ids = jnp.asarray((np.arange(48).reshape(2, 24) * 37) % cfg.text.vocab_size)
    models, logits = {}, {}
    for label, dtype, zero in [("f32", torch.float32, False), ("bf16", torch.bfloat16, False), ("zero", None, True)]:
        path = _write(tmp_path / label, cfg, _with_bias(tensors, dtype or torch.float32, zero))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models[label] = load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False)
            if label == "bf16":  # and straight onto an expert-parallel mesh
                models["bf16 mesh"] = load_model(
                    path, RunConfig(compute_dtype=jnp.float32), progress=False, mesh=make_mesh(expert=8)
                )
        assert _cast_warnings(caught) == []
        logits[label] = np.asarray(models[label](ids))
    bias = np.asarray(models["bf16"].text.moe_layers.mlp.correction_bias[...])
    assert bias.dtype == np.float32 and np.count_nonzero(bias) >= bias.size // 2
    want = np.stack(
        [
            _with_bias(tensors, torch.float32)[f"language_model.model.layers.{i}.mlp.gate.{BIASES}"].numpy()
            for i in range(cfg.text.num_dense_layers, cfg.text.num_hidden_layers)
        ]
    )
    np.testing.assert_array_equal(bias, want)
    helpers.assert_same_params(models["bf16"], models["f32"])
    helpers.assert_same_params(models["bf16 mesh"], models["f32"])
    np.testing.assert_array_equal(logits["bf16"], logits["f32"])
    # the bias matters: without it the logits differ (so a bias dropped or zeroed on load would fail above)
    assert np.abs(logits["zero"] - logits["f32"]).max() > 1e-2 * np.abs(logits["f32"]).max()


def test_wider_float_tensors_are_rounded_with_one_warning(tmp_path, release):
    """F32 where the release uses BF16 (a norm off the bf16 grid, an INT4 scale): rounded to BF16 on load, one
    ReleaseCastWarning naming both tensors and their files, on both load paths."""
    from k25jax.sharding import make_mesh

    cfg, _, tensors = release
    norm = "language_model.model.layers.1.input_layernorm.weight"
    scale = "language_model.model.layers.2.mlp.experts.3.down_proj.weight_scale"
    off_grid = tensors[norm].float() + 2.0**-12  # below half a bf16 step near 1: rounds back to the bf16 value
    path = _write(tmp_path, cfg, dict(tensors, **{norm: off_grid, scale: tensors[scale].float()}))
    files = {n: ReleaseReader(path).tensors[n].file for n in (norm, scale)}
    for mesh in (None, make_mesh(expert=8)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False, mesh=mesh)
        [warning] = _cast_warnings(caught)
        message = str(warning.message)
        assert message.startswith(f"{path}: float tensors stored in another dtype than the release uses are rounded")
        for n in (norm, scale):
            assert f"{files[n]}: tensor {n} (F32 -> BF16)" in message
        got = np.asarray(model.text.moe_layers.input_norm.weight[...][0])  # layer 1 = the first MoE layer
        assert not np.array_equal(off_grid.numpy(), tensors[norm].float().numpy())
        np.testing.assert_array_equal(got, tensors[norm].float().numpy())
        packed, got_scale = model.text.moe_layers.mlp.experts.down_proj[...][1, 3].to_release()
        np.testing.assert_array_equal(got_scale.astype(np.float32), tensors[scale].float().numpy())


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
