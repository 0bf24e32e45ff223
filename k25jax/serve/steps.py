"""The engine's compiled steps (internal: call the engine, ``k25jax.generate`` or ``k25jax.stream``).

Every step is a pure function of the model state, the latent cache and the per-slot arrays. The graph
definition is bound once per model structure (:func:`compiled`, cached on it), so a dispatch hashes no graph
definition and the compiled code is shared by every engine on equal models:

- :func:`admit` writes a request's sampling settings into its slot and clears the slot's counters;
- :func:`prefill_chunk` runs one chunk of the prompts of several slots (bucketed length) into their cache
  rows, in full form when the slots hold nothing before it, else in the absorbed form over the rows; the final
  chunk also draws each request's first token;
- :func:`decode_window` runs up to ``k`` decode steps for the live slots in one ``lax.while_loop`` (stops
  checked on device; the loop ends early when no slot is live), over only those rows and the used part of
  the cache (both bucketed);
- :func:`copy_prefix` copies the first ``n`` latents of one slot's row into another (prefix reuse);
- :func:`release` marks a slot not live (finished or cancelled).

Slots are cache rows: a free slot's row keeps its latents, so a later request that starts with the same tokens
can take them (``k25jax.serve.prefix``).
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
from flax import nnx

from k25jax import sampling as smp
from k25jax.cache import LatentCache
from k25jax.sharding import replicated


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """What changes per step, one row per slot.

    last_token: ``[B]`` the token to feed next (the last one drawn).
    generated: ``[B]`` tokens drawn so far (the index of the next one, for its RNG key).
    done: ``[B]`` not live: finished, cancelled, free, or still prefilling.
    counts: ``[B, V]`` int32, how often each token was drawn (frequency / presence / repetition penalties).
    seen: ``[B, V]`` bool, the prompt's tokens (repetition penalty).
    """

    last_token: jax.Array
    generated: jax.Array
    done: jax.Array
    counts: jax.Array
    seen: jax.Array

    @classmethod
    def empty(cls, batch: int, vocab: int) -> SlotState:
        return cls(
            last_token=jnp.zeros((batch,), jnp.int32),
            generated=jnp.zeros((batch,), jnp.int32),
            done=jnp.ones((batch,), bool),
            counts=jnp.zeros((batch, vocab), jnp.int32),
            seen=jnp.zeros((batch, vocab), bool),
        )


def _rows(tree, slot):
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), tree)


def _set_rows(tree, slot, rows):
    return jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r.astype(a.dtype), slot, 0), tree, rows)


def unpack_bitmask(bitmask: jax.Array, vocab: int) -> jax.Array:
    """``[B, ceil(V / 32)]`` int32 words (bit ``v % 32`` of word ``v // 32`` set: token ``v`` allowed, the
    llguidance layout) -> ``[B, V]`` bool."""
    ids = jnp.arange(vocab, dtype=jnp.int32)
    return ((bitmask[:, ids >> 5] >> (ids & 31)) & 1).astype(bool)


def _choose(logits, params: smp.SlotParams, ss: SlotState, live, lengths, max_len: int, n_logprobs, bitmask=None):
    """Draw the next token of every live row from float32 ``logits [B, V]``; update the slot state.

    A row finishes on a stop id (kept as its last token), at its ``max_tokens``, or when the token just drawn
    takes the last cache slot (it is never fed back). ``bitmask`` (guided decoding) restricts each row to the
    tokens its bits allow. Returns ``(tokens [B], state, logprob outputs)``; rows
    not live give :data:`k25jax.sampling.NO_TOKEN` and keep their state.
    """
    B = logits.shape[0]
    processed = smp.penalized(logits, params, ss.counts, ss.seen)
    if bitmask is not None:
        processed = jnp.where(unpack_bitmask(bitmask, logits.shape[-1]), processed, -jnp.inf)
    tokens = smp.draw(processed, params, ss.generated)
    tokens = jnp.where(live, tokens, smp.NO_TOKEN)
    counts = ss.counts.at[jnp.arange(B), jnp.maximum(tokens, 0)].add(live.astype(jnp.int32))
    generated = ss.generated + live.astype(jnp.int32)
    stopped = (tokens[:, None] == params.stop_ids).any(axis=-1)
    finished = stopped | (generated >= params.max_tokens) | (lengths + 1 >= max_len)
    ss = SlotState(
        last_token=jnp.where(live, tokens, ss.last_token),
        generated=generated,
        done=ss.done | (live & finished),
        counts=counts,
        seen=ss.seen,
    )
    extra = smp.logprobs(logits, tokens, n_logprobs) if n_logprobs is not None else ()
    return replicated(tokens), ss, tuple(replicated(x) for x in extra)


def _embed(text, ids, embeds, mask):
    h = text.embed(ids)
    if embeds is not None:
        h = jnp.where(mask[:, :, None], embeds.astype(h.dtype), h)
    return h


def _cached_forward(text, h, starts, cache: LatentCache, form: str):
    positions = starts[:, None].astype(jnp.int32) + jnp.arange(h.shape[1], dtype=jnp.int32)[None, :]
    return text.forward(h, positions, cache, form=form)


def _admit(cache, ss: SlotState, params: smp.SlotParams, slot, row: smp.SlotParams, prompt_ids, reused):
    """Slot ``slot`` takes a new request: its settings, zero counters, the prompt's token set, ``reused`` valid
    cache slots (a reused prefix), not live until its first token is drawn."""
    V = ss.counts.shape[1]
    seen = jnp.zeros((1, V), bool).at[0, prompt_ids].set(True, mode="drop")
    fresh = SlotState(
        last_token=jnp.zeros((1,), jnp.int32),
        generated=jnp.zeros((1,), jnp.int32),
        done=jnp.ones((1,), bool),
        counts=jnp.zeros((1, V), jnp.int32),
        seen=seen,
    )
    lengths = jax.lax.dynamic_update_slice_in_dim(cache.lengths, jnp.reshape(reused, (1,)).astype(jnp.int32), slot, 0)
    return dataclasses.replace(cache, lengths=lengths), _set_rows(ss, slot, fresh), params.set_row(slot, row)


def _prefill_chunk(
    graphdef, state, cache, ss, params, slots, ids, n, embeds, mask, bitmask=None, *, form, final, span, n_logprobs
):
    """One prompt chunk for each of ``P`` slots: ``ids [P, T]`` (row ``p`` valid in ``[0, n[p])``) at each row's
    current length; rows with ``n = 0`` only pad the batch to a repeating size and change nothing. The rows are
    gathered out of the cache, run as one batch and written back; a final chunk also draws each row's first token
    (returned with its done flag). Only the first ``span`` positions (past every real row's chunk) are gathered
    and attended over."""
    text = nnx.merge(graphdef, state)
    before = {k: jnp.take(v, slots, axis=1)[:, :, :span] for k, v in cache.stacks.items()}
    rows = LatentCache(stacks=before, lengths=cache.lengths[slots])
    start = rows.lengths
    h, rows = _cached_forward(text, _embed(text, ids, embeds, mask), start, rows, form)
    lengths = (start + n).astype(jnp.int32)
    real = n > 0  # padding rows (n = 0, other slots, so shapes repeat) write back exactly what they read

    def keep(new, old):
        return jnp.where(real.reshape((1, -1) + (1,) * (new.ndim - 2)), new, old)

    cache = LatentCache(
        stacks={k: v.at[:, slots, :span].set(keep(rows.stacks[k], before[k])) for k, v in cache.stacks.items()},
        lengths=cache.lengths.at[slots].set(lengths),
    )
    if not final:
        return cache, ss, None
    last = jnp.take_along_axis(h, jnp.maximum(n - 1, 0)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    logits = text.logits(last)
    live = jnp.ones(slots.shape, bool)
    ss_before = jax.tree.map(lambda a: a[slots], ss)
    ss_rows = dataclasses.replace(ss_before, done=jnp.zeros(slots.shape, bool))
    p_rows = jax.tree.map(lambda a: a[slots], params)
    token, ss_rows, extra = _choose(logits, p_rows, ss_rows, live, lengths, cache.max_len, n_logprobs, bitmask)

    def keep_row(new, old):
        return jnp.where(real.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    ss = jax.tree.map(lambda a, r, o: a.at[slots].set(keep_row(r, o)), ss, ss_rows, ss_before)
    return cache, ss, (token, ss_rows.done) + extra


def _decode_window(graphdef, state, cache, ss, params, slots, bitmask=None, *, steps, span, n_logprobs):
    """Up to ``steps`` decode steps of the slots ``slots [b]`` (the live ones, padded with slots that are not);
    ``tokens [steps, b]`` (NO_TOKEN where none). Only those rows and the first ``span`` cache positions (past
    every live row's length plus ``steps``) are gathered and attended over, so a step costs what the live
    requests hold, not ``B x max_context``; they are written back at the end of the window. A ``bitmask``
    (``[b, W]``, guided rows; the host updates it per token, so then ``steps`` is 1) applies to every step."""
    text = nnx.merge(graphdef, state)
    S = cache.max_len
    sub = LatentCache(
        stacks={k: jnp.take(v, slots, axis=1)[:, :, :span] for k, v in cache.stacks.items()},
        lengths=cache.lengths[slots],
    )
    sub_ss = jax.tree.map(lambda a: a[slots], ss)
    sub_params = jax.tree.map(lambda a: a[slots], params)
    b = slots.shape[0]
    n = n_logprobs
    outputs = [jnp.full((steps, b), smp.NO_TOKEN, jnp.int32)]
    if n is not None:
        outputs += [jnp.zeros((steps, b), jnp.float32), jnp.zeros((steps, b, n), jnp.int32)]
        outputs += [jnp.zeros((steps, b, n), jnp.float32)]

    def cond(carry):
        i, _, ss, _ = carry
        return (i < steps) & jnp.any(~ss.done)

    def body(carry):
        i, cache, ss, outs = carry
        live = ~ss.done
        starts = cache.lengths
        h, cache = _cached_forward(text, text.embed(ss.last_token[:, None]), starts, cache, "absorbed")
        lengths = (starts + live.astype(jnp.int32)).astype(jnp.int32)  # rows not live stay put
        cache = dataclasses.replace(cache, lengths=lengths)
        tokens, ss, extra = _choose(text.logits(h[:, 0]), sub_params, ss, live, lengths, S, n, bitmask)
        outs = [o.at[i].set(v) for o, v in zip(outs, (tokens, *extra), strict=True)]
        return i + 1, cache, ss, outs

    count, sub, sub_ss, outputs = jax.lax.while_loop(cond, body, (jnp.int32(0), sub, sub_ss, outputs))
    cache = LatentCache(
        stacks={k: v.at[:, slots, :span].set(sub.stacks[k]) for k, v in cache.stacks.items()},
        lengths=cache.lengths.at[slots].set(sub.lengths),
    )
    ss = jax.tree.map(lambda a, r: a.at[slots].set(r), ss, sub_ss)
    return cache, ss, (count, replicated(sub_ss.done), *outputs)


def _copy_prefix(cache: LatentCache, src, dst, n):
    """Row ``dst``'s first ``n`` latents := row ``src``'s (the rest of ``dst`` untouched)."""
    keep = jnp.arange(cache.max_len)[None, None, :, None] < n
    stacks = {}
    for k, v in cache.stacks.items():
        a = jax.lax.dynamic_slice_in_dim(v, src, 1, axis=1)
        b = jax.lax.dynamic_slice_in_dim(v, dst, 1, axis=1)
        stacks[k] = jax.lax.dynamic_update_slice_in_dim(v, jnp.where(keep, a, b), dst, 1)
    return dataclasses.replace(cache, stacks=stacks)


def _release(ss: SlotState, slot):
    return dataclasses.replace(ss, done=ss.done.at[slot].set(True))


def _grow(cache: LatentCache, max_len: int) -> LatentCache:
    pad = ((0, 0), (0, 0), (0, max_len - cache.max_len), (0, 0))
    return dataclasses.replace(cache, stacks={k: jnp.pad(v, pad) for k, v in cache.stacks.items()})


@functools.lru_cache(maxsize=32)
def compiled(graphdef) -> SimpleNamespace:
    """The jitted steps bound to one text-model graph definition (cache, slot state donated)."""
    donate = ("cache", "ss")
    return SimpleNamespace(
        admit=jax.jit(_admit, donate_argnames=("cache", "ss", "params")),
        prefill_chunk=jax.jit(
            functools.partial(_prefill_chunk, graphdef),
            static_argnames=("form", "final", "span", "n_logprobs"),
            donate_argnames=donate,
        ),
        decode_window=jax.jit(
            functools.partial(_decode_window, graphdef),
            static_argnames=("steps", "span", "n_logprobs"),
            donate_argnames=donate,
        ),
        copy_prefix=jax.jit(_copy_prefix, donate_argnames="cache"),
        release=jax.jit(_release, donate_argnames="ss"),
        grow=jax.jit(_grow, static_argnums=1),
    )


# --------------------------------------------------------------------------------------------------------
# Teacher-forced helpers for tests and checks (the cache in, logits out; no sampling)
# --------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def _prefill(graphdef, state, input_ids, lengths, cache, embeds, embeds_mask):
    text = nnx.merge(graphdef, state)
    h, cache = _cached_forward(
        text, _embed(text, input_ids, embeds, embeds_mask), jnp.zeros_like(lengths), cache, "full"
    )
    rows = jnp.take_along_axis(h, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return text.logits(rows), dataclasses.replace(cache, lengths=lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnames="cache")
def _extend(graphdef, state, input_ids, chunk_lengths, cache, all_logits, embeds=None, embeds_mask=None):
    text = nnx.merge(graphdef, state)
    starts = cache.lengths
    h, cache = _cached_forward(text, _embed(text, input_ids, embeds, embeds_mask), starts, cache, "absorbed")
    cache = dataclasses.replace(cache, lengths=(starts + chunk_lengths).astype(jnp.int32))
    if all_logits:
        return text.logits(h), cache
    rows = jnp.take_along_axis(h, jnp.maximum(chunk_lengths - 1, 0)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return text.logits(rows), cache


def text_model(model):
    """The decoder stack of a ``K25`` (``model.text``) or a ``TextModel`` itself."""
    return getattr(model, "text", model)


def prefill(model, input_ids, lengths, cache: LatentCache, inputs_embeds=None, embeds_mask=None):
    """Fill an empty ``cache`` (donated) with right-padded prompts ``input_ids [B, T]`` (row ``b`` valid in
    ``[0, lengths[b])``) in full form; return float32 logits ``[B, V]`` at each prompt's last token and the cache.
    ``inputs_embeds [B, T, D]`` replace the token embeddings where ``embeds_mask`` (default all) is True."""
    from k25jax.sharding import mesh_of, use_mesh

    graphdef, state = nnx.split(text_model(model))
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if inputs_embeds is not None and embeds_mask is None:
        embeds_mask = jnp.ones(input_ids.shape, bool)
    with use_mesh(mesh_of(state)):
        return _prefill(graphdef, state, input_ids, jnp.asarray(lengths, jnp.int32), cache, inputs_embeds, embeds_mask)


def extend(model, input_ids, cache: LatentCache, chunk_lengths=None, *, all_logits: bool = True):
    """Append ``input_ids [B, T]`` to every sequence of ``cache`` (donated) in the absorbed form (decode is
    ``T == 1``); float32 logits ``[B, T, V]`` (or ``[B, V]`` at each chunk's last token) and the cache."""
    from k25jax.sharding import mesh_of, use_mesh

    graphdef, state = nnx.split(text_model(model))
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if chunk_lengths is None:
        chunk_lengths = jnp.full((input_ids.shape[0],), input_ids.shape[1], jnp.int32)
    with use_mesh(mesh_of(state)):
        return _extend(graphdef, state, input_ids, jnp.asarray(chunk_lengths, jnp.int32), cache, all_logits)


# --------------------------------------------------------------------------------------------------------
# The vision tower for prompts with media
# --------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 4))
def _embed_media(graphdef, state, input_ids, pixel_values, grid):
    return nnx.merge(graphdef, state).embed_inputs(input_ids, pixel_values, grid)


def media_embeds(model, input_ids, media, what: str = "generate") -> jax.Array:
    """Embeddings ``[B, T, D]`` (compute dtype) of padded prompts ``input_ids [B, T]`` with each prompt's
    ``<|media_pad|>`` runs replaced by the vision features of its own media.

    ``media``: one entry per prompt, None or anything :func:`k25jax.media.as_media` takes. All items go through
    the vision tower in one call (attention stays within each item), compiled once per combination of grids.
    A prompt whose pad count differs from its media's token count is an error naming the prompt and both
    numbers.
    """
    import numpy as np

    from k25jax.media import as_media
    from k25jax.vision.moonvit import as_grid

    input_ids = np.asarray(input_ids)
    if len(media) != input_ids.shape[0]:
        raise ValueError(f"{what}: {len(media)} media entries for {input_ids.shape[0]} prompts")
    cfg = getattr(model, "cfg", None)
    if getattr(model, "vision", None) is None:
        name = getattr(cfg, "name", type(model).__name__)
        raise ValueError(f"{what}: media given but model {name!r} has no vision tower (no vision_config)")
    pad = cfg.media_placeholder_token_id
    items = []
    for b, entry in enumerate(media):
        m = as_media(entry, f"{what}: media[{b}]")
        found = int(np.sum(input_ids[b] == pad))
        want = 0 if m is None else m.num_tokens
        if found != want:
            raise ValueError(
                f"{what}: prompt {b} holds {found} <|media_pad|> tokens (id {pad}) but its media give {want} "
                "vision features; expand each item's placeholder to (h/2)*(w/2) pads (k25jax.chat.prepare or "
                "k25jax.vision.expand_media_pads)"
            )
        if m is not None:
            items.append(m)
    if not items:
        return model.text.embed(jnp.asarray(input_ids, jnp.int32))
    graphdef, state = nnx.split(model)
    pixel_values = np.concatenate([m.pixel_values for m in items]).astype(np.float32)
    grid = as_grid(np.concatenate([m.grid_thw for m in items]), cfg.vision)
    return _embed_media(graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(pixel_values), grid)
