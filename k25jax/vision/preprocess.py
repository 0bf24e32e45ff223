"""Image and video preprocessing with Pillow, in the reference processor's layout (architecture doc section 3).

- Image: RGB (transparency composited onto white); ``scale = min(1, sqrt(budget / (floor(H/14) floor(W/14))),
  512*14/H, 512*14/W)``, size truncated to integers, Pillow bicubic resize, zero-pad right/bottom to
  multiples of 28, normalise ``(x/255 - 0.5)/0.5``, patchify row-major into ``[h*w, 3, 14, 14]``.
  Budget 16,384 patches (1920x1080 -> 78x138 patches -> 2,691 tokens).
- Video: frames sampled at most 2 per second, chunks of 4 frames (one media item each, ``t`` = frames in
  the chunk), at most 4,096 patches per frame, each chunk announced by its first frame's time
  ``HH:MM:SS.mmm`` in the text.

Outputs are numpy: ``pixel_values`` float32 ``[P, 3, 14, 14]`` and ``grid_thw`` int64 ``[num_items, 3]``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

PATCH_SIZE = 14
MERGE_SIZE = 2
IMAGE_MAX_PATCHES = 16384
VIDEO_MAX_PATCHES_PER_FRAME = 4096
MAX_PATCHES_PER_SIDE = 512
VIDEO_FPS = 2.0
CHUNK_FRAMES = 4

MEDIA_PAD = "<|media_pad|>"
IMAGE_PROMPT = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
# The chat template's stand-in for a whole video; the processor replaces it by one prompt per chunk.
VIDEO_PLACEHOLDER = "<|kimi_k25_video_placeholder|>"


class MediaError(ValueError):
    """An image or video that cannot be read, is corrupt, or is of an unsupported kind; names the source."""


# --------------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------------


def resize_target(
    width: int,
    height: int,
    *,
    max_patches: int = IMAGE_MAX_PATCHES,
    max_patches_per_side: int = MAX_PATCHES_PER_SIDE,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((resized_w, resized_h), (padded_w, padded_h))`` in pixels for an image of ``width x height``.

    Never upscales; a side below one patch counts as one patch in the budget.
    """
    if width <= 0 or height <= 0:
        raise MediaError(f"image size {width}x{height} is empty")
    patches = max(1, height // patch_size) * max(1, width // patch_size)
    side = max_patches_per_side * patch_size
    scale = min(1.0, math.sqrt(max_patches / patches), side / height, side / width)
    new_w = min(max(1, int(width * scale)), side)
    new_h = min(max(1, int(height * scale)), side)
    unit = patch_size * merge_size
    return (new_w, new_h), (-(-new_w // unit) * unit, -(-new_h // unit) * unit)


def image_grid(width: int, height: int, **kw) -> tuple[int, int]:
    """``(h, w)`` in patches of an image of ``width x height`` pixels after preprocessing."""
    patch = kw.get("patch_size", PATCH_SIZE)
    _, (pw, ph) = resize_target(width, height, **kw)
    return ph // patch, pw // patch


def tokens_for_grid(grid_thw, merge_size: int = MERGE_SIZE) -> list[int]:
    """Text tokens each media item takes: ``(h/2) * (w/2)`` per row ``(t, h, w)`` (frames are averaged)."""
    return [int(h) // merge_size * (int(w) // merge_size) for _, h, w in np.asarray(grid_thw).reshape(-1, 3)]


# --------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<{type(source).__name__}>"


def data_url_bytes(url: str, what: str) -> bytes:
    """The bytes of a base64 ``data:<mime>;base64,<data>`` URL; whitespace in the payload is ignored (clients put
    some in: the model card writes a space after the comma). Anything else raises :class:`MediaError`."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"{what}: only base64 data URLs are supported (data:<mime>;base64,<data>)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{what}: the data URL holds invalid base64") from None


def load_image(image, *, what: str | None = None) -> Image.Image:
    """An RGB ``PIL.Image`` from a path, a base64 ``data:`` URL, encoded bytes, a ``PIL.Image`` or a ``uint8``
    array ``[H, W(, C)]``.

    Transparency is composited onto white. Unreadable, truncated or empty images raise :class:`MediaError`.
    """
    what = what or _describe(image)
    if isinstance(image, str) and image.startswith("data:"):
        image = data_url_bytes(image, what)
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise MediaError(f"{what}: no such image file")
        image = _open(lambda: Image.open(image), what)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = _open(lambda: Image.open(io.BytesIO(bytes(image))), what)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise MediaError(
                f"{what}: an image array must be uint8 [H, W] or [H, W, 1|3|4], got {image.dtype} {list(image.shape)}"
            )
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    elif not isinstance(image, Image.Image):
        raise MediaError(f"{what}: unsupported image type {type(image).__name__} (path, bytes, PIL.Image, uint8 array)")
    if image.width <= 0 or image.height <= 0:
        raise MediaError(f"{what}: image is empty ({image.width}x{image.height})")
    try:
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise MediaError(f"{what}: cannot convert image of mode {image.mode} to RGB ({err})") from None


def _open(opener, what: str) -> Image.Image:
    try:
        image = opener()
        image.load()  # decode now: a truncated or corrupt file fails here, not later
    except UnidentifiedImageError:
        raise MediaError(f"{what}: not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise MediaError(f"{what}: corrupt or unreadable image ({err})") from None
    return image


def _pixels(image: Image.Image, target: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Resize (Pillow bicubic), zero-pad right/bottom and normalise: ``[padded_h, padded_w, 3]`` float32."""
    (new_w, new_h), (pad_w, pad_h) = target
    if image.size != (new_w, new_h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = np.zeros((pad_h, pad_w, 3), np.uint8)
    canvas[:new_h, :new_w] = np.asarray(image, np.uint8)
    # Padding is black before normalisation (-1 after), as in the reference processor.
    return (canvas.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def patchify(frames: np.ndarray, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """``[t, H, W, 3]`` -> ``[t * (H/ps) * (W/ps), 3, ps, ps]``: frames, then patch rows, then columns."""
    t, H, W, C = frames.shape
    gh, gw = H // patch_size, W // patch_size
    x = frames.reshape(t, gh, patch_size, gw, patch_size, C)
    return np.ascontiguousarray(x.transpose(0, 1, 3, 5, 2, 4).reshape(t * gh * gw, C, patch_size, patch_size))


def preprocess_image(
    image,
    *,
    max_patches: int = IMAGE_MAX_PATCHES,
    max_patches_per_side: int = MAX_PATCHES_PER_SIDE,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> ``(pixel_values [h*w, 3, ps, ps] float32, grid_thw [[1, h, w]] int64)``.

    ``image``: a path, encoded bytes, a ``PIL.Image`` or a ``uint8`` array. The text takes
    ``IMAGE_PROMPT`` for it, whose ``<|media_pad|>`` expands to ``(h/2)*(w/2)`` tokens.
    """
    rgb = load_image(image)
    target = resize_target(
        rgb.width,
        rgb.height,
        max_patches=max_patches,
        max_patches_per_side=max_patches_per_side,
        patch_size=patch_size,
        merge_size=merge_size,
    )
    pixels = _pixels(rgb, target)
    grid = np.array([[1, pixels.shape[0] // patch_size, pixels.shape[1] // patch_size]], np.int64)
    return patchify(pixels[None], patch_size), grid


def pack(items: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate several ``(pixel_values, grid_thw)`` in text order into one packed pair."""
    if not items:
        raise ValueError("pack needs at least one (pixel_values, grid_thw) pair")
    return np.concatenate([p for p, _ in items]), np.concatenate([np.asarray(g).reshape(-1, 3) for _, g in items])


# --------------------------------------------------------------------------------------------------------
# Text side
# --------------------------------------------------------------------------------------------------------


def expand_pads(
    token_ids: Sequence[int], counts: Sequence[int], pad_id: int, *, counts_from: str = "counts give"
) -> list[int]:
    """Expand the i-th ``<|media_pad|>`` (``pad_id``) of ``token_ids`` to ``counts[i]`` pads: the one expansion
    rule for images and video chunks (the chat format's and the processor's).

    Raises ValueError when the pads and the counts differ in number; ``counts_from`` names where the counts came
    from in that message (``"grid_thw has"``, ``"media give"``).
    """
    ids = [int(x) for x in np.asarray(token_ids).reshape(-1)]
    counts = [int(c) for c in counts]
    found = sum(1 for x in ids if x == pad_id)
    if found != len(counts):
        raise ValueError(
            f"token ids hold {found} {MEDIA_PAD} placeholders (id {pad_id}) but {counts_from} {len(counts)} media "
            "items: give one placeholder per image or video chunk, not yet expanded"
        )
    out: list[int] = []
    item = 0
    for x in ids:
        if x == pad_id:
            out.extend([pad_id] * counts[item])
            item += 1
        else:
            out.append(x)
    return out


def expand_media_pads(token_ids: Sequence[int], grid_thw, pad_id: int, merge_size: int = MERGE_SIZE) -> list[int]:
    """Expand the i-th ``<|media_pad|>`` (``pad_id``) to the ``(h_i/2)*(w_i/2)`` tokens of media item i.

    ``token_ids``: one sequence with exactly one pad per media item (``IMAGE_PROMPT`` / ``video_prompt``).
    Raises ValueError when the pads and the ``grid_thw`` rows differ in number.
    """
    counts = tokens_for_grid(grid_thw, merge_size) if grid_thw is not None and np.size(grid_thw) else []
    return expand_pads(token_ids, counts, pad_id, counts_from="grid_thw has")


def format_timestamp(seconds: float) -> str:
    """``HH:MM:SS.mmm`` of a time in seconds, rounded to the nearest millisecond, halves up (the one rule for
    video chunk timestamps; ``k25jax.chat`` uses it too)."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"timestamp must be a finite number of seconds >= 0, got {seconds}")
    ms = math.floor(seconds * 1000 + 0.5)  # nearest millisecond (2.3 s is 2.2999... as a float)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def video_prompt(timestamps: Sequence[str | float]) -> str:
    """The text of a video: per chunk ``{HH:MM:SS.mmm}<|media_begin|>video<|media_content|><|media_pad|><|media_end|>``.

    It replaces ``VIDEO_PLACEHOLDER`` in a rendered chat; each ``<|media_pad|>`` then expands like an image's.
    ``timestamps``: each chunk's first-frame time, as ``HH:MM:SS.mmm`` text or seconds (:func:`format_timestamp`).
    """
    stamps = [ts if isinstance(ts, str) else format_timestamp(ts) for ts in timestamps]
    return "".join(f"{ts}<|media_begin|>video<|media_content|>{MEDIA_PAD}<|media_end|>" for ts in stamps)
