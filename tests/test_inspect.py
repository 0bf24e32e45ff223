"""``k25jax inspect``: counts and bytes from headers and metadata only, agreeing with the model and the files."""

import dataclasses
import json
import os

import convert_helpers as helpers
import jax.numpy as jnp
import numpy as np
import pytest

from convert.describe import _params, inspect_path
from convert.to_orbax import convert_release
from k25jax import abstract_model, count_params
from k25jax.cli import main
from k25jax.config import RunConfig, k25
from k25jax.release.reader import ReleaseReader

import configs


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    cfg = configs.grouped()
    release = helpers.make_release(cfg, root / "release", seed=51)
    convert_release(release, root / "ckpt", progress=False)
    return cfg, release, str(root / "ckpt")


def test_inspect_release(dirs, capsys):
    cfg, release, _ = dirs
    report = inspect_path(release)
    assert sum(report["parameters"].values()) == count_params(abstract_model(cfg))
    reader = ReleaseReader(release)
    assert sum(report["bytes"].values()) == sum(t.nbytes for t in reader.tensors.values())
    words = sum(t.nbytes for n, t in reader.tensors.items() if n.endswith("weight_packed"))
    assert report["bytes"]["INT4 expert words (int32)"] == words
    assert report["problem"] is None and report["tensors"] == len(reader.tensors)
    assert main(["inspect", release]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors pack-quantized, int4 symmetric, group 32" in out
    assert f"{sum(report['parameters'].values()):,}" in out
    assert main(["inspect", release, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == report["parameters"]


def test_inspect_checkpoint(dirs):
    cfg, release, ckpt = dirs
    report = inspect_path(ckpt)
    assert report["status"] == "complete"
    assert report["parameters"] == inspect_path(release)["parameters"]
    model = abstract_model(cfg)
    from flax import nnx

    leaves = [v for _, v in nnx.to_flat_state(nnx.state(model))]
    assert report["arrays"] == len(leaves)
    assert sum(report["bytes"].values()) == sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in leaves)
    assert report["bytes"]["float32"] == cfg.text.num_moe_layers * cfg.text.n_routed_experts * 4


def test_inspect_reports_problems_without_failing(dirs, tmp_path, capsys):
    cfg, release, _ = dirs
    import shutil

    copy = shutil.copytree(release, tmp_path / "release")
    conf = json.load(open(os.path.join(copy, "config.json")))
    conf["text_config"]["num_hidden_layers"] = 4
    json.dump(conf, open(os.path.join(copy, "config.json"), "w"))
    assert main(["inspect", str(copy)]) == 1
    assert "problem:      " in capsys.readouterr().out and "missing tensors" in inspect_path(copy)["problem"]


def test_full_size_counts_without_weights():
    """K2.5's parameter count from the keymap alone equals the abstract model's (1.03T, INT4 experts unpacked)."""
    cfg = k25()
    counted = sum(_params(cfg).values())
    print(f"K2.5 parameters: {counted:,}")
    assert counted == count_params(abstract_model(cfg))
    text_only = dataclasses.replace(cfg, vision=None)
    assert sum(_params(text_only).values()) == count_params(
        abstract_model(text_only, RunConfig(compute_dtype=jnp.bfloat16))
    )


def test_inspect_grid_reads_releases_only(dirs, capsys):
    """``--grid`` on the compressed-tensors release says so; on a checkpoint it is an input error (exit 2)."""
    _, release, ckpt = dirs
    report = inspect_path(release, grid=True)
    assert report["grid"]["verdict"] == "compressed-tensors" and report["problem"] is None
    assert main(["inspect", release, "--grid", "--quiet"]) == 0
    assert "INT4 grid: compressed-tensors" in capsys.readouterr().out
    assert main(["inspect", ckpt, "--grid"]) == 2
    assert "--grid audits a release directory" in capsys.readouterr().err
