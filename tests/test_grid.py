"""INT4 grid audit (``k25jax inspect --grid``): a kimi-grid release says ``kimi``, a compressed-tensors one
``compressed-tensors``; every count equals an independent numpy count over the same files, and the fixed-point
counts equal what ``fakequant.group_scales`` recomputes from the dequantized masters."""

import json

import convert_helpers as helpers
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import k25jax
from convert.to_release import export_model
from k25jax.cli import main
from k25jax.quant import unpack_release
from k25jax.release.config import from_release_config
from k25jax.release.grid import GridAudit, audit_release, int4_expert_pairs
from k25jax.release.reader import ReleaseReader
from k25jax.train.fakequant import GRIDS, group_scales
from k25jax.train.qat import quantize_experts

import configs


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    model = k25jax.build_model(k25jax.preset("tiny"), k25jax.RunConfig(compute_dtype="float32"), seed=7)
    quantize_experts(model, "kimi")
    kimi = export_model(model, root / "kimi", progress=False)
    ct = helpers.make_release(configs.grouped(), root / "ct", seed=52)
    return {"kimi": str(kimi), "compressed-tensors": str(ct)}


def numpy_counts(path: str) -> dict:
    """The audit's counts, computed independently: unpacked values, per-group maxima, and the scales that
    ``group_scales`` (the QAT code's kimi rule) returns from float32 and from bf16 masters ``q * s``."""
    cfg = from_release_config(path)
    nibbles, group_max = np.zeros(16, np.int64), np.zeros(9, np.int64)
    fixed_f32 = fixed_bf16 = tensors = 0
    with ReleaseReader(path) as reader:
        names = [n for n in reader.tensors if ".mlp.experts." in n and n.endswith(".weight_packed")]
        for name in names:
            packed = reader.read(name)
            scale = reader.read(name.replace("weight_packed", "weight_scale"))
            out_dim, in_dim = (int(d) for d in reader.read(name.replace("weight_packed", "weight_shape")))
            q = unpack_release(packed, in_dim)  # int8 [O, I]
            nibbles += np.bincount((q.astype(np.int64) + 8).ravel(), minlength=16)
            m = np.abs(q.astype(np.int64)).reshape(out_dim, -1, 32).max(-1)
            group_max += np.bincount(m.ravel(), minlength=9)
            master = (q.astype(np.float32) * np.repeat(scale.astype(np.float32), 32, axis=-1)).T  # [I, O] = [K, N]
            want = scale.T[:, None, :]  # [K/32, 1, N]
            kimi = GRIDS["kimi"]
            fixed_f32 += int((np.asarray(group_scales(jnp.asarray(master), kimi)) == want).sum())
            master_bf16 = jnp.asarray(master).astype(jnp.bfloat16)
            fixed_bf16 += int((np.asarray(group_scales(master_bf16, kimi)) == want).sum())
            tensors += 1
    assert tensors == len(int4_expert_pairs(cfg)) > 0
    return dict(nibbles=nibbles.tolist(), group_max=group_max.tolist(), fixed_f32=fixed_f32, fixed_bf16=fixed_bf16)


@pytest.mark.parametrize("grid", ["kimi", "compressed-tensors"])
def test_audit_counts_and_verdict(releases, grid):
    path = releases[grid]
    audit = audit_release(path, progress=False)
    want = numpy_counts(path)
    print(grid, audit.as_dict())
    assert audit.verdict == grid
    assert audit.nibbles == want["nibbles"] and audit.group_max == want["group_max"]
    assert audit.fixed_f32 == want["fixed_f32"] and audit.fixed_bf16 == want["fixed_bf16"]
    cfg = from_release_config(path)
    t = cfg.text
    values = t.num_moe_layers * t.n_routed_experts * 3 * t.hidden_size * t.moe_intermediate_size
    assert audit.values == values and audit.groups == values // 32
    with ReleaseReader(path) as reader:
        assert audit.bytes == sum(reader.tensors[n].nbytes for pair in int4_expert_pairs(cfg) for n in pair)
    if grid == "kimi":
        assert audit.nibbles[0] == 0 and audit.group_max[7] == audit.nonzero_groups > 0
        assert audit.fixed_f32 == audit.groups  # the release is a fixed point of the kimi rule (float32 masters)
    else:
        assert audit.nibbles[0] > 0 and audit.group_max[8] > 0 and audit.group_max[7] > 0
        assert audit.group_max[7] + audit.group_max[8] == audit.nonzero_groups
        assert audit.fixed_f32 < audit.groups  # groups with max |q| = 8 recompute to a larger scale


def test_other_grids_are_unknown():
    """Values within [-5, 5] (another quantizer), and no INT4 tensors at all, say ``unknown``."""
    rng = np.random.default_rng(0)
    from k25jax.quant import pack_release

    audit = GridAudit()
    q = rng.integers(-5, 6, (4, 64)).astype(np.int8)
    audit.add(pack_release(q), np.full((4, 2), 0.01, ml_dtypes.bfloat16), 32)
    assert audit.verdict == "unknown" and sum(audit.group_max[6:]) == 0 and audit.nibbles[0] == 0
    assert GridAudit().verdict == "unknown"


def test_inspect_grid_cli(releases, capsys):
    for grid, path in releases.items():
        assert main(["inspect", path, "--grid", "--quiet"]) == 0
        out = capsys.readouterr().out
        audit = audit_release(path, progress=False)
        assert f"INT4 grid: {grid} ({audit.tensors:,} routed-expert tensors, {audit.values:,} values" in out
        assert f"nibble  0 (q = -8){audit.nibbles[0]:>20,}" in out
        assert f"max |q| = 7{audit.group_max[7]:>26,}" in out and f"max |q| = 8{audit.group_max[8]:>26,}" in out
        assert f"(bf16(float32(max|q| s) / 7) == s): {audit.fixed_f32:,} of {audit.groups:,} groups" in out
        assert main(["inspect", path, "--grid", "--quiet", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["grid"] == audit.as_dict()
    assert main(["inspect", releases["kimi"]]) == 0
    assert "INT4 grid" not in capsys.readouterr().out  # headers only without --grid
