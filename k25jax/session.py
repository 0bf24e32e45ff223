"""A conversation whose latent cache persists across calls: each call runs only the part of the prompt the
cache does not already hold.

A multi-turn chat re-renders the whole conversation every turn. The new prompt shares a prefix with what the
cache holds (the previous prompt and reply). A :class:`Session` is a one-slot :class:`k25jax.serve.engine.Engine`
whose prefix reuse works token by token (block size 1): the slot keeps the common prefix and only the rest
runs, in the absorbed form over the cache. Media placeholders are compared by the content of their image or
video chunk (two images of one size have the same pad ids but not the same features), and a prefix that
would end inside a media item's pad run is cut back to the run's start, so the vision tower only ever sees
whole items.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from k25jax.cache import LatentCache
from k25jax.sampling import THINKING, Sampling, request_sampling
from k25jax.serve.engine import Engine, EngineError, bucket
from k25jax.serve.steps import text_model


class Session:
    """One sequence generated turn after turn over a persistent latent cache.

    ``session.stream(ids, media)`` / ``session.generate(ids, media)`` take the whole prompt each time (as
    :func:`k25jax.chat.prepare` gives it) and reuse the cached common prefix; ``reused`` says how many prompt
    tokens the last call took from the cache. Results equal :func:`k25jax.generate` on the same prompt (the
    reused part ran in another form, so float rounding differs at the ~1e-7 relative level). The cache starts
    at the first call's prompt plus ``max_new_tokens`` (a power of two, at least 128) and grows, keeping its
    contents, up to ``max_context``.
    """

    def __init__(self, model, *, max_context: int | None = None, cache_dtype=None, prefill_chunk: int = 512):
        self.model = model
        self.text = text_model(model)
        self.max_context = int(max_context or self.text.cfg.max_position_embeddings)
        self.cache_dtype = cache_dtype
        self.prefill_chunk = prefill_chunk
        self.reset()

    def reset(self) -> None:
        """Forget the cached conversation (frees the cache)."""
        self.engine: Engine | None = None
        self.reused = 0

    @property
    def cache(self) -> LatentCache | None:
        """The latent cache (one row), or None before the first call."""
        return None if self.engine is None else self.engine.cache

    @property
    def keys(self) -> list:
        """Per cached slot: the token id, or ``(pad id, item digest, offset)`` for a media pad."""
        return [] if self.engine is None else self.engine.index.keys[0]

    def stream(
        self,
        ids: Sequence[int],
        media=None,
        sampling: Sampling | None = None,
        *,
        max_new_tokens: int = 256,
        temperature: float = THINKING.temperature,
        top_p: float = THINKING.top_p,
        top_k: int = 0,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
    ) -> Iterator[int]:
        """Yield the new tokens for the prompt ``ids`` (with ``media``: anything ``k25jax.media.as_media``
        takes), stop token included. Arguments as :func:`k25jax.generate`."""
        ids = list(ids)
        if len(ids) >= self.max_context:
            raise EngineError(
                f"session: the prompt has {len(ids)} tokens, leaving no room in max_context {self.max_context}"
            )
        if max_new_tokens <= 0:
            return
        sampling = request_sampling(
            sampling, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_token_ids=stop_token_ids
        )
        need = min(self.max_context, bucket(len(ids) + max_new_tokens, 128))
        if self.engine is None:
            self.engine = Engine(
                self.model,
                max_slots=1,
                max_context=need,
                cache_dtype=self.cache_dtype,
                prefill_chunk=self.prefill_chunk,
                prefill_budget=None,
                block_size=1,
            )
        self.engine.grow(need)
        try:
            request = self.engine.submit(ids, sampling, media=media, max_tokens=max_new_tokens)
        except ValueError as err:
            raise type(err)(str(err).replace(f"request {self.engine._last_id}", "session: the prompt", 1)) from None
        sent = 0
        try:
            while not request.finished:
                self.engine.step()
                self.reused = request.cached_tokens
                while sent < len(request.tokens):
                    sent += 1
                    yield request.tokens[sent - 1]
        finally:
            if not request.finished:
                self.engine.cancel(request)
            self.engine.step()  # frees the slot: its row keeps the prompt and the tokens fed back

    def generate(self, ids: Sequence[int], media=None, **kw) -> list[int]:
        """The new tokens of :meth:`stream` as a list."""
        return list(self.stream(ids, media, **kw))
