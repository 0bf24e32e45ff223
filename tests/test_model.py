"""Model structure: full-size K2.5 builds abstractly, parameter counts, logical axes, causality."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax import abstract_model, build_model, count_params
from k25jax.config import RunConfig, k25, tiny
from k25jax.release.keymap import release_entries, release_tensor_count
from k25jax.sharding import LOGICAL_AXES


def release_param_count(cfg) -> int:
    """Parameters implied by the released tensor list; INT4 experts count as their unpacked [out, in] weights."""
    total = 0
    for entry in release_entries(cfg):
        for src in entry.sources:
            if src.name.endswith("weight_packed"):
                total += src.shape[0] * src.shape[1] * 8
            elif not src.name.endswith(("weight_scale", "weight_shape")):
                total += int(np.prod(src.shape))
    return total


def test_full_k25_builds_abstractly():
    model = abstract_model(k25())
    assert model.text.moe_layers.mlp.experts.gate_proj.shape == (60, 384, 7168, 2048)
    assert model.text.moe_layers.attn.q_b_proj.shape == (60, 1536, 64, 192)
    assert model.text.dense_layers.mlp.gate_proj.shape == (1, 7168, 18432)
    assert count_params(model) == release_param_count(k25())
    # The release holds 208,550 tensors: 208,215 of the text stack, 335 of the vision tower and projector.
    assert release_tensor_count(k25()) == 208_550
    assert release_tensor_count(k25().replace(vision=None)) == 208_215
    assert model.vision.blocks.qkv_proj.shape == (27, 1152, 3, 16, 72)
    assert count_params(model) - count_params(abstract_model(k25().replace(vision=None))) == 471_143_920


def test_tiny_param_count_matches_release_list():
    assert count_params(abstract_model(tiny())) == release_param_count(tiny())


def test_every_param_has_known_logical_axes():
    _, state = nnx.split(abstract_model(k25()))
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == len(var.shape), path
        assert all(a is None or a in LOGICAL_AXES for a in axes), (path, axes)
        if path[1] in ("dense_layers", "moe_layers") or path[:2] == ("vision", "blocks"):
            assert axes[0] == "layers", path


def test_causal_and_float32_logits():
    model = build_model(tiny(), RunConfig(compute_dtype=jnp.float32))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 12)))
    full = np.asarray(model(ids))
    assert full.dtype == np.float32 and full.shape == (2, 12, tiny().text.vocab_size)
    changed = ids.at[:, 8:].set(5)
    partial = np.asarray(model(changed))
    np.testing.assert_allclose(partial[:, :8], full[:, :8], rtol=1e-5, atol=1e-6)
    assert np.abs(partial[:, 8:] - full[:, 8:]).max() > 1e-3


def test_bf16_compute_close_to_float32():
    m32 = build_model(tiny(), RunConfig(compute_dtype=jnp.float32))
    m16 = build_model(tiny(), RunConfig(compute_dtype=jnp.bfloat16, param_dtype=jnp.float32))
    ids = jnp.arange(16).reshape(1, 16)
    a, b = np.asarray(m32(ids)), np.asarray(m16(ids))
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_jit_matches_eager():
    model = build_model(tiny(), RunConfig(compute_dtype=jnp.float32))
    ids = jnp.arange(10).reshape(1, 10)
    eager = np.asarray(model(ids))
    jitted = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
