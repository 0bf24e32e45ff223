"""A conversation whose latent cache persists across calls: each call runs only the part of the prompt the
cache does not already hold.

A multi-turn chat re-renders the whole conversation every turn. The new prompt shares a prefix with what the
cache holds (the previous prompt and reply): the cache keeps those slots, its length is cut back to the
common prefix (slots are positions, so stale slots above it are never read: ``k25jax.cache.slot_mask``), and
only the rest runs, in the absorbed form over the cache. The prefix is compared token by token, media
placeholders by the content of their image or video chunk (two images of one size have the same pad ids but
not the same features); a prefix that would end inside a media item's pad run is cut back to the run's
start, so the vision tower only ever sees whole items.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax.cache import LatentCache
from k25jax.generate import (
    THINKING,
    _bucket,
    _check_prompts,
    _stop_array,
    _text_model,
    decode_steps,
    fill,
    media_embeds,
)
from k25jax.media import Media, as_media
from k25jax.sharding import mesh_of


class Session:
    """One sequence (batch 1) generated turn after turn over a persistent latent cache.

    ``session.stream(ids, media)`` / ``session.generate(ids, media)`` take the whole prompt each time (as
    :func:`k25jax.chat.prepare` gives it) and reuse the cached common prefix; ``reused`` says how many prompt
    tokens the last call took from the cache. Results equal :func:`k25jax.generate` on the same prompt (the
    reused part ran in another form, so float rounding differs at the ~1e-7 relative level).
    """

    def __init__(self, model, *, max_context: int | None = None, cache_dtype=None, prefill_chunk: int = 512):
        self.model = model
        self.text = _text_model(model)
        self.max_context = int(max_context or self.text.cfg.max_position_embeddings)
        self.cache_dtype = cache_dtype or self.text.run.cache
        self.chunk = _bucket(prefill_chunk)
        self.reset()

    def reset(self) -> None:
        """Forget the cached conversation (frees the cache)."""
        self.cache: LatentCache | None = None
        self.keys: list = []  # per cached slot: the token id, or (pad id, item digest, offset) for a media pad
        self.reused = 0

    def stream(
        self,
        ids: Sequence[int],
        media=None,
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
        ids = _check_prompts([ids], self.text.cfg.vocab_size)[0]
        media = as_media(media, "session: media")
        keys, runs = self._keys(ids, media)
        n = len(ids)
        if n >= self.max_context:
            raise ValueError(f"session: the prompt has {n} tokens, leaving no room in max_context {self.max_context}")
        if max_new_tokens <= 0:
            return
        reuse = 0
        limit = min(len(self.keys), n - 1)  # at least one token runs: it gives the next-token logits
        while reuse < limit and self.keys[reuse] == keys[reuse]:
            reuse += 1
        reuse = next((start for start, end, _ in runs if start < reuse < end), reuse)
        cache = self._take_cache(reuse, min(self.max_context, _bucket(n + max_new_tokens, 128)))
        self.reused = reuse

        suffix = ids[reuse:]
        T = _bucket(len(suffix)) if len(suffix) <= self.chunk else -(-len(suffix) // self.chunk) * self.chunk
        padded = np.zeros((1, T), np.int32)
        padded[0, : len(suffix)] = suffix
        items = [k for start, _, k in runs if start >= reuse]
        embeds = mask = None
        if items:
            embeds = media_embeds(self.model, padded, [_select(media, items)])
            mask = jnp.ones((1, T), bool)
        graphdef, state = nnx.split(self.text)
        logits, cache = fill(
            graphdef, state, padded, [len(suffix)], cache, embeds, mask, self.chunk, continuing=reuse > 0
        )

        out: list[int] = []

        def keep(final: LatentCache) -> None:
            self.cache = final
            self.keys = (keys + out)[: int(final.lengths[0])]

        sampling = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k))
        stop_ids = _stop_array(self.model, stop_token_ids)
        key = jax.random.key(seed)
        for step in decode_steps(graphdef, state, logits, cache, max_new_tokens, key, sampling, stop_ids, keep):
            out.append(step[0])
            yield step[0]

    def generate(self, ids: Sequence[int], media=None, **kw) -> list[int]:
        """The new tokens of :meth:`stream` as a list."""
        return list(self.stream(ids, media, **kw))

    # ----------------------------------------------------------------------------------------------------

    def _keys(self, ids: list[int], media: Media | None) -> tuple[list, list[tuple[int, int, int]]]:
        """Per-token comparison keys and the media pad runs ``(start, end, item)`` of a prompt."""
        pad = getattr(getattr(self.model, "cfg", None), "media_placeholder_token_id", None)
        keys: list = list(ids)
        runs: list[tuple[int, int, int]] = []
        if media is None:
            return keys, runs
        counts = media.token_counts
        digests = [_digest(media, k) for k in range(len(counts))]
        item, offset, start = 0, 0, 0
        for i, t in enumerate(ids):
            if t != pad or item >= len(counts):
                continue
            if offset == 0:
                start = i
            keys[i] = (t, digests[item], offset)
            offset += 1
            if offset == counts[item]:
                runs.append((start, i + 1, item))
                item, offset = item + 1, 0
        found = sum(1 for t in ids if t == pad)
        if found != media.num_tokens:
            raise ValueError(
                f"session: the prompt holds {found} <|media_pad|> tokens (id {pad}) but its media give "
                f"{media.num_tokens} vision features"
            )
        return keys, runs

    def _take_cache(self, reuse: int, slots: int) -> LatentCache:
        """The session's cache (grown to ``slots`` if smaller, keeping its contents) with ``reuse`` valid slots."""
        cache, self.cache, self.keys = self.cache, None, []  # donated below: never reuse a half-updated cache
        if cache is None or reuse == 0 and cache.max_len < slots:
            cache = LatentCache.zeros(self.text.cfg, 1, slots, self.cache_dtype, mesh=mesh_of(nnx.state(self.text)))
        elif cache.max_len < slots:
            grow = ((0, 0), (0, 0), (0, slots - cache.max_len), (0, 0))
            cache = dataclasses.replace(cache, stacks={k: jnp.pad(v, grow) for k, v in cache.stacks.items()})
        return dataclasses.replace(cache, lengths=jnp.full((1,), reuse, jnp.int32))


def _item_slices(media: Media) -> list[slice]:
    sizes = [int(t * h * w) for t, h, w in np.asarray(media.grid_thw).reshape(-1, 3)]
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True)]


def _digest(media: Media, k: int) -> str:
    patches = np.ascontiguousarray(media.pixel_values[_item_slices(media)[k]], np.float32)
    grid = np.asarray(media.grid_thw).reshape(-1, 3)[k].astype(np.int64)
    return hashlib.blake2b(grid.tobytes() + patches.tobytes(), digest_size=16).hexdigest()


def _select(media: Media, items: list[int]) -> Media:
    slices = _item_slices(media)
    grid = np.asarray(media.grid_thw).reshape(-1, 3)
    return Media(np.concatenate([media.pixel_values[slices[k]] for k in items]), grid[items])
