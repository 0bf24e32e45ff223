"""MoonViT-3D vision: the encoder, the patch-merger projector, and image / video preprocessing."""

from k25jax.vision.merger import Projector
from k25jax.vision.moonvit import MoonViT, as_grid, num_merged_tokens

__all__ = ["MoonViT", "Projector", "as_grid", "num_merged_tokens"]
