"""Prefix reuse: which engine slots hold which whole blocks of prompt tokens, and which free slot goes next.

A slot's cache row keeps its latents after its request ends, so the row is the store: no latents are copied
out. Each slot's content is described by its token keys (a token id, or ``(pad id, item digest, offset)`` for
a media placeholder, so two images of one size do not match) cut into blocks of ``block_size``; a block is
known by the hash of its keys chained with the hash of the block before it (a radix index flattened into a
dict: one hash names the whole prefix up to that block). A new prompt walks its own chain and takes the
longest prefix some slot holds:

- held by a free slot: the request takes that slot and its latents as they are;
- held by a live slot only: the request takes a free slot and the live slot's latents are copied into it;
- none: the least recently used free slot, whose old blocks are forgotten (LRU eviction).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from k25jax.media import Media


def chain(keys: Sequence, block_size: int) -> list[int]:
    """The chained hash of every whole block of ``keys``."""
    out, parent = [], 0
    for end in range(block_size, len(keys) + 1, block_size):
        parent = hash((parent, tuple(keys[end - block_size : end])))
        out.append(parent)
    return out


class PrefixIndex:
    """Block hashes of the content of ``slots`` cache rows (see the module doc)."""

    def __init__(self, slots: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"prefix block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.keys: list[list] = [[] for _ in range(slots)]  # per slot: the keys of its valid cache slots
        self.hashes: list[list[int]] = [[] for _ in range(slots)]
        self.holders: dict[int, set[int]] = {}  # block hash -> slots whose rows hold it at its place
        self.last_used = [0] * slots
        self.clock = 0

    def set_content(self, slot: int, keys: Sequence) -> None:
        """Slot ``slot``'s row now validly holds ``keys`` (its whole blocks become reusable)."""
        keys = list(keys)
        new = chain(keys, self.block_size)
        old = self.hashes[slot]
        same = 0
        while same < min(len(old), len(new)) and old[same] == new[same]:
            same += 1
        for h in old[same:]:
            self._drop(h, slot)
        for h in new[same:]:
            self.holders.setdefault(h, set()).add(slot)
        self.keys[slot], self.hashes[slot] = keys, new

    def truncate(self, slot: int, length: int) -> None:
        """Only the first ``length`` keys of slot ``slot`` stay valid (the rest is about to be overwritten)."""
        self.set_content(slot, self.keys[slot][:length])

    def touch(self, slot: int) -> None:
        self.clock += 1
        self.last_used[slot] = self.clock

    def _drop(self, h: int, slot: int) -> None:
        holders = self.holders.get(h)
        if holders is not None:
            holders.discard(slot)
            if not holders:
                del self.holders[h]

    def match(self, keys: Sequence) -> tuple[int, set[int]]:
        """``(tokens, slots)``: the longest whole-block prefix of ``keys`` some slots hold, and those slots."""
        best, slots = 0, set()
        for i, h in enumerate(chain(keys, self.block_size)):
            holders = self.holders.get(h)
            if not holders:
                break
            best, slots = (i + 1) * self.block_size, set(holders)
        return best, slots

    def choose(self, keys: Sequence, free: Sequence[int], limit: int) -> tuple[int, int, int | None]:
        """Pick a free slot for a prompt with ``keys``: ``(slot, reuse, source)``.

        ``reuse`` prompt tokens come from the cache (at most ``limit``); ``source`` is the live slot to copy
        them from, or None when ``slot`` itself holds them (or ``reuse`` is 0)."""
        if not free:
            raise ValueError("no free slot")
        tokens, holders = self.match(keys)
        tokens = min(tokens, limit)
        lru = min(free, key=lambda s: self.last_used[s])
        if tokens <= 0:
            return lru, 0, None
        own = [s for s in free if s in holders]
        if own:  # a free slot holding the prefix: the one losing the least other content, then the LRU one
            slot = min(own, key=lambda s: (len(self.keys[s]) - tokens, self.last_used[s]))
            return slot, tokens, None
        return lru, tokens, min(holders)


def media_keys(ids: Sequence[int], media: Media | None, pad: int | None, what: str):
    """Per-token comparison keys and the media pad runs ``(start, end, item)`` of a prompt.

    A media pad's key is ``(pad id, digest of its item's patches and grid, offset in the run)``. With ``pad`` given
    (a model with a vision tower), a prompt whose pad count differs from its media's token count (0 without
    media) is an error naming ``what`` and both numbers."""
    keys: list = list(ids)
    runs: list[tuple[int, int, int]] = []
    found = 0 if pad is None else sum(1 for t in ids if t == pad)
    want = 0 if media is None else media.num_tokens
    if found != want:
        raise ValueError(
            f"{what} holds {found} <|media_pad|> tokens (id {pad}) but its media give "
            f"{want} vision features; expand each item's placeholder to (h/2)*(w/2) pads "
            "(k25jax.chat.prepare or k25jax.vision.expand_media_pads)"
        )
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
    return keys, runs


def cut_to_runs(reuse: int, runs: Sequence[tuple[int, int, int]]) -> int:
    """``reuse`` cut back to the start of a media run it would end inside (the tower sees whole items only)."""
    return next((start for start, end, _ in runs if start < reuse < end), reuse)


def _item_slices(media: Media) -> list[slice]:
    sizes = [int(t * h * w) for t, h, w in np.asarray(media.grid_thw).reshape(-1, 3)]
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True)]


def _digest(media: Media, k: int) -> str:
    patches = np.ascontiguousarray(media.pixel_values[_item_slices(media)[k]], np.float32)
    grid = np.asarray(media.grid_thw).reshape(-1, 3)[k].astype(np.int64)
    return hashlib.blake2b(grid.tobytes() + patches.tobytes(), digest_size=16).hexdigest()


def select_items(media: Media, items: Sequence[int]) -> Media:
    """The media of only the given items, in order."""
    slices = _item_slices(media)
    grid = np.asarray(media.grid_thw).reshape(-1, 3)
    return Media(np.concatenate([media.pixel_values[slices[k]] for k in items]), grid[list(items)])
