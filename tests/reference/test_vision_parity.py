"""Image and video parity against transformers' Kimi_K25ForConditionalGeneration, float32, via release files.

The tiny config's position table is 8x8 patches; every grid other than 8x8 forces the bicubic resample.
transformers takes images as ``pixel_values`` / ``image_grid_thw`` at ``image_token_id`` positions and video
chunks as ``pixel_values_videos`` / ``video_grid_thw`` at ``video_token_id`` positions; the K2.5 release
text uses ``<|media_pad|>`` for both, so k25jax gets one packed stream in text order, and the test maps
each video chunk's placeholder positions to transformers' video token.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from k25jax import load_model
from k25jax.config import RunConfig, tiny
from k25jax.vision import expand_media_pads, pack, preprocess_image, preprocess_video, tokens_for_grid

import oracle

pytestmark = pytest.mark.reference

TOL = 1e-5  # max |diff| <= TOL * max |logits| (float32; measured worst ~1e-6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = tiny()
    hf = oracle.make_hf_kimi_model(cfg, seed=11)
    path = oracle.write_release(oracle.release_tensors(hf, cfg), cfg, tmp_path_factory.mktemp("release"), num_shards=3)
    return cfg, hf, load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False)


def _image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _video(width, height, frames, seed):
    return preprocess_video([_image(width, height, seed + i) for i in range(frames)], list(range(frames)), fps=None)


def _run(pair, rows):
    """``rows``: per batch row, a list of text ids and media items (``("image", pv, grid)`` / ``("video", ...)``)."""
    cfg, hf, model = pair
    pad = cfg.media_placeholder_token_id
    ours_ids, theirs_ids, items = [], [], []
    for row in rows:
        ids, hf_ids = [], []
        for part in row:
            if isinstance(part, int):
                ids.append(part)
                hf_ids.append(part)
                continue
            kind, pv, grid = part
            for g in np.asarray(grid).reshape(-1, 3):  # a video is one item per chunk
                n = tokens_for_grid(g[None])[0]
                ids += expand_media_pads([pad], g[None], pad)
                hf_ids += [pad if kind == "image" else hf.config.video_token_id] * n
            items.append((kind, pv, grid))
        ours_ids.append(ids)
        theirs_ids.append(hf_ids)
    length = max(len(r) for r in ours_ids)  # right-pad shorter rows with a text token (causal: harmless)
    ours_ids = [r + [1] * (length - len(r)) for r in ours_ids]
    theirs_ids = [r + [1] * (length - len(r)) for r in theirs_ids]
    pixel_values, grid_thw = pack([(pv, g) for _, pv, g in items])
    ours = np.asarray(model(jnp.asarray(ours_ids), pixel_values=pixel_values, grid_thw=grid_thw))

    kw = {}
    for kind, key, gkey in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        chosen = [(pv, g) for k, pv, g in items if k == kind]
        if chosen:
            pv, g = pack(chosen)
            kw[key], kw[gkey] = torch.from_numpy(pv), torch.from_numpy(g)
    theirs = oracle.torch_logits(hf, np.asarray(theirs_ids), **kw)
    err, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
    assert err <= TOL * scale, f"max |diff| {err:.3e} > {TOL} x max |logits| {scale:.3e}"
    print(f"relative max error {err / scale:.2e} over {ours.shape}")
    return err / scale


def test_single_image_interpolated_position_table(pair):
    pv, grid = preprocess_image(_image(150, 150, 0))  # padded to 168x168 -> 12x12 patches, table 8x8
    assert grid.tolist() == [[1, 12, 12]]
    _run(pair, [[5, 6, ("image", pv, grid), 7]])


@pytest.mark.parametrize("size", [(300, 60), (40, 200), (100, 30)])
def test_non_square_image(pair, size):
    pv, grid = preprocess_image(_image(*size, 1))
    assert grid[0, 1] != grid[0, 2]
    _run(pair, [[9, ("image", pv, grid), 10, 11]])


def test_several_images_in_one_sequence(pair):
    a = preprocess_image(_image(112, 112, 2))  # exactly the table: no resample
    b = preprocess_image(_image(90, 180, 3))
    c = preprocess_image(_image(200, 50, 4))
    assert a[1].tolist() == [[1, 8, 8]]
    _run(pair, [[1, ("image", *a), 2, 3, ("image", *b), 4, ("image", *c), 5]])


def test_four_frame_video_chunk(pair):
    video = _video(100, 70, 4, 5)
    assert video.grid_thw.tolist() == [[4, 6, 8]]
    _run(pair, [[7, 8, ("video", video.pixel_values, video.grid_thw), 9]])


def test_images_and_video_chunks_mixed(pair):
    image_a = preprocess_image(_image(120, 70, 6))
    image_b = preprocess_image(_image(60, 140, 7))
    video = _video(80, 80, 6, 8)  # two chunks: 4 frames, then 2
    assert video.grid_thw.tolist() == [[4, 6, 6], [2, 6, 6]]
    short = preprocess_image(_image(28, 28, 9))
    row0 = [3, ("image", *image_a), 4, ("video", video.pixel_values, video.grid_thw), 5, ("image", *image_b), 6]
    _run(pair, [row0, [8, ("image", *short), 9]])


def test_oracle_release_names_match_transformers_loader(tmp_path):
    """transformers' own loader (its key renames and PermuteForRope) reads the oracle's release tensors back
    into exactly the model they came from: the oracle's vision renames and q/k row order are the release's."""
    from transformers import Kimi_K25ForConditionalGeneration

    cfg = dataclasses.replace(tiny(), quantization=None)
    hf = oracle.make_hf_kimi_model(cfg, seed=12)
    path = oracle.write_release(oracle.release_tensors(hf, cfg), cfg, tmp_path / "release", num_shards=2)
    hf.config.save_pretrained(path)  # transformers' config format; tensors stay in the release format
    loaded = Kimi_K25ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    want, got = hf.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    vision = [k for k in want if "vision_tower" in k or "mm_projector" in k]
    assert any("q_proj" in k for k in vision) and len(vision) > 30
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, differ
