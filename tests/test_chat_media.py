"""``chat.prepare``: message lists with image and video parts -> token ids with real pad counts + packed media."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from k25jax.chat import encode, prepare
from k25jax.media import Media, MediaOptions, as_media
from k25jax.tokenizer import Tokenizer
from k25jax.vision import MediaError, preprocess_image, preprocess_video

PAD = "<|media_pad|>"
U, E, A = "<|im_user|>user<|im_middle|>", "<|im_end|>", "<|im_assistant|>assistant<|im_middle|>"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_image_sources_give_the_same_prompt(tok, tmp_path):
    """A path, file:// URL, PIL image, uint8 array, bytes and a base64 data URL of one image prepare identically."""
    image = _image(100, 60)
    path = tmp_path / "a.png"
    image.save(path)
    data_url = "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode()
    parts = [
        {"type": "image", "image": str(path)},
        {"type": "image_url", "image_url": {"url": f"file://{path}"}},
        {"type": "image_url", "image_url": data_url},
        {"type": "image_url", "image_url": data_url.replace(",", ", ", 1)},  # the model card's space after the comma
        {"type": "image", "image": image},
        {"type": "image", "image": np.asarray(image)},
        {"type": "image", "image": _png_bytes(image)},
        {"type": "image", "path": str(path)},
    ]
    pixel_values, grid = preprocess_image(image)
    assert grid.tolist() == [[1, 6, 8]]  # 100x60 -> padded 112x84 -> 8x6 patches -> 12 tokens
    for part in parts:
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]
        ids, media = prepare(messages, tok, thinking=False)
        text = tok.decode(ids)
        assert text == (
            f"{U}<|media_begin|>image<|media_content|>{PAD * 12}<|media_end|>\nWhat is it?{E}{A}<think></think>"
        ), part
        assert ids == encode(messages, tok, thinking=False, media=[12])
        np.testing.assert_array_equal(media.pixel_values, pixel_values)
        assert media.grid_thw.tolist() == grid.tolist() and media.token_counts == [12]


def test_media_packed_in_prompt_order_across_messages(tok):
    """Images and a video in several messages: items pack in the order their pad runs appear in the ids."""
    frames = [_image(80, 80, seed=10 + i) for i in range(6)]
    times = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    messages = [
        {"role": "system", "content": "Look carefully."},
        {"role": "user", "content": [{"type": "image", "image": _image(150, 150, 1)}, {"type": "text", "text": "A"}]},
        {"role": "assistant", "content": "Seen."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Now "},
                {"type": "video", "video": frames, "timestamps": times},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(_image(28, 56, 2))}},
            ],
        },
    ]
    ids, media = prepare(messages, tok)
    video = preprocess_video(frames, times)
    assert video.grid_thw.tolist() == [[4, 6, 6], [2, 6, 6]] and video.timestamps == ["00:00:00.000", "00:00:02.000"]
    # 150x150 -> 12x12 patches (36 tokens); video chunks 9 tokens each; 28x56 -> 2x4 patches (2 tokens).
    assert media.grid_thw.tolist() == [[1, 12, 12], [4, 6, 6], [2, 6, 6], [1, 4, 2]]
    assert media.token_counts == [36, 9, 9, 2]
    assert media.pixel_values.shape == (144 + 144 + 72 + 8, 3, 14, 14)
    np.testing.assert_array_equal(media.pixel_values[144:360], video.pixel_values)
    text = tok.decode(ids)
    video_open = "<|media_begin|>video<|media_content|>"
    assert text.count(PAD) == 56 == ids.count(tok.token_id(PAD))
    assert (
        f"Now 00:00:00.000{video_open}{PAD * 9}<|media_end|>00:00:02.000{video_open}{PAD * 9}<|media_end|>\n"
        f"<|media_begin|>image<|media_content|>{PAD * 2}<|media_end|>\n{E}"
    ) in text
    # Each pad run, in id order, has its item's length.
    runs = [len(r) for r in "".join("p" if t == tok.token_id(PAD) else " " for t in ids).split()]
    assert runs == media.token_counts


def test_text_only_messages_have_no_media(tok):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    ids, media = prepare(messages, tok)
    assert media is None and ids == encode(messages, tok)


def test_media_options_change_the_preprocessing(tok):
    messages = [{"role": "user", "content": [{"type": "image", "image": _image(280, 280)}]}]
    _, full = prepare(messages, tok)
    ids, small = prepare(messages, tok, media_options=MediaOptions(max_image_patches=16))
    assert full.grid_thw.tolist() == [[1, 20, 20]]
    assert small.grid_thw.tolist() == [[1, 4, 4]] and ids.count(tok.token_id(PAD)) == 4


@pytest.mark.parametrize(
    "part, message",
    [
        ({"type": "image", "image": "/no/such/file.png"}, r"messages\[0\]\.content\[1\]: /no/such/file.png: no such"),
        (
            {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}},
            r"content\[1\]: https://x.org/a.png: only",
        ),
        ({"type": "image_url", "image_url": "data:image/png;base64,@@"}, r"content\[1\]: the data URL holds invalid"),
        ({"type": "image_url", "image_url": "data:image/png,abc"}, r"content\[1\]: only base64 data URLs"),
        ({"type": "image"}, r"content\[1\]: a image part needs"),
        ({"type": "image", "image": b"not an image"}, r"content\[1\]: .*not a recognised image format"),
        ({"type": "video", "video": [np.zeros((28, 28, 3), np.uint8)]}, r"content\[1\]: .*needs timestamps"),
    ],
)
def test_bad_media_parts_are_named(tok, part, message):
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]
    with pytest.raises(MediaError, match=message):
        prepare(messages, tok)


def test_as_media_forms():
    pixel_values, grid = preprocess_image(_image(56, 28))
    one = as_media((pixel_values, grid))
    assert isinstance(one, Media) and one.num_tokens == 2 and one.num_patches == 8
    video = preprocess_video([_image(28, 28, i) for i in range(2)], [0.0, 1.0])
    both = as_media([(pixel_values, grid), video])
    assert both.grid_thw.tolist() == [[1, 2, 4], [2, 2, 2]] and both.pixel_values.shape[0] == 16
    assert as_media(None) is None and as_media([]) is None
    with pytest.raises(ValueError, match=r"media\[0\]: grid_thw \[\[1, 2, 4\]\] describes 8 patches but"):
        as_media([(pixel_values[:5], grid)], "media")
    with pytest.raises(ValueError, match=r"media: pixel_values must be \[P, 3, ps, ps\]"):
        as_media((pixel_values[:, 0], grid), "media")


def _b64(image):
    return base64.b64encode(_png_bytes(image)).decode()
