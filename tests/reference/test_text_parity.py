"""Text-stack parity against transformers (the oracle), float32, through release-format directories."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from k25jax import load_model
from k25jax.config import RunConfig

import configs
import oracle

pytestmark = pytest.mark.reference

TOL = 1e-5  # max |diff| <= TOL * max |logits| (float32; measured worst ~1e-6)


def _ids(cfg, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.text.vocab_size - 256, size=(batch, length))


def _check(ours, theirs):
    err = np.abs(ours - theirs).max()
    scale = np.abs(theirs).max()
    assert err <= TOL * scale, f"max |diff| {err:.3e} > {TOL} x max |logits| {scale:.3e}"
    return err / scale


@pytest.mark.parametrize("name", sorted(configs.ALL))
def test_deepseek_v3_parity(name, tmp_path):
    cfg = configs.ALL[name]()
    cfg = dataclasses.replace(cfg, vision=None, layout="deepseek_v3")
    hf = oracle.make_hf_text_model(cfg, seed=1)
    path = oracle.write_release(oracle.release_tensors(hf, cfg), cfg, tmp_path / "release", num_shards=2)
    model = load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False)
    # Longer than every config's original_max_position_embeddings, so YaRN's extrapolated range is exercised.
    ids = _ids(cfg, batch=2, length=80)
    rel = _check(np.asarray(model(jnp.asarray(ids))), oracle.torch_logits(hf, ids))
    print(f"relative max error {rel:.2e}")


def test_kimi_k25_text_path_parity(tmp_path):
    cfg = configs.grouped()
    hf = oracle.make_hf_kimi_model(cfg, seed=2)
    text_only = dataclasses.replace(cfg, vision=None)
    path = oracle.write_release(oracle.text_param_tree(hf, cfg), text_only, tmp_path / "release", num_shards=3)
    model = load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False)
    ids = _ids(cfg, batch=1, length=70, seed=3)
    rel = _check(np.asarray(model(jnp.asarray(ids))), oracle.torch_logits(hf, ids))
    print(f"relative max error {rel:.2e}")


def test_unquantized_experts_parity(tmp_path):
    cfg = dataclasses.replace(configs.deep_dense(), vision=None, quantization=None)
    hf = oracle.make_hf_text_model(cfg, seed=4)
    path = oracle.write_release(oracle.release_tensors(hf, cfg), cfg, tmp_path / "release", num_shards=2)
    model = load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False)
    ids = _ids(cfg, batch=2, length=24, seed=5)
    rel = _check(np.asarray(model(jnp.asarray(ids))), oracle.torch_logits(hf, ids))
    print(f"relative max error {rel:.2e}")


@pytest.mark.parametrize("name", ["deep_dense", "k25_like"])
@pytest.mark.parametrize("kernels", ["pallas", "pallas:gpu"])
def test_pallas_kernels_parity(kernels, name, tmp_path):
    """INT4 experts kept packed and run by the Pallas kernels, in interpret mode on CPU ("pallas" interprets the
    TPU kernel here, "pallas:gpu" the Triton one), against the oracle at the same tolerance."""
    cfg = dataclasses.replace(configs.ALL[name](), vision=None, layout="deepseek_v3")
    hf = oracle.make_hf_text_model(cfg, seed=6)
    path = oracle.write_release(oracle.release_tensors(hf, cfg), cfg, tmp_path / "release", num_shards=2)
    model = load_model(path, RunConfig(compute_dtype=jnp.float32, kernels=kernels), progress=False)
    ids = _ids(cfg, batch=2, length=40, seed=7)
    rel = _check(np.asarray(model(jnp.asarray(ids))), oracle.torch_logits(hf, ids))
    print(f"relative max error {rel:.2e}")
