"""Media attached to prompts: the packed vision inputs of one prompt, and chat content parts -> those inputs.

A prompt's media is one :class:`Media`: ``pixel_values [P, 3, 14, 14]`` and ``grid_thw [N, 3]`` of its images
and video chunks, packed in the order their ``<|media_pad|>`` runs appear in the prompt's token ids (each run
``(h/2)*(w/2)`` pads long). :func:`as_media` accepts the forms callers have at hand; :func:`load_part` turns
one chat content part (``image``, ``image_url``, ``video``, ``video_url``) into preprocessed inputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from k25jax.vision.preprocess import (
    IMAGE_MAX_PATCHES,
    VIDEO_FPS,
    VIDEO_MAX_PATCHES_PER_FRAME,
    MediaError,
    data_url_bytes,
    preprocess_image,
    tokens_for_grid,
)


class Media(NamedTuple):
    """The vision inputs of one prompt.

    pixel_values: float32 ``[P, 3, 14, 14]``, items concatenated in text order.
    grid_thw: int ``[N, 3]`` rows ``(t, h, w)`` in patches, one per image or video chunk.
    """

    pixel_values: np.ndarray
    grid_thw: np.ndarray

    @property
    def token_counts(self) -> list[int]:
        """``<|media_pad|>`` tokens per item: ``(h/2) * (w/2)``."""
        return tokens_for_grid(self.grid_thw)

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def num_patches(self) -> int:
        return int(sum(t * h * w for t, h, w in np.asarray(self.grid_thw).reshape(-1, 3)))


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _item(x, what: str) -> Media:
    if hasattr(x, "pixel_values") and hasattr(x, "grid_thw"):  # Media, VideoInput
        pixel_values, grid_thw = x.pixel_values, x.grid_thw
    elif isinstance(x, tuple | list) and len(x) == 2 and _is_array(x[0]):
        pixel_values, grid_thw = x
    else:
        raise ValueError(f"{what}: expected (pixel_values, grid_thw) or a VideoInput, got {type(x).__name__}")
    pixel_values = np.asarray(pixel_values)
    grid_thw = np.asarray(grid_thw).reshape(-1, 3) if np.size(grid_thw) else np.zeros((0, 3), np.int64)
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[2] != pixel_values.shape[3]:
        raise ValueError(f"{what}: pixel_values must be [P, 3, ps, ps], got shape {list(pixel_values.shape)}")
    item = Media(pixel_values, grid_thw)
    if item.num_patches != pixel_values.shape[0]:
        raise ValueError(
            f"{what}: grid_thw {grid_thw.tolist()} describes {item.num_patches} patches but pixel_values holds "
            f"{pixel_values.shape[0]}"
        )
    return item


def as_media(x, what: str = "media") -> Media | None:
    """Normalise one prompt's media: None, a ``(pixel_values, grid_thw)`` pair, a ``Media`` / ``VideoInput``,
    or a list of those (packed in order). Raises ValueError naming ``what`` for anything else."""
    if x is None:
        return None
    if (hasattr(x, "pixel_values") and hasattr(x, "grid_thw")) or (
        isinstance(x, tuple | list) and len(x) == 2 and _is_array(x[0])
    ):
        return _item(x, what)
    if isinstance(x, Sequence) and not isinstance(x, str | bytes):
        items = [_item(e, f"{what}[{k}]") for k, e in enumerate(x)]
        if not items:
            return None
        return Media(np.concatenate([m.pixel_values for m in items]), np.concatenate([m.grid_thw for m in items]))
    raise ValueError(f"{what}: expected None, (pixel_values, grid_thw), a VideoInput or a list of them")


# --------------------------------------------------------------------------------------------------------
# Chat content parts
# --------------------------------------------------------------------------------------------------------


class MediaOptions(NamedTuple):
    """Preprocessing settings for chat parts (the released processor's values by default)."""

    max_image_patches: int = IMAGE_MAX_PATCHES
    video_fps: float | None = VIDEO_FPS
    max_video_patches_per_frame: int = VIDEO_MAX_PATCHES_PER_FRAME


def _source(part: Mapping, kind: str, what: str):
    """The image / video source of a content part: the object itself, a path or the bytes of a data URL.

    Accepted: ``{"type": kind, kind: SOURCE}``, ``{"type": kind + "_url", kind + "_url": {"url": URL}}`` (or a
    bare URL string), and ``"path"`` / ``"url"`` keys. URLs: ``file://`` paths, plain paths and base64 ``data:``
    URLs (network URLs are refused: nothing is downloaded).
    """
    for key in (kind, f"{kind}_url", "path", "url"):
        if part.get(key) is not None:
            value = part[key]
            break
    else:
        raise MediaError(f"{what}: a {part.get('type')} part needs a {kind!r}, {kind + '_url'!r}, 'path' or 'url'")
    if isinstance(value, Mapping):
        if "url" not in value:
            raise MediaError(f"{what}: {kind}_url must be a string or an object with a 'url'")
        value = value["url"]
    if not isinstance(value, str):
        return value  # PIL image, array, bytes, list of frames
    if value.startswith("data:"):
        return data_url_bytes(value, what)
    if value.startswith("file://"):
        return value[len("file://") :]
    if "://" in value:
        raise MediaError(f"{what}: {value}: only local files and data URLs are read (download the file first)")
    return value


def load_part(part: Mapping, what: str, options: MediaOptions | None = None) -> tuple[Media, Any]:
    """Preprocess one image or video content part.

    Returns the part's :class:`Media` and what :func:`k25jax.chat.encode` needs to expand its placeholder: an
    image's pad count, or a video's ``[(timestamp, pad count), ...]`` per chunk. ``what`` names the part in
    errors (e.g. ``messages[1].content[0]``). Video parts may give ``timestamps`` (seconds per frame, with a
    list of frames) and ``fps`` (default ``options.video_fps``).
    """
    kind = part.get("type")
    options = options or MediaOptions()
    try:
        if kind in ("image", "image_url"):
            pixel_values, grid = preprocess_image(_source(part, "image", what), max_patches=options.max_image_patches)
            media = Media(pixel_values, grid)
            return media, media.token_counts[0]
        if kind in ("video", "video_url"):
            from k25jax.vision.video import preprocess_video

            source = _source(part, "video", what)
            video = preprocess_video(
                os.fspath(source) if isinstance(source, str) else source,
                part.get("timestamps"),
                fps=part.get("fps", options.video_fps),
                max_patches_per_frame=options.max_video_patches_per_frame,
            )
            media = Media(video.pixel_values, video.grid_thw)
            return media, list(zip(video.timestamps, media.token_counts, strict=True))
    except MediaError as err:
        text = str(err)
        raise MediaError(text if text.startswith(what) else f"{what}: {text}") from None
    except ValueError as err:  # e.g. bad timestamps
        raise MediaError(f"{what}: {err}") from None
    raise MediaError(f"{what}: not an image or video part (type {kind!r})")
