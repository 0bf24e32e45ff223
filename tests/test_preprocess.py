"""Image and video preprocessing: resize rule vs the reference, exact patches, video chunks, bad media."""

import ast
import importlib.util
import io
import math
import os
import sys

import numpy as np
import pytest
from data.make_test_image import pattern
from PIL import Image

from k25jax.vision import (
    MediaError,
    expand_media_pads,
    format_timestamp,
    image_grid,
    preprocess_image,
    preprocess_video,
    resize_target,
    sample_frames,
    tokens_for_grid,
    video_prompt,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
TEST_IMAGE = os.path.join(DATA, "pattern_45x33.png")


def reference_navit_resize():
    """transformers' ``navit_resize`` (the Kimi_K25 image and video processors' resize rule), taken from its
    source file: the processor modules import torchvision at import time, which this CPU environment lacks,
    and the function itself needs only ``math``."""
    origin = importlib.util.find_spec("transformers.models.kimi_k25.image_processing_kimi_k25").origin
    tree = ast.parse(open(origin).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "navit_resize")
    namespace = {"math": math}
    exec(compile(ast.Module([fn], type_ignores=[]), origin, "exec"), namespace)
    return namespace["navit_resize"]


SIZES = [  # (width, height): tiny, around one patch, common, huge, extreme aspect ratios
    (1, 1),
    (5, 3),
    (13, 14),
    (14, 14),
    (29, 27),
    (45, 33),
    (640, 480),
    (1080, 1920),
    (1920, 1080),
    (3840, 2160),
    (4000, 3000),
    (8000, 8000),
    (7168, 7168),
    (7169, 100),
    (10000, 100),
    (100, 10000),
    (30000, 14),
    (14, 30000),
    (50000, 3),
    (1793, 1793),
]


@pytest.mark.parametrize("max_patches", [16384, 4096])
def test_resize_rule_matches_reference(max_patches):
    navit = reference_navit_resize()
    for width, height in SIZES:
        (new_w, new_h), (pad_w, pad_h) = resize_target(width, height, max_patches=max_patches)
        (ref_h, ref_w), (ref_ph, ref_pw) = navit(height, width, 14, 2, max_patches, 512)
        assert (new_w, new_h, pad_w, pad_h) == (ref_w, ref_h, ref_pw, ref_ph), (width, height)
        gh, gw = pad_h // 14, pad_w // 14
        assert gh % 2 == 0 and gw % 2 == 0 and gh <= 512 and gw <= 512
        assert new_w <= width and new_h <= height  # never upscales


def test_1920x1080_gives_2691_tokens():
    assert image_grid(1920, 1080) == (78, 138)
    assert tokens_for_grid([[1, 78, 138]]) == [2691]
    assert image_grid(1, 1) == (2, 2)  # a single pixel still makes one 2x2 merged token


def test_checked_in_image_round_trips_to_expected_patches():
    raw = np.asarray(Image.open(TEST_IMAGE))
    np.testing.assert_array_equal(raw, pattern())  # the file is what tests/data/make_test_image.py makes
    pixel_values, grid = preprocess_image(TEST_IMAGE)
    assert grid.tolist() == [[1, 4, 4]] and grid.dtype == np.int64  # 45x33 -> padded 56x56, no resize
    assert pixel_values.shape == (16, 3, 14, 14) and pixel_values.dtype == np.float32
    expected = np.empty((16, 3, 14, 14), np.float32)
    for row in range(4):
        for col in range(4):
            for ch in range(3):
                for i in range(14):
                    for j in range(14):
                        y, x = row * 14 + i, col * 14 + j
                        value = int(raw[y, x, ch]) if y < 33 and x < 45 else 0
                        expected[row * 4 + col, ch, i, j] = (value / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(pixel_values, expected, rtol=0, atol=1e-6)
    # The same image as bytes, PIL image or array gives the same patches.
    for source in (open(TEST_IMAGE, "rb").read(), Image.open(TEST_IMAGE), raw):
        np.testing.assert_array_equal(preprocess_image(source)[0], pixel_values)


def test_large_image_is_resized_with_pillow_bicubic():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (700, 1000, 3), dtype=np.uint8))
    pixel_values, grid = preprocess_image(image, max_patches=100)
    (new_w, new_h), (pad_w, pad_h) = resize_target(1000, 700, max_patches=100)
    assert (new_w, new_h) == (167, 117) and grid.tolist() == [[1, pad_h // 14, pad_w // 14]]
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC)).astype(np.float32)
    canvas = np.zeros((pad_h, pad_w, 3), np.float32)
    canvas[:new_h, :new_w] = resized
    canvas = (canvas / 255.0 - 0.5) / 0.5
    first = canvas[:14, 14:28].transpose(2, 0, 1)  # patch (row 0, col 1)
    np.testing.assert_allclose(pixel_values[1], first, atol=1e-6)
    last = canvas[-14:, -14:].transpose(2, 0, 1)
    np.testing.assert_allclose(pixel_values[-1], last, atol=1e-6)


def test_transparency_composited_onto_white():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:10, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    pixel_values, _ = preprocess_image(rgba)
    np.testing.assert_allclose(pixel_values[0, :, 0, 0], [(200 / 255 - 0.5) / 0.5, -1, -1], atol=1e-6)
    np.testing.assert_allclose(pixel_values[0, :, 12, 0], [1, 1, 1], atol=1e-6)  # transparent -> white
    np.testing.assert_allclose(pixel_values[0, :, 0, 13][0], (200 / 255 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(pixel_values[1, :, 0, 7], [-1, -1, -1], atol=1e-6)  # padding (x = 21) is black


def test_expand_media_pads():
    pad = 1045
    grid = np.array([[1, 4, 6], [4, 2, 2]])
    assert expand_media_pads([1, pad, 2, pad, 3], grid, pad) == [1] + [pad] * 6 + [2, pad, 3]
    with pytest.raises(ValueError, match=r"hold 1 <\|media_pad\|> placeholders \(id 1045\) but grid_thw has 2"):
        expand_media_pads([1, pad, 2], grid, pad)
    assert expand_media_pads([1, 2], np.zeros((0, 3), np.int64), pad) == [1, 2]


def test_expand_pads_by_counts():
    """The count form ``k25jax.chat`` expands with (one rule for images and video chunks)."""
    from k25jax.vision.preprocess import expand_pads

    pad = 1045
    assert expand_pads([1, pad, 2, pad, pad], [3, 1, 2], pad) == [1, pad, pad, pad, 2, pad, pad, pad]
    with pytest.raises(ValueError, match=r"hold 2 <\|media_pad\|> placeholders \(id 1045\) but media give 1 media"):
        expand_pads([pad, pad], [4], pad, counts_from="media give")


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "00:00:00.000"),
        (2.3, "00:00:02.300"),
        (59.9999, "00:01:00.000"),
        (3725.5, "01:02:05.500"),
        (12.0625, "00:00:12.063"),  # an exact tie (12062.5 ms) rounds up, not to even
        (0.0625, "00:00:00.063"),
    ],
)
def test_format_timestamp(seconds, text):
    assert format_timestamp(seconds) == text
    block = "<|media_begin|>video<|media_content|><|media_pad|><|media_end|>"
    assert video_prompt([seconds]) == video_prompt([text]) == text + block


def test_frame_sampling_at_most_two_per_second():
    times = [i / 30 for i in range(95)]  # 30 fps, 3.17 s
    kept = sample_frames(times, 2.0)
    assert kept == [0, 15, 30, 45, 60, 75, 90]
    assert sample_frames([0.0, 0.7, 1.4, 2.1], 2.0) == [0, 1, 2, 3]  # slower than 2 fps: keep all
    assert sample_frames(times, None) == list(range(95))


def test_video_from_frames():
    frames = [np.full((70, 100, 3), 20 * i, np.uint8) for i in range(12)]
    video = preprocess_video(frames, [i / 4 for i in range(12)])  # 4 fps -> 2 fps keeps 6 frames
    assert video.grid_thw.tolist() == [[4, 6, 8], [2, 6, 8]]
    assert video.timestamps == ["00:00:00.000", "00:00:02.000"]
    assert video.pixel_values.shape == (6 * 48, 3, 14, 14)
    kept = [0, 2, 4, 6, 8, 10]
    for f, i in enumerate(kept):  # frame f of the packed patches holds frame i's colour
        np.testing.assert_allclose(video.pixel_values[f * 48, 0, 0, 0], (20 * i / 255 - 0.5) / 0.5, atol=1e-6)
    assert video.prompt == video_prompt(video.timestamps)
    assert video.prompt.count("<|media_pad|>") == 2
    assert video.prompt.startswith("00:00:00.000<|media_begin|>video<|media_content|><|media_pad|><|media_end|>")


def test_video_frame_budget_is_4096_patches():
    frames = [Image.new("RGB", (1920, 1080), (i, 0, 0)) for i in range(2)]
    video = preprocess_video(frames, [0.0, 0.5])
    _, h, w = video.grid_thw[0]
    assert (h, w) == (48, 86)  # 1196x672 after the 4096 budget, padded to 1204x672
    assert (h, w) == tuple(p // 14 for p in resize_target(1920, 1080, max_patches=4096)[1][::-1])


def _write_video(path, colours, fps=10):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for c in colours:
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), c, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_file(tmp_path):
    # 2.3 s at 10 fps; blue alternates so that a neighbouring frame can never pass for the expected one.
    colours = [(10 * i, 250 - 10 * i, 255 * (i % 2 == 0)) for i in range(23)]
    path = tmp_path / "clip.mp4"
    _write_video(path, colours)
    video = preprocess_video(path)
    assert video.grid_thw.tolist() == [[4, 4, 6], [1, 4, 6]]  # 5 frames at 2 fps: 0, 0.5, 1, 1.5, 2 s
    assert video.timestamps == ["00:00:00.000", "00:00:02.000"]
    for f, i in enumerate([0, 5, 10, 15, 20]):
        got = video.pixel_values[f * 24].mean(axis=(1, 2)) * 0.5 + 0.5  # top-left patch of frame f
        np.testing.assert_allclose(got * 255, colours[i], atol=8)  # lossy codec and yuv420p: a few levels


@pytest.mark.parametrize(
    "source, match",
    [
        ("missing.png", "no such image file"),
        (b"definitely not an image", "not a recognised image format"),
        (12, "unsupported image type int"),
        (np.zeros((4, 4, 3), np.float32), "image array must be uint8"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_bad_images(tmp_path, source, match):
    if isinstance(source, str):
        source = str(tmp_path / source)
    with pytest.raises(MediaError, match=match):
        preprocess_image(source)


def test_truncated_and_mislabelled_image_files(tmp_path):
    data = open(TEST_IMAGE, "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"truncated\.png: corrupt or unreadable image"):
        preprocess_image(truncated)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(MediaError, match=r"notes\.png: not a recognised image format"):
        preprocess_image(text)


def test_bad_videos(tmp_path, monkeypatch):
    frames = [np.zeros((28, 28, 3), np.uint8)] * 3
    with pytest.raises(ValueError, match="needs timestamps"):
        preprocess_video(frames)
    with pytest.raises(ValueError, match="3 frames but 2 timestamps"):
        preprocess_video(frames, [0, 1])
    with pytest.raises(ValueError, match=r"timestamp 2 \(0.5\) <= timestamp 1"):
        preprocess_video(frames, [0, 1, 0.5])
    with pytest.raises(MediaError, match=r"frame 1 is 30x28 but frame 0 is 28x28"):
        preprocess_video([frames[0], np.zeros((28, 30, 3), np.uint8)], [0, 1])
    with pytest.raises(MediaError, match="no frames given"):
        preprocess_video([], [])
    with pytest.raises(MediaError, match=r"frame 1: not a recognised image format"):
        preprocess_video([frames[0], b"junk"], [0, 1])
    pytest.importorskip("av")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(MediaError, match=r"junk\.mp4: not a readable video"):
        preprocess_video(junk)
    with pytest.raises(MediaError, match="no such video file"):
        preprocess_video(tmp_path / "absent.mp4")
    monkeypatch.setitem(sys.modules, "av", None)  # as if the video extra were not installed
    with pytest.raises(MediaError, match=r"needs PyAV: pip install 'k25jax\[video\]'"):
        preprocess_video(junk)


def test_png_bytes_round_trip():
    buf = io.BytesIO()
    Image.fromarray(pattern()).save(buf, format="PNG")
    np.testing.assert_array_equal(preprocess_image(buf.getvalue())[0], preprocess_image(TEST_IMAGE)[0])
