"""A QAT fine-tune's exported release against transformers: ``Kimi_K25ForConditionalGeneration`` holding the
exported files (routed experts decoded by compressed-tensors' own ``unpack_from_int32`` and ``dequantize``, as
the oracle does; transformers' INT4 loader does not read this layout) computes k25jax's logits on them within
1e-4 relative, text and image. That the export equals the trained fake-quant forward bit for bit is
``test_finetune.test_export_equals_the_trained_forward_bitwise``."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import k25jax
from k25jax.config import RunConfig
from k25jax.release.config import from_release_config
from k25jax.train.trainer import FinetuneConfig, finetune
from k25jax.vision import expand_media_pads, pack, preprocess_image, tokens_for_grid

import oracle

pytestmark = [pytest.mark.reference, pytest.mark.slow]  # ~60 s; CI checks the shipped demo export (tests/demo)

TOL = 1e-4  # max |diff| <= TOL * max |logits| (float32 both sides; measured ~3e-7)


def _write_samples(path, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            messages = [{"role": "user", "content": f"What is {a}*{b}?"}, {"role": "assistant", "content": f"{a * b}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-step full-QAT fine-tune of the tiny preset (vision tower included), exported; both models on it."""
    root = tmp_path_factory.mktemp("qat")
    cfg = FinetuneConfig(
        model="tiny-random",
        data=_write_samples(root / "train.jsonl", 32),
        out=str(root / "run"),
        steps=3,
        batch_size=4,
        max_length=64,
        lr=3e-3,
        save_every=3,
        progress=False,
        seed=7,
        export=str(root / "export"),
    )
    summary = finetune(cfg)
    assert summary["steps"] == 3 and np.isfinite(summary["last"]["loss"])
    path = summary["export"]
    ours = k25jax.load_model(path, RunConfig(compute_dtype="float32"), progress=False)
    return path, ours, oracle.hf_model_from_release(path)


def _relative_error(ours, theirs) -> float:
    err, scale = float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())
    assert err <= TOL * scale, f"max |diff| {err:.3e} > {TOL} x max |logits| {scale:.3e}"
    print(f"relative max error {err / scale:.2e} over {ours.shape}")
    return err / scale


def test_transformers_model_holds_exactly_the_exported_files(exported):
    """The oracle's reader is the exact inverse of its writer: the release tensors of the loaded transformers model
    (experts re-packed by compressed-tensors' ``pack_to_int32``) equal the exported files bit for bit."""
    path, _, hf = exported
    files = oracle.read_release_tensors(path)
    back = oracle.release_tensors(hf, from_release_config(path))
    assert sorted(back) == sorted(files)
    differ = [k for k in files if files[k].dtype != back[k].dtype or not torch.equal(files[k], back[k])]
    assert not differ, differ[:5]
    assert any(k.endswith("experts.7.down_proj.weight_packed") for k in files)
    assert any(k.endswith("wqkv.weight") for k in files)


def test_exported_text_logits_match_transformers(exported):
    path, ours, hf = exported
    cfg = ours.cfg
    ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size - 256, (2, 80))  # past YaRN's original 64
    _relative_error(np.asarray(ours(jnp.asarray(ids))), oracle.torch_logits(hf, ids))


def test_exported_image_logits_match_transformers(exported):
    path, ours, hf = exported
    pad = ours.cfg.media_placeholder_token_id
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (150, 120, 3), dtype=np.uint8))
    pixel_values, grid = preprocess_image(image)
    n = tokens_for_grid(np.asarray(grid).reshape(-1, 3)[:1])[0]
    ids = [5, 6, *expand_media_pads([pad], grid, pad), 7, 8]
    assert len(ids) == n + 4
    packed_values, packed_grid = pack([(pixel_values, grid)])
    got = np.asarray(ours(jnp.asarray([ids]), pixel_values=packed_values, grid_thw=packed_grid))
    want = oracle.torch_logits(
        hf,
        np.asarray([ids]),
        pixel_values=torch.from_numpy(packed_values),
        image_grid_thw=torch.from_numpy(packed_grid),
    )
    _relative_error(got, want)
