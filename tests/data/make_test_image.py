"""Regenerate ``tests/data/pattern_45x33.png`` (the checked-in image of the preprocessing round-trip test)."""

import os

import numpy as np
from PIL import Image


def pattern() -> np.ndarray:
    """``[33, 45, 3]`` uint8: gradients plus seeded noise (odd sizes, so padding and partial patches occur)."""
    y, x = np.mgrid[0:33, 0:45]
    noise = np.random.default_rng(2025).integers(0, 32, (33, 45, 3))
    rgb = np.stack([x * 5, y * 7, (x * y) % 256], axis=-1) + noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


if __name__ == "__main__":
    Image.fromarray(pattern()).save(os.path.join(os.path.dirname(__file__), "pattern_45x33.png"), optimize=True)
