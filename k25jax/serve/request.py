"""An engine request and its result, the guided-decoding protocol, and the small helpers the engine and its
callers share (:mod:`k25jax.serve.engine`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

from k25jax.media import Media
from k25jax.sampling import Sampling
from k25jax.serve import steps
from k25jax.tokenizer import NUM_SPECIAL, special_token_id


class EngineError(ValueError):
    """A request the engine cannot take; the message names the request and the field at fault."""


class Guide(Protocol):
    """Guided decoding of one request (``k25jax.serve.guided``): a host-side grammar matcher.

    ``fill(row)`` writes the allowed next tokens into ``row`` (int32 words, bit ``v % 32`` of word ``v // 32``),
    ``advance(token)`` consumes the drawn token, ``finished()`` says the grammar is complete (the request then
    stops with ``finish_reason`` ``"stop"``). Slots with a guide decode one step per window.
    """

    def fill(self, row: np.ndarray) -> None: ...

    def advance(self, token: int) -> None: ...

    def finished(self) -> bool: ...


def default_stop_ids(model) -> tuple[int, ...]:
    """``<|im_end|>`` and ``[EOS]`` of a model (a ``K25`` names them in its config; a bare ``TextModel`` has the
    release layout, the 256 specials being the last ids of its vocabulary)."""
    cfg = getattr(model, "cfg", None)
    if hasattr(cfg, "bos_token_id"):
        return (special_token_id(cfg.bos_token_id, "<|im_end|>"), cfg.eos_token_id)
    first = steps.text_model(model).cfg.vocab_size - NUM_SPECIAL
    return (special_token_id(first, "<|im_end|>"), special_token_id(first, "[EOS]"))


def bucket(n: int, minimum: int = 16) -> int:
    """``n`` rounded up to a power of two (at least ``minimum``) so shapes, hence compilations, repeat."""
    size = minimum
    while size < n:
        size *= 2
    return size


@dataclasses.dataclass(eq=False)
class Request:
    """A request and, as the engine runs, its result.

    Attributes:
      id: the engine's number for it.
      prompt: token ids; ``media``: its images / video chunks (``k25jax.media.Media``) or None.
      sampling: its settings; ``max_tokens`` and ``stop_ids`` as resolved by the engine.
      tokens: the new tokens so far (a stop id included, a stop string's tokens included up to the one that
        completes it).
      logprobs: with ``sampling.logprobs`` set, per token ``(logprob, [(id, logprob), ...])``.
      finished / finish_reason: ``"stop"`` (a stop id or string), ``"length"`` (max_tokens or the context),
        ``"cancelled"``, ``"error"`` (``error`` says why); ``stop_reason`` is the stop id or string that ended it.
      cached_tokens: prompt tokens taken from the cache (prefix reuse).
      times: ``submitted``, ``first_token``, ``finished`` (``time.perf_counter``).
    """

    id: int
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stop_ids: tuple[int, ...]
    seed: int
    media: Media | None = None
    embeds: np.ndarray | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cached_tokens: int = 0
    times: dict = dataclasses.field(default_factory=dict)
    # engine bookkeeping
    slot: int | None = None
    keys: list = dataclasses.field(default_factory=list, repr=False)
    runs: list = dataclasses.field(default_factory=list, repr=False)
    written: int = 0  # prompt tokens in the cache row (reused + prefilled)
    suffix_embeds: jax.Array | None = dataclasses.field(default=None, repr=False)
    drawn: list[int] = dataclasses.field(default_factory=list, repr=False)  # all drawn on device (>= tokens)
    cancel_requested: bool = False
    guide: Any = dataclasses.field(default=None, repr=False)
    on_update: Callable[[Request], None] | None = dataclasses.field(default=None, repr=False)
    error: str | None = None

    @property
    def usage(self) -> dict:
        """Token counts as OpenAI reports them."""
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": len(self.tokens),
            "total_tokens": len(self.prompt) + len(self.tokens),
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
