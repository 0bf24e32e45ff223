"""Video preprocessing: frame sampling (at most 2 fps), 4-frame chunks, per-frame patch budget 4,096.

A video becomes several media items, one per chunk of up to 4 sampled frames (``grid_thw`` row
``(t, h, w)``, ``t`` = frames in the chunk): the tower attends across the chunk's frames jointly and the
merge averages them. The text announces each chunk with its first frame's time (:func:`video_prompt`).

Frames come from a list (``PIL.Image`` / ``uint8`` arrays with their timestamps in seconds) or, with the
optional ``video`` extra (PyAV), from a video file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from k25jax.vision.preprocess import (
    CHUNK_FRAMES,
    MAX_PATCHES_PER_SIDE,
    MERGE_SIZE,
    PATCH_SIZE,
    VIDEO_FPS,
    VIDEO_MAX_PATCHES_PER_FRAME,
    MediaError,
    _pixels,
    format_timestamp,
    load_image,
    patchify,
    resize_target,
    video_prompt,
)


class VideoInput(NamedTuple):
    """A preprocessed video: one media item per chunk.

    pixel_values: float32 ``[P, 3, ps, ps]`` (chunks in order; frames, rows, columns within a chunk).
    grid_thw: int64 ``[num_chunks, 3]``. timestamps: ``HH:MM:SS.mmm`` of each chunk's first frame.
    """

    pixel_values: np.ndarray
    grid_thw: np.ndarray
    timestamps: list[str]

    @property
    def prompt(self) -> str:
        """The video's text (one ``<|media_pad|>`` per chunk, expanded later with ``expand_media_pads``)."""
        return video_prompt(self.timestamps)


class FrameSampler:
    """Keeps at most ``fps`` frames per second of a stream of increasing frame times (all when fps is None).

    A frame is kept when it is the first at or after the next tick of a ``1/fps`` grid: the kept frames are
    the first ones at or after ``0, 1/fps, 2/fps, ...``.
    """

    EPS = 1e-6  # decoded times are floats: 15/30 s must count as the 0.5 s tick

    def __init__(self, fps: float | None):
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.next_tick = -math.inf

    def take(self, t: float) -> bool:
        if self.fps is None:
            return True
        if t < self.next_tick - self.EPS:
            return False
        self.next_tick = (math.floor(t * self.fps + self.EPS) + 1) / self.fps
        return True


def sample_frames(times: Sequence[float], fps: float | None) -> list[int]:
    """Indices of the frames :class:`FrameSampler` keeps."""
    sampler = FrameSampler(fps)
    return [i for i, t in enumerate(times) if sampler.take(t)]


def _open_video(what: str):
    """``(av, container)`` for a video file holding a video stream, or a :class:`MediaError` naming the file."""
    try:
        import av
    except ImportError:
        raise MediaError(f"{what}: reading video files needs PyAV: pip install 'k25jax[video]'") from None
    if not os.path.isfile(what):
        raise MediaError(f"{what}: no such video file")
    try:
        container = av.open(what)
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaError(f"{what}: not a readable video ({err})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{what}: the file holds no video stream")
    return av, container


def probe_video(path: str | os.PathLike) -> None:
    """Check that ``path`` is a readable video with a video stream (headers only, nothing decoded)."""
    _open_video(os.fspath(path))[1].close()


def read_video(path: str | os.PathLike, fps: float | None = VIDEO_FPS) -> tuple[list[Image.Image], list[float]]:
    """Decode a video file with PyAV, keeping at most ``fps`` frames per second.

    Returns RGB frames and their times in seconds from the stream's start. Needs the ``video`` extra.
    """
    what = os.fspath(path)
    av, container = _open_video(what)
    frames: list[Image.Image] = []
    times: list[float] = []
    with container:
        stream = container.streams.video[0]
        base = stream.time_base
        start = float(stream.start_time * base) if stream.start_time is not None and base is not None else 0.0
        rate = float(stream.average_rate) if stream.average_rate else None
        sampler = FrameSampler(fps)
        index = 0
        try:
            for frame in container.decode(stream):
                t = frame.time
                if t is None:
                    if rate is None:
                        raise MediaError(f"{what}: frame {index} has no timestamp and the stream no frame rate")
                    t = index / rate
                else:
                    t = t - start
                index += 1
                if not sampler.take(t):
                    continue
                frames.append(frame.to_image())
                times.append(max(0.0, float(t)))
        except av.FFmpegError as err:
            raise MediaError(f"{what}: corrupt video data after {index} frames ({err})") from None
    if not frames:
        raise MediaError(f"{what}: no decodable video frames")
    return frames, times


def preprocess_video(
    video,
    timestamps: Sequence[float] | None = None,
    *,
    fps: float | None = VIDEO_FPS,
    chunk_frames: int = CHUNK_FRAMES,
    max_patches_per_frame: int = VIDEO_MAX_PATCHES_PER_FRAME,
    max_patches_per_side: int = MAX_PATCHES_PER_SIDE,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> VideoInput:
    """A video -> :class:`VideoInput` (``pixel_values``, ``grid_thw``, per-chunk ``timestamps``).

    Args:
      video: a video file path (needs the ``video`` extra), or a sequence of frames (``PIL.Image``, uint8
        arrays, image paths or bytes) of one size.
      timestamps: seconds of each frame, increasing; required with a frame sequence, not with a file.
      fps: at most this many frames per second are kept (None keeps every given frame).
      chunk_frames: frames per chunk (the last chunk may hold fewer).
      max_patches_per_frame: patch budget of each frame (resize rule as for images).
    """
    if isinstance(video, (str, os.PathLike)):
        if timestamps is not None:
            raise ValueError("timestamps are read from the video file; pass them only with a list of frames")
        frames, times = read_video(video, fps)
        what = os.fspath(video)
    else:
        frames, times, what = _frame_list(video, timestamps, fps)
    if not 1 <= chunk_frames:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    size = frames[0].size
    for i, frame in enumerate(frames):
        if frame.size != size:
            raise MediaError(f"{what}: frame {i} is {frame.width}x{frame.height} but frame 0 is {size[0]}x{size[1]}")
    target = resize_target(
        size[0],
        size[1],
        max_patches=max_patches_per_frame,
        max_patches_per_side=max_patches_per_side,
        patch_size=patch_size,
        merge_size=merge_size,
    )
    _, (pad_w, pad_h) = target
    pixel_values, grid, stamps = [], [], []
    for start in range(0, len(frames), chunk_frames):
        chunk = np.stack([_pixels(f, target) for f in frames[start : start + chunk_frames]])
        pixel_values.append(patchify(chunk, patch_size))
        grid.append([len(chunk), pad_h // patch_size, pad_w // patch_size])
        stamps.append(format_timestamp(times[start]))
    return VideoInput(np.concatenate(pixel_values), np.asarray(grid, np.int64), stamps)


def _frame_list(video, timestamps, fps) -> tuple[list[Image.Image], list[float], str]:
    what = "video frames"
    if isinstance(video, (Image.Image, np.ndarray)) and not (isinstance(video, np.ndarray) and video.ndim == 4):
        raise MediaError(f"{what}: expected a sequence of frames or a video file path, got one {type(video).__name__}")
    if not isinstance(video, (Sequence, np.ndarray)) or isinstance(video, (bytes, bytearray)):
        raise MediaError(f"{what}: unsupported video type {type(video).__name__} (a file path or a list of frames)")
    if len(video) == 0:
        raise MediaError(f"{what}: no frames given")
    if timestamps is None:
        raise ValueError(f"{what}: a list of frames needs timestamps (seconds of each frame)")
    times = [float(t) for t in timestamps]
    if len(times) != len(video):
        raise ValueError(f"{what}: {len(video)} frames but {len(times)} timestamps")
    for i, t in enumerate(times):
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"{what}: timestamp {i} is {t}; timestamps are seconds >= 0")
        if i and t <= times[i - 1]:
            raise ValueError(f"{what}: timestamps must increase, but timestamp {i} ({t}) <= timestamp {i - 1}")
    keep = sample_frames(times, fps)
    frames = [load_image(video[i], what=f"{what}: frame {i}") for i in keep]
    return frames, [times[i] for i in keep], what
