"""MoonViT-3D vision: the encoder, the patch-merger projector, and image / video preprocessing."""

from k25jax.vision.merger import Projector
from k25jax.vision.moonvit import MoonViT, as_grid, num_merged_tokens
from k25jax.vision.preprocess import (
    IMAGE_PROMPT,
    VIDEO_PLACEHOLDER,
    MediaError,
    expand_media_pads,
    format_timestamp,
    image_grid,
    load_image,
    pack,
    preprocess_image,
    resize_target,
    tokens_for_grid,
    video_prompt,
)
from k25jax.vision.video import VideoInput, preprocess_video, read_video, sample_frames

__all__ = [
    "IMAGE_PROMPT",
    "VIDEO_PLACEHOLDER",
    "MediaError",
    "MoonViT",
    "Projector",
    "VideoInput",
    "as_grid",
    "expand_media_pads",
    "format_timestamp",
    "image_grid",
    "load_image",
    "num_merged_tokens",
    "pack",
    "preprocess_image",
    "preprocess_video",
    "read_video",
    "resize_target",
    "sample_frames",
    "tokens_for_grid",
    "video_prompt",
]
