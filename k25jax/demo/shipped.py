"""The model names the package resolves itself: ``tiny`` (the shipped, trained demo release) and ``tiny-random``
(the random-init ``tiny`` preset with the embedded tiny tokenizer, what the tests build)."""

from __future__ import annotations

import os

DEMO = "tiny"  # k25jax/assets/demo: trained with k25jax.demo.build, loaded by the release loader
RANDOM = "tiny-random"  # k25jax.preset("tiny") with random weights and Tokenizer.tiny()
TINY_NAMES = (DEMO, RANDOM)


def demo_dir() -> str:
    """The demo release directory inside the package (``k25jax/assets/demo``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")


def resolve(model: str | os.PathLike) -> str:
    """``model`` as a directory: ``tiny`` is the shipped demo release; anything else is returned as given.
    A package without the demo release (a source tree where it was never built) is named, with the command that
    rebuilds it."""
    model = os.fspath(model)
    if model != DEMO:
        return model
    path = demo_dir()
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path}: the demo release behind --model tiny is missing; rebuild it with python -m k25jax.demo.build "
            f"(or use --model {RANDOM} for the random-init tiny model)"
        )
    return path


MODEL_HELP = "release directory, 'tiny' (the shipped demo model) or 'tiny-random' (random-init tiny preset)"
