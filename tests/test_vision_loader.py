"""Loading the vision tower and projector from a tiny release directory: exact placement, clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from k25jax import load_model
from k25jax.config import RunConfig, tiny
from k25jax.release.keymap import release_tensor_count
from k25jax.release.reader import ReleaseError

import oracle


@pytest.fixture(scope="module")
def release():
    cfg = tiny()
    hf = oracle.make_hf_kimi_model(cfg, seed=21)
    return cfg, oracle.release_tensors(hf, cfg)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


def test_vision_tensors_land_in_place(tmp_path, release):
    cfg, tensors = release
    v = cfg.vision
    D, H, K = v.hidden_size, v.num_attention_heads, v.head_dim
    vision_names = [n for n in tensors if n.startswith(("vision_tower.", "mm_projector."))]
    assert len(vision_names) == 5 + 12 * v.num_hidden_layers + 6
    assert len(tensors) == release_tensor_count(cfg)
    model = load_model(
        oracle.write_release(tensors, cfg, tmp_path / "r"), RunConfig(compute_dtype=jnp.float32), progress=False
    )
    vis, proj = model.vision, model.projector

    conv = _np(tensors["vision_tower.patch_embed.proj.weight"])  # [D, 3, 14, 14]
    np.testing.assert_array_equal(np.asarray(vis.patch_proj[...]), conv.transpose(1, 2, 3, 0))
    np.testing.assert_array_equal(np.asarray(vis.pos_emb[...]), _np(tensors["vision_tower.patch_embed.pos_emb.weight"]))
    for b in range(v.num_hidden_layers):
        p = f"vision_tower.encoder.blocks.{b}."
        wqkv = _np(tensors[p + "wqkv.weight"])  # [3*H*K, D], rows (q|k|v, head, dim) with rope pairs interleaved
        ours = np.asarray(vis.blocks.qkv_proj[b])  # [D, 3, H, K]
        for s in range(3):
            for h in range(H):
                rows = wqkv[(s * H + h) * K : (s * H + h + 1) * K]
                np.testing.assert_array_equal(ours[:, s, h, :], rows.T)  # same row order: no permutation
        bias = _np(tensors[p + "wqkv.bias"])
        np.testing.assert_array_equal(np.asarray(vis.blocks.qkv_bias[b]).reshape(-1), bias)
        wo = _np(tensors[p + "wo.weight"])  # [D, H*K]
        np.testing.assert_array_equal(np.asarray(vis.blocks.out_proj[b]).reshape(H * K, D), wo.T)
        np.testing.assert_array_equal(np.asarray(vis.blocks.mlp_in[b]), _np(tensors[p + "mlp.fc0.weight"]).T)
        np.testing.assert_array_equal(np.asarray(vis.blocks.mlp_out[b]), _np(tensors[p + "mlp.fc1.weight"]).T)
        np.testing.assert_array_equal(np.asarray(vis.blocks.attn_norm.bias[b]), _np(tensors[p + "norm0.bias"]))
        np.testing.assert_array_equal(np.asarray(vis.blocks.mlp_norm.weight[b]), _np(tensors[p + "norm1.weight"]))
    np.testing.assert_array_equal(
        np.asarray(vis.final_norm.weight[...]), _np(tensors["vision_tower.encoder.final_layernorm.weight"])
    )
    np.testing.assert_array_equal(np.asarray(proj.in_proj[...]), _np(tensors["mm_projector.proj.0.weight"]).T)
    np.testing.assert_array_equal(np.asarray(proj.out_proj[...]), _np(tensors["mm_projector.proj.2.weight"]).T)
    np.testing.assert_array_equal(np.asarray(proj.norm.bias[...]), _np(tensors["mm_projector.pre_norm.bias"]))


def test_bf16_default_params(tmp_path, release):
    cfg, tensors = release
    model = load_model(oracle.write_release(tensors, cfg, tmp_path / "r"), progress=False)
    assert model.vision.blocks.qkv_proj[...].dtype == jnp.bfloat16
    assert model.projector.out_proj[...].dtype == jnp.bfloat16


def _expect(tmp_path, cfg, tensors, match):
    path = oracle.write_release(tensors, cfg, tmp_path / "bad", num_shards=2)
    with pytest.raises(ReleaseError, match=match):
        load_model(path, progress=False)


def test_missing_vision_tensor(tmp_path, release):
    cfg, tensors = release
    t = {k: v for k, v in tensors.items() if k != "vision_tower.encoder.blocks.1.wqkv.bias"}
    _expect(tmp_path, cfg, t, r"missing tensors: vision_tower\.encoder\.blocks\.1\.wqkv\.bias")


def test_release_without_vision_for_a_vision_config(tmp_path, release):
    cfg, tensors = release
    t = {k: v for k, v in tensors.items() if not k.startswith(("vision_tower.", "mm_projector."))}
    _expect(tmp_path, cfg, t, r"missing tensors: mm_projector\.pre_norm\.bias, .*\(and \d+ more\)")


def test_extra_vision_block(tmp_path, release):
    cfg, tensors = release
    t = dict(tensors, **{"vision_tower.encoder.blocks.2.wo.weight": tensors["vision_tower.encoder.blocks.1.wo.weight"]})
    _expect(tmp_path, cfg, t, r"unexpected tensors .*vision_tower\.encoder\.blocks\.2\.wo\.weight")


def test_misshaped_position_table(tmp_path, release):
    cfg, tensors = release
    name = "vision_tower.patch_embed.pos_emb.weight"
    t = dict(tensors, **{name: tensors[name][:, :-1].contiguous()})
    _expect(
        tmp_path,
        cfg,
        t,
        r"tensor vision_tower\.patch_embed\.pos_emb\.weight has shape \[8, 7, 32\], expected \[8, 8, 32\]",
    )


def test_mistyped_projector(tmp_path, release):
    cfg, tensors = release
    name = "mm_projector.proj.2.weight"
    t = dict(tensors, **{name: tensors[name].to(torch.int16)})  # a float stored as another float is cast instead
    _expect(tmp_path, cfg, t, r"mm_projector\.proj\.2\.weight has dtype I16, expected BF16")
