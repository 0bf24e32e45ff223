"""Bad input to ``k25jax convert`` / ``export`` / ``inspect``: one line on stderr naming the file and tensor, exit
status 2, and nothing left behind that looks complete."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from k25jax.checkpoint import CHECKPOINT_MARKER
from k25jax.cli import main

import configs
import oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD2 = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(cfg, release tensors, a pristine release directory)."""
    cfg = configs.grouped()
    hf = oracle.make_hf_kimi_model(cfg, seed=31)
    tensors = oracle.release_tensors(hf, cfg)
    path = oracle.write_release(tensors, cfg, tmp_path_factory.mktemp("errors") / "release", num_shards=3)
    return cfg, tensors, path


def _copy(good, tmp_path) -> str:
    return shutil.copytree(good[2], tmp_path / "release")


def _convert_fails(tmp_path, release, capsys) -> str:
    dst = tmp_path / "ckpt"
    assert main(["convert", str(release), str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("k25jax convert: error: "), err
    assert not dst.exists()  # nothing looks complete
    assert not any(CHECKPOINT_MARKER in files for _, _, files in os.walk(tmp_path))
    return lines[0]


def _edit_config(path, edit) -> None:
    conf_path = os.path.join(path, "config.json")
    with open(conf_path) as f:
        conf = json.load(f)
    edit(conf)
    with open(conf_path, "w") as f:
        json.dump(conf, f)


def test_missing_shard(good, tmp_path, capsys):
    release = _copy(good, tmp_path)
    os.remove(os.path.join(release, SHARD2))
    err = _convert_fails(tmp_path, release, capsys)
    assert f"{release}/{SHARD2}: shard file named in model.safetensors.index.json is missing" in err


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncate", r"truncated: header describes \d+ bytes of tensor data, file holds \d+"),
        ("header", r"unreadable safetensors header"),
        ("length", r"unreadable safetensors header"),
    ],
)
def test_corrupt_shard(good, tmp_path, capsys, damage, expected):
    release = _copy(good, tmp_path)
    shard = os.path.join(release, SHARD2)
    data = open(shard, "rb").read()
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "header":
        data = data[:8] + b"{garbage" + data[16:]
    else:
        data = (10**12).to_bytes(8, "little") + data[8:]
    open(shard, "wb").write(data)
    err = _convert_fails(tmp_path, release, capsys)
    assert f"{shard}: " in err and re.search(expected, err), err


def test_index_names_absent_tensor(good, tmp_path, capsys):
    release = _copy(good, tmp_path)
    index_path = os.path.join(release, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["language_model.model.layers.1.mlp.experts.9.up_proj.weight_packed"] = SHARD2
    json.dump(index, open(index_path, "w"))
    err = _convert_fails(tmp_path, release, capsys)
    assert (
        f"{index_path}: tensor language_model.model.layers.1.mlp.experts.9.up_proj.weight_packed is mapped to "
        f"{SHARD2} but that file does not hold it" in err
    )


def _write_modified(good, tmp_path, changes: dict) -> str:
    cfg, tensors, _ = good
    return oracle.write_release({**tensors, **changes}, cfg, tmp_path / "release", num_shards=3)


def test_shape_disagrees_with_config(good, tmp_path, capsys):
    name = "language_model.model.layers.2.self_attn.q_b_proj.weight"
    release = _write_modified(good, tmp_path, {name: good[1][name][:-4].contiguous()})
    err = _convert_fails(tmp_path, release, capsys)
    assert f"tensor {name} has shape [92, 48], expected [96, 48] from config.json" in err
    assert ".safetensors: tensor" in err


def test_config_disagrees_with_tensors(good, tmp_path, capsys):
    release = _copy(good, tmp_path)
    _edit_config(release, lambda c: c["text_config"].update(moe_intermediate_size=64))
    err = _convert_fails(tmp_path, release, capsys)
    assert re.search(
        r"\.safetensors: tensor language_model\.\S+ has shape \[\d+, \d+\], expected \[\d+, \d+\] from config\.json$",
        err,
    )


def test_dtype_disagrees(good, tmp_path, capsys):
    """Integer data stored as float (or the reverse) is an error naming the file and tensor."""
    name = "language_model.model.layers.1.mlp.experts.2.gate_proj.weight_packed"
    release = _write_modified(good, tmp_path, {name: good[1][name].to(torch.float32)})
    err = _convert_fails(tmp_path, release, capsys)
    assert re.search(r"\.safetensors: tensor " + re.escape(name) + " has dtype F32, expected I32$", err), err


def test_other_float_dtypes_are_cast_as_the_loader_casts(good, tmp_path):
    """A BF16 correction bias (release: F32) converts silently; an F32 norm (release: BF16) is rounded with one
    warning naming it: the checkpoint holds exactly what loading the release directly gives."""
    import warnings

    import convert_helpers as helpers

    from convert.to_orbax import convert_release
    from k25jax import load_model
    from k25jax.release.reader import ReleaseCastWarning, ReleaseReader

    bias = "language_model.model.layers.1.mlp.gate.e_score_correction_bias"
    norm = "language_model.model.layers.2.post_attention_layernorm.weight"
    tensors = good[1]
    assert torch.count_nonzero(tensors[bias]) == tensors[bias].numel()
    changes = {bias: tensors[bias].to(torch.bfloat16), norm: tensors[norm].float() + 2.0**-12}
    release = _write_modified(good, tmp_path, changes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_release(release, tmp_path / "ckpt", progress=False)
        direct = load_model(release, progress=False)
    casts = [w for w in caught if issubclass(w.category, ReleaseCastWarning)]
    assert len(casts) == 2  # one from the converter, one from the direct load
    file = ReleaseReader(release).tensors[norm].file
    for w in casts:
        assert f"{file}: tensor {norm} (F32 -> BF16)" in str(w.message) and bias not in str(w.message)
    restored = load_model(tmp_path / "ckpt")
    helpers.assert_same_params(restored, direct)
    got = np.asarray(restored.text.moe_layers.mlp.correction_bias[...])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[0], tensors[bias].to(torch.bfloat16).float().numpy())
    got_norm = np.asarray(restored.text.moe_layers.post_attn_norm.weight[...][1], np.float32)
    assert not np.array_equal(changes[norm].numpy(), tensors[norm].float().numpy())
    np.testing.assert_array_equal(got_norm, tensors[norm].float().numpy())  # rounded back onto the bf16 grid


def test_weight_shape_values_disagree(good, tmp_path, capsys):
    """Caught only when the data is read, mid-conversion: DST is not created, DST.partial says it is partial."""
    name = "language_model.model.layers.2.mlp.experts.6.down_proj.weight_shape"
    release = _write_modified(good, tmp_path, {name: torch.tensor([64, 16], dtype=torch.int32)})
    err = _convert_fails(tmp_path, release, capsys)
    assert ".safetensors: tensor " + name + " holds [64, 16], expected [64, 32]" in err
    assert os.path.isdir(tmp_path / "ckpt.partial")


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("format", "float-quantized", "quantization_config.format: only 'pack-quantized' is supported"),
        ("group_size", 16, "quantization_config group_size 16 is not supported"),
        ("num_bits", 8, "only symmetric 4-bit weights are supported"),
    ],
)
def test_unsupported_quantization(good, tmp_path, capsys, field, value, expected):
    release = _copy(good, tmp_path)

    def edit(conf):
        q = conf["quantization_config"]
        if field == "format":
            q["format"] = value
        else:
            q["config_groups"]["group_0"]["weights"][field] = value
        conf["text_config"]["quantization_config"] = q

    _edit_config(release, edit)
    err = _convert_fails(tmp_path, release, capsys)
    assert f"{release}/config.json: " in err and expected in err, err


def test_missing_config(good, tmp_path, capsys):
    release = _copy(good, tmp_path)
    os.remove(os.path.join(release, "config.json"))
    assert f"{release}/config.json: config.json not found" in _convert_fails(tmp_path, release, capsys)


def test_cli_process_exit_status(good, tmp_path):
    """The installed entry point, as a process: status 2 and the one-line message."""
    release = _copy(good, tmp_path)
    os.remove(os.path.join(release, SHARD2))
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "k25jax.cli", "convert", str(release), str(tmp_path / "ckpt")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("k25jax convert: error: ")
    assert SHARD2 in result.stderr and "Traceback" not in result.stderr


def test_export_errors(good, tmp_path, capsys):
    assert main(["export", good[2], str(tmp_path / "out")]) == 2
    assert f"k25jax export: error: {good[2]}: not a complete k25jax checkpoint" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    assert main(["convert", good[2], str(ckpt), "--quiet"]) == 0
    capsys.readouterr()
    _edit_config(ckpt, lambda c: c["text_config"].update(vocab_size=1344))
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"k25jax export: error: {ckpt}/text.embed_tokens: array is bfloat16[1280, 64], "
        "config.json implies bfloat16[1344, 64]"
    )
    assert not (tmp_path / "out").exists()


def test_inspect_errors(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    assert main(["inspect", str(tmp_path / "junk")]) == 2
    assert "neither a release" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "absent")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_load_model_reports_bad_release(good, tmp_path):
    """``load_model`` on a mesh goes through the same checks."""
    from k25jax import load_model
    from k25jax.release.reader import ReleaseError
    from k25jax.sharding import make_mesh

    release = _copy(good, tmp_path)
    os.remove(os.path.join(release, SHARD2))
    with pytest.raises(ReleaseError, match="shard file named in model.safetensors.index.json is missing"):
        load_model(release, mesh=make_mesh(expert=8))
