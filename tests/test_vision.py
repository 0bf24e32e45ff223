"""Vision tower units: bicubic resampling vs torch, packed attention, item isolation, the multimodal merge."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from k25jax import abstract_model, build_model
from k25jax.config import RunConfig, k25, tiny
from k25jax.vision import as_grid, expand_media_pads
from k25jax.vision.attention import dense_segment_attention, segment_attention
from k25jax.vision.moonvit import bicubic_matrix, resample_position_table, segment_ids


@pytest.fixture(scope="module")
def model():
    return build_model(tiny(), RunConfig(compute_dtype=jnp.float32), seed=3)


def _pixels(grid, seed=0):
    n = sum(t * h * w for t, h, w in grid)
    return np.random.default_rng(seed).standard_normal((n, 3, 14, 14)).astype(np.float32)


@pytest.mark.parametrize("out_hw", [(5, 7), (8, 8), (12, 3), (20, 30), (1, 64)])
def test_bicubic_resample_matches_torch_interpolate(out_hw):
    table = np.random.default_rng(1).standard_normal((8, 8, 6)).astype(np.float32)
    ours = np.asarray(resample_position_table(jnp.asarray(table), *out_hw))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(table).permute(2, 0, 1)[None], size=out_hw, mode="bicubic", align_corners=False
    )[0].permute(1, 2, 0)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-5)  # float32 rounding of the weights
    # jax.image.resize is a different kernel (a = -0.5, antialias): the reason for the hand-written matrix.
    if out_hw != (8, 8):
        other = np.asarray(jax.image.resize(jnp.asarray(table), (*out_hw, 6), "bicubic"))
        assert np.abs(other - ref.numpy()).max() > 1e-3


def test_bicubic_rows_sum_to_one():
    for out_size, in_size in [(3, 64), (78, 64), (512, 64), (64, 64)]:
        np.testing.assert_allclose(bicubic_matrix(out_size, in_size).sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(bicubic_matrix(64, 64), np.eye(64, dtype=np.float32))


@pytest.mark.parametrize("lengths", [[5, 40, 3, 30], [77], [16, 16, 16, 1]])
def test_blockwise_segment_attention_matches_dense(lengths):
    rng = np.random.default_rng(2)
    P, H, K = sum(lengths), 3, 8
    q, k, v = (jnp.asarray(rng.standard_normal((P, H, K)).astype(np.float32)) for _ in range(3))
    seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths).astype(np.int32))
    dense = np.asarray(dense_segment_attention(q, k, v, seg, K**-0.5))
    blocked = np.asarray(segment_attention(q, k, v, seg, K**-0.5, block=16))
    np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=1e-6)
    # Each item equals attention over that item alone.
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = dense_segment_attention(q[sl], k[sl], v[sl], seg[sl], K**-0.5)
        np.testing.assert_allclose(dense[sl], np.asarray(alone), rtol=1e-5, atol=1e-6)
        start += n


@pytest.mark.parametrize("lengths", [[5, 40, 3, 30], [77], [16, 16, 16, 1], [3] * 20])
def test_blockwise_segment_attention_gradients_match_dense(lengths):
    """The blockwise form's own backward pass gives the dense attention's gradients (float32, 1e-5)."""
    rng = np.random.default_rng(3)
    P, H, K = sum(lengths), 2, 8
    q, k, v, w = (jnp.asarray(rng.standard_normal((P, H, K)).astype(np.float32)) for _ in range(4))
    seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths).astype(np.int32))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w)

    dense = jax.grad(loss(lambda q, k, v: dense_segment_attention(q, k, v, seg, K**-0.5)), argnums=(0, 1, 2))(q, k, v)
    blocked = jax.jit(jax.grad(loss(lambda q, k, v: segment_attention(q, k, v, seg, K**-0.5, block=16)), (0, 1, 2)))(
        q, k, v
    )
    for name, d, b in zip("qkv", dense, blocked, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(d), rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_blockwise_backward_stores_no_block_pair_probabilities():
    """The compiled gradient of the blockwise form holds no ``[nb, ..., block, block]`` buffer: the probabilities
    are recomputed in the backward pass, not stored for every block pair."""
    P, H, K, block = 512, 2, 8, 32
    q = jnp.ones((P, H, K), jnp.float32)
    seg = jnp.repeat(jnp.arange(P // 16, dtype=jnp.int32), 16)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(segment_attention(q, q, q, seg, 0.3, block=block))))
    text = grad.lower(q).compile().as_text()
    nb = P // block
    assert not re.search(rf"f32\[{nb},(\d+,)*{block},{block}\]", text), "block-pair probabilities are stored"


def test_items_do_not_attend_to_each_other(model):
    grid = ((1, 4, 6), (4, 2, 4), (1, 8, 8))
    pix = _pixels(grid)
    base = np.asarray(model.vision(pix, grid))
    changed = pix.copy()
    changed[24 : 24 + 32] += 1.0  # the video chunk only
    out = np.asarray(model.vision(changed, grid))
    first, second = 6, 6 + 2  # merged tokens of items 0 and 1
    np.testing.assert_allclose(out[:first], base[:first], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[second:], base[second:], rtol=1e-6, atol=1e-6)
    assert np.abs(out[first:second] - base[first:second]).max() > 1e-3
    # Packing does not change an item's features: item 2 alone gives the same output.
    alone = np.asarray(model.vision(pix[56:], grid[2:]))
    np.testing.assert_allclose(alone, base[second:], rtol=1e-5, atol=1e-5)


def test_small_attention_block_same_features(model):
    grid = ((1, 6, 10), (4, 4, 4))
    pix = _pixels(grid, seed=4)
    ref = np.asarray(model.vision(pix, grid))
    blocks = model.vision.blocks
    try:
        blocks.attention_block = 16  # forces the blockwise path (124 patches)
        blocked = np.asarray(model.vision(pix, grid))
    finally:
        blocks.attention_block = 1024
    np.testing.assert_allclose(blocked, ref, rtol=1e-5, atol=1e-5)


def test_multimodal_merge_places_features_in_order(model):
    cfg = model.cfg
    grid = np.array([[1, 4, 6], [1, 2, 2]])
    pix = _pixels(grid, seed=5)
    pad = cfg.media_placeholder_token_id
    ids = np.array([expand_media_pads([3, pad, 4, pad, 5], grid, pad)])
    embeds = np.asarray(model.embed_inputs(jnp.asarray(ids), pix, grid))
    features = np.asarray(model.vision_features(pix, grid))
    assert features.shape == (7, cfg.text.hidden_size)
    np.testing.assert_array_equal(embeds[0, 1:7], features[:6])
    np.testing.assert_array_equal(embeds[0, 8], features[6])
    text = np.asarray(model.text.embed(jnp.asarray(ids)))
    np.testing.assert_array_equal(embeds[0, [0, 7, 9]], text[0, [0, 7, 9]])
    # Text-only calls are unchanged.
    np.testing.assert_array_equal(
        np.asarray(model(jnp.asarray([[1, 2, 3]]))), np.asarray(model.text(jnp.asarray([[1, 2, 3]])))
    )


def test_placeholder_count_mismatch_names_both_numbers(model):
    grid = np.array([[1, 4, 6]])
    pad = model.cfg.media_placeholder_token_id
    ids = jnp.asarray([[1] + [pad] * 5 + [2]])
    with pytest.raises(ValueError, match=r"hold 5 <\|media_pad\|> placeholder tokens .* give 6 vision features"):
        model(ids, pixel_values=_pixels(grid), grid_thw=grid)


def test_jit_with_static_grid_matches_eager(model):
    grid = as_grid([[1, 4, 4], [2, 2, 4]])
    pad = model.cfg.media_placeholder_token_id
    ids = jnp.asarray([expand_media_pads([7, pad, pad, 8], grid, pad)])
    pix = jnp.asarray(_pixels(grid, seed=6))
    eager = np.asarray(model(ids, pixel_values=pix, grid_thw=grid))
    jitted = nnx.jit(lambda m, i, p: m(i, pixel_values=p, grid_thw=grid))(model, ids, pix)
    np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-5, atol=1e-5)


def test_bf16_vision_close_to_float32():
    cfg = tiny()
    m32 = build_model(cfg, RunConfig(compute_dtype=jnp.float32), seed=1)
    m16 = build_model(cfg, RunConfig(compute_dtype=jnp.bfloat16, param_dtype=jnp.float32), seed=1)
    grid = ((1, 6, 4), (4, 2, 2))
    pix = _pixels(grid, seed=7)
    a = np.asarray(m32.vision_features(pix, grid))
    b = np.asarray(m16.vision_features(pix, grid)).astype(np.float32)
    assert m16.vision_features(pix, grid).dtype == jnp.bfloat16
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


@pytest.mark.parametrize(
    "grid, match",
    [
        ([[1, 3, 4]], r"row 0 is \[1, 3, 4\]: h and w .* multiples of the merge kernel 2x2"),
        ([[1, 4, 4], [5, 2, 2]], r"row 1 is \[5, 2, 2\]: t = 5 frames exceeds .*init_pos_emb_time = 4"),
        ([[1, 4]], r"shape \[num_items, 3\]"),
        ([[0, 4, 4]], r"must be positive"),
    ],
)
def test_bad_grid_is_a_clear_error(model, grid, match):
    with pytest.raises(ValueError, match=match):
        model.vision(np.zeros((16, 3, 14, 14), np.float32), grid)


def test_pixel_values_shape_mismatch(model):
    with pytest.raises(ValueError, match=r"pixel_values has shape \[20, 3, 14, 14\] .* needs \[24, 3, 14, 14\]"):
        model.vision(np.zeros((20, 3, 14, 14), np.float32), [[1, 4, 6]])


def test_traced_grid_is_a_clear_error(model):
    with pytest.raises(ValueError, match="grid_thw must be concrete"):
        jax.jit(lambda g: as_grid(g))(jnp.asarray([[1, 2, 2]]))


def test_text_only_model_rejects_pixels():
    m = build_model(dataclasses.replace(tiny(), vision=None), RunConfig(compute_dtype=jnp.float32))
    with pytest.raises(ValueError, match="has no vision tower"):
        m(jnp.asarray([[1, 2]]), pixel_values=np.zeros((4, 3, 14, 14), np.float32), grid_thw=[[1, 2, 2]])


def test_segment_ids_follow_items():
    np.testing.assert_array_equal(np.asarray(segment_ids(((1, 2, 2), (2, 2, 2)))), [0] * 4 + [1] * 8)


def test_full_k25_vision_shapes():
    m = abstract_model(k25())
    assert m.vision.blocks.qkv_proj.shape == (27, 1152, 3, 16, 72)
    assert m.vision.blocks.mlp_in.shape == (27, 1152, 4304)
    assert m.vision.pos_emb.shape == (64, 64, 1152)
    assert m.vision.patch_proj.shape == (3, 14, 14, 1152)
    assert m.projector.in_proj.shape == (4608, 4608)
    assert m.projector.out_proj.shape == (4608, 7168)
    _, state = nnx.split(m.vision)
    for path, var in nnx.to_flat_state(state):
        if path[0] == "blocks":
            assert var.get_metadata()["out_sharding"][0] == "layers", path
