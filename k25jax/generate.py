"""Generation with the latent KV cache: prefill, absorbed-MLA decode, sampling, batching, streaming.

Prefill runs the full-form attention over the (right-padded) prompts and writes every token's latents into
the cache in the same pass; decode runs one token per sequence through the absorbed form over the cache
(architecture doc section 2). Both are jitted with the cache donated, so a decode step updates the cache in
place. Prompts of different lengths batch together: each sequence keeps its own positions (slot = position),
its next token is written at its own length, and finished sequences stop emitting while the rest go on.

A model placed on a mesh (``k25jax.sharding.shard_model``) runs sharded: each jitted step finds the mesh on its
arguments and runs under it (:func:`_on_mesh`), the cache is created sharded, and sampled tokens come back
replicated so that every host can read them.

Sampling defaults follow the model card: thinking mode temperature 1.0, instant mode 0.6, top_p 0.95
(:data:`THINKING`, :data:`INSTANT`); temperature 0 is greedy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax.cache import LatentCache
from k25jax.sharding import mesh_of, replicated, use_mesh
from k25jax.tokenizer import NUM_SPECIAL, special_token_id


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable those filters."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0


THINKING = Sampling(temperature=1.0, top_p=0.95)  # model card, thinking mode
INSTANT = Sampling(temperature=0.6, top_p=0.95)  # model card, instant mode (thinking off)


def sampling_defaults(thinking: bool = True) -> Sampling:
    """The model card's settings: :data:`THINKING` (temperature 1.0, top_p 0.95) or, with thinking off,
    :data:`INSTANT` (temperature 0.6, top_p 0.95); top-k off in both."""
    return THINKING if thinking else INSTANT


def default_stop_ids(model) -> tuple[int, ...]:
    """``<|im_end|>`` and ``[EOS]`` of a model.

    A ``K25`` names its ids in its config (the special block starts at ``bos_token_id``); a bare ``TextModel``
    has the release layout, the 256 specials being the last ids of the vocabulary.
    """
    cfg = getattr(model, "cfg", None)
    if hasattr(cfg, "bos_token_id"):
        return (special_token_id(cfg.bos_token_id, "<|im_end|>"), cfg.eos_token_id)
    first = _text_model(model).cfg.vocab_size - NUM_SPECIAL
    return (special_token_id(first, "<|im_end|>"), special_token_id(first, "[EOS]"))


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------


def _ranked_filtered(logits: jax.Array, temperature, top_p, top_k) -> tuple[jax.Array, jax.Array]:
    """``(order, ranked)``: token ids by decreasing logit ``[B, V]`` and their temperature-scaled logits with the
    tokens outside top-k, then outside the top-p nucleus (of the top-k renormalised), set to ``-inf``."""
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(ranked.shape[-1])[None, :]
    ranked = jnp.where((top_k <= 0) | (rank < top_k), ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    ranked = jnp.where((mass_before < top_p) | (rank == 0), ranked, -jnp.inf)
    return order, ranked


def sample(logits: jax.Array, key: jax.Array, temperature, top_p, top_k) -> jax.Array:
    """Draw one token per row of ``logits [B, V]`` (float32): temperature, then top-k, then top-p (nucleus).

    ``temperature``, ``top_p``, ``top_k`` are scalars (traced: changing them does not recompile). Temperature 0
    returns the argmax. Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (always at least one). Returns ``[B]`` int32. The distribution drawn from is :func:`sampling_probs`.
    """
    logits = logits.astype(jnp.float32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        order, ranked = _ranked_filtered(logits, temperature, top_p, top_k)
        choice = jax.random.categorical(key, ranked, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, None)


def sampling_probs(logits: jax.Array, temperature, top_p, top_k) -> jax.Array:
    """The distribution :func:`sample` draws from: float32 ``[B, V]`` in vocabulary order,
    ``softmax(logits / temperature)`` restricted to the top-k tokens, then to the top-p nucleus of those, and
    renormalised (zero elsewhere); one-hot at the argmax for temperature 0."""
    logits = logits.astype(jnp.float32)
    if float(temperature) <= 0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    order, ranked = _ranked_filtered(logits, temperature, top_p, top_k)
    probs = jax.nn.softmax(ranked, axis=-1)
    return jnp.zeros_like(probs).at[jnp.arange(probs.shape[0])[:, None], order].set(probs)


# --------------------------------------------------------------------------------------------------------
# Jitted steps (the graph definition is static, so compiled code is shared by every call on equal models)
# --------------------------------------------------------------------------------------------------------


def _on_mesh(step):
    """Run a jitted step under the mesh its arguments are placed on (none: as is), so that the model's sharding
    constraints and expert-parallel ``shard_map`` see that mesh when it is traced."""

    @functools.wraps(step)
    def run(*args, **kwargs):
        with use_mesh(mesh_of((args, kwargs))):
            return step(*args, **kwargs)

    return run


def _text_model(model):
    """The decoder stack of a ``K25`` (``model.text``) or a ``TextModel`` itself."""
    return getattr(model, "text", model)


def _last_logits(text, h: jax.Array, index: jax.Array) -> jax.Array:
    """Float32 logits ``[B, V]`` of ``h [B, T, D]`` at per-row positions ``index [B]``."""
    rows = jnp.take_along_axis(h, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return text.logits(rows)


def _cached_forward(text, h: jax.Array, starts: jax.Array, cache: LatentCache, form: str):
    """The decoder over new tokens ``h [B, T, D]`` at positions ``starts[b] + t``, writing their latents."""
    positions = starts[:, None].astype(jnp.int32) + jnp.arange(h.shape[1], dtype=jnp.int32)[None, :]
    return text.forward(h, positions, cache, form=form)


def _embed(text, input_ids, embeds, embeds_mask):
    h = text.embed(input_ids)
    if embeds is not None:
        h = jnp.where(embeds_mask[:, :, None], embeds.astype(h.dtype), h)
    return h


@_on_mesh
@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def _prefill(graphdef, state, input_ids, lengths, cache, embeds, embeds_mask):
    text = nnx.merge(graphdef, state)
    h = _embed(text, input_ids, embeds, embeds_mask)
    h, cache = _cached_forward(text, h, jnp.zeros_like(lengths), cache, "full")
    return _last_logits(text, h, lengths - 1), dataclasses.replace(cache, lengths=lengths.astype(jnp.int32))


@_on_mesh
@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnames="cache")
def _extend(graphdef, state, input_ids, chunk_lengths, cache, all_logits, embeds=None, embeds_mask=None):
    text = nnx.merge(graphdef, state)
    starts = cache.lengths
    h = _embed(text, input_ids, embeds, embeds_mask)
    h, cache = _cached_forward(text, h, starts, cache, "absorbed")
    cache = dataclasses.replace(cache, lengths=(starts + chunk_lengths).astype(jnp.int32))
    if all_logits:
        return text.logits(h), cache
    return _last_logits(text, h, jnp.maximum(chunk_lengths - 1, 0)), cache


def _finish(tokens, done, lengths, max_len, stop_ids):
    """A sequence is done after a stop id, or when its cached tokens plus the one just drawn fill the cache."""
    stopped = (tokens[:, None] == stop_ids[None, :]).any(axis=-1)
    return done | stopped | (lengths + 1 >= max_len)


@_on_mesh
@jax.jit
def _sample_first(logits, lengths, max_len, key, sampling, stop_ids):
    tokens = replicated(sample(logits, jax.random.fold_in(key, 0), *sampling))
    return tokens, _finish(tokens, jnp.zeros(tokens.shape, bool), lengths, max_len, stop_ids)


@_on_mesh
@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def _decode_and_sample(graphdef, state, tokens, done, cache, key, step, sampling, stop_ids):
    text = nnx.merge(graphdef, state)
    starts = cache.lengths
    new_lengths = starts + (~done).astype(jnp.int32)  # finished rows stay put
    h, cache = _cached_forward(text, text.embed(tokens[:, None]), starts, cache, "absorbed")
    cache = dataclasses.replace(cache, lengths=new_lengths.astype(jnp.int32))
    logits = text.logits(h[:, 0])
    new_tokens = sample(logits, jax.random.fold_in(key, step), *sampling)
    new_tokens = replicated(jnp.where(done, tokens, new_tokens))
    return new_tokens, _finish(new_tokens, done, cache.lengths, cache.max_len, stop_ids), cache


# --------------------------------------------------------------------------------------------------------
# Public low-level entry points (tests, sessions, the vision merge)
# --------------------------------------------------------------------------------------------------------


def prefill(model, input_ids, lengths, cache: LatentCache, inputs_embeds=None, embeds_mask=None):
    """Fill an empty ``cache`` with right-padded prompts; return the next-token logits.

    Args:
      input_ids: ``[B, T]`` ids, row ``b`` valid in ``[0, lengths[b])``.
      lengths: ``[B]`` prompt lengths (>= 1).
      cache: an empty cache with at least ``T`` slots (donated: do not reuse the argument).
      inputs_embeds: optional ``[B, T, D]`` embeddings used where ``embeds_mask [B, T]`` is True (media
        placeholders replaced by the vision tower's outputs); elsewhere the token embedding.
    Returns: float32 logits ``[B, V]`` at each prompt's last token, and the filled cache.
    """
    text = _text_model(model)
    graphdef, state = nnx.split(text)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if inputs_embeds is not None and embeds_mask is None:
        embeds_mask = jnp.ones(input_ids.shape, bool)
    return _prefill(graphdef, state, input_ids, jnp.asarray(lengths, jnp.int32), cache, inputs_embeds, embeds_mask)


def extend(model, input_ids, cache: LatentCache, chunk_lengths=None, *, all_logits: bool = True):
    """Append tokens to every sequence of ``cache`` with the absorbed form (decode is ``T == 1``).

    Args:
      input_ids: ``[B, T]`` new ids, row ``b`` valid in ``[0, chunk_lengths[b])`` (default all ``T``).
      cache: donated; new tokens go to slots ``cache.lengths[b] + t``.
    Returns: float32 logits ``[B, T, V]`` (or ``[B, V]`` at each chunk's last token if ``all_logits`` is
      False) and the updated cache.
    """
    text = _text_model(model)
    graphdef, state = nnx.split(text)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if chunk_lengths is None:
        chunk_lengths = jnp.full((input_ids.shape[0],), input_ids.shape[1], jnp.int32)
    return _extend(graphdef, state, input_ids, jnp.asarray(chunk_lengths, jnp.int32), cache, all_logits)


# --------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------


def _bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (at least ``minimum``) so shapes, hence compilations, repeat."""
    size = minimum
    while size < n:
        size *= 2
    return size


def _check_prompts(prompts, vocab: int) -> list[list[int]]:
    if isinstance(prompts, np.ndarray | jax.Array):
        prompts = np.asarray(prompts).tolist()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate: prompts is empty; give a list of token-id lists")
    if isinstance(prompts[0], int | np.integer):
        raise ValueError("generate: prompts must be a batch (a list of token-id lists), e.g. [[1, 2, 3]]")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"generate: prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids {bad[:8]} outside the vocabulary [0, {vocab})")
        out.append(p)
    return out


def _pad_embeds(inputs_embeds, prompts, T, D):
    """Per-prompt ``[T_b, D]`` embeddings (or None) -> ``[B, T, D]`` plus the mask of rows that carry them."""
    if inputs_embeds is None:
        return None, None
    if len(inputs_embeds) != len(prompts):
        raise ValueError(f"generate: {len(inputs_embeds)} inputs_embeds for {len(prompts)} prompts")
    embeds = np.zeros((len(prompts), T, D), np.float32)
    mask = np.zeros((len(prompts), T), bool)
    for b, (e, p) in enumerate(zip(inputs_embeds, prompts, strict=True)):
        if e is None:
            continue
        e = np.asarray(e, np.float32)
        if e.shape != (len(p), D):
            raise ValueError(f"generate: inputs_embeds[{b}] has shape {e.shape}, expected ({len(p)}, {D})")
        embeds[b, : len(p)] = e
        mask[b, : len(p)] = True
    return jnp.asarray(embeds), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _embed_media(graphdef, state, input_ids, pixel_values, grid):
    return nnx.merge(graphdef, state).embed_inputs(input_ids, pixel_values, grid)


def media_embeds(model, input_ids, media: Sequence) -> jax.Array:
    """Embeddings ``[B, T, D]`` (compute dtype) of padded prompts ``input_ids [B, T]`` with each prompt's
    ``<|media_pad|>`` runs replaced by the vision features of its own media.

    ``media``: one entry per prompt, None or anything :func:`k25jax.media.as_media` takes. All items of the
    batch go through the vision tower in one call (attention stays within each item), compiled once per
    combination of grids. A prompt whose pad count differs from its media's token count is an error naming
    the prompt and both numbers.
    """
    from k25jax.media import as_media
    from k25jax.vision.moonvit import as_grid

    input_ids = np.asarray(input_ids)
    if len(media) != input_ids.shape[0]:
        raise ValueError(f"generate: {len(media)} media entries for {input_ids.shape[0]} prompts")
    cfg = getattr(model, "cfg", None)
    if getattr(model, "vision", None) is None:
        name = getattr(cfg, "name", type(model).__name__)
        raise ValueError(f"generate: media given but model {name!r} has no vision tower (no vision_config)")
    pad = cfg.media_placeholder_token_id
    items = []
    for b, entry in enumerate(media):
        m = as_media(entry, f"generate: media[{b}]")
        found = int(np.sum(input_ids[b] == pad))
        want = 0 if m is None else m.num_tokens
        if found != want:
            raise ValueError(
                f"generate: prompt {b} holds {found} <|media_pad|> tokens (id {pad}) but its media give {want} "
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


def stream(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = THINKING.temperature,
    top_p: float = THINKING.top_p,
    top_k: int = 0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    max_context: int | None = None,
    inputs_embeds: Sequence | None = None,
    media: Sequence | None = None,
    cache_dtype=None,
    prefill_chunk: int = 512,
) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts, yielding one list per step: the new token of each sequence, or None
    for a sequence that has already finished. Arguments as :func:`generate`."""
    text = _text_model(model)
    cfg = text.cfg
    prompts = _check_prompts(prompts, cfg.vocab_size)
    if max_new_tokens <= 0:
        return
    max_context = int(max_context or cfg.max_position_embeddings)
    longest = max(len(p) for p in prompts)
    if longest >= max_context:
        i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
        raise ValueError(
            f"generate: prompt {i} has {longest} tokens, leaving no room for a new one in max_context {max_context}"
        )
    chunk = _bucket(prefill_chunk)
    # Pad the prompts to a power of two, or to whole chunks when they need more than one.
    T = _bucket(longest) if longest <= chunk else -(-longest // chunk) * chunk
    S = min(max_context, _bucket(longest + max_new_tokens, 128))
    B = len(prompts)
    ids = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if media is not None and inputs_embeds is not None:
        raise ValueError("generate: give media or inputs_embeds, not both")
    if media is not None and len(media) != B:
        raise ValueError(f"generate: {len(media)} media entries for {B} prompts")
    if media is not None and any(m is not None for m in media):
        embeds = media_embeds(model, ids, media)
        embeds_mask = jnp.ones((B, T), bool)
    else:
        embeds, embeds_mask = _pad_embeds(inputs_embeds, prompts, T, cfg.hidden_size)

    stop_ids = _stop_array(model, stop_token_ids)
    sampling = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k))
    graphdef, state = nnx.split(text)
    cache = LatentCache.zeros(cfg, B, S, cache_dtype or text.run.cache, mesh=mesh_of(state))
    logits, cache = fill(graphdef, state, ids, lengths, cache, embeds, embeds_mask, chunk)
    yield from decode_steps(graphdef, state, logits, cache, max_new_tokens, jax.random.key(seed), sampling, stop_ids)


def _stop_array(model, stop_token_ids) -> jax.Array:
    """Stop ids padded with -1 to a bucketed length (few distinct shapes)."""
    stops = list(default_stop_ids(model) if stop_token_ids is None else stop_token_ids)
    return jnp.asarray(stops + [-1] * (_bucket(len(stops) + 1, 4) - len(stops)), jnp.int32)


def fill(graphdef, state, ids, lengths, cache, embeds, embeds_mask, chunk: int, *, continuing: bool = False):
    """Run right-padded tokens ``ids [B, T]`` (``T`` a multiple of ``chunk`` or below it) into ``cache``.

    Without ``continuing`` the cache is empty: the first chunk runs in full form (the cheaper one when queries
    and keys are the same tokens); later chunks, and every chunk when ``continuing`` (tokens appended after
    ``cache.lengths``), run in the absorbed form over the cache, so the score tensor stays ``[B, H, chunk, S]``.
    A padded slot past ``S`` is dropped by the cache write. Returns the float32 logits ``[B, V]`` at each
    row's last valid token and the cache.
    """
    T = ids.shape[1]
    lengths = np.asarray(lengths)
    logits = None
    for start in range(0, T, chunk):
        part = slice(start, start + chunk)
        part_lengths = np.clip(lengths - start, 0, chunk)
        part_embeds = None if embeds is None else embeds[:, part]
        part_mask = None if embeds is None else embeds_mask[:, part]
        if start == 0 and not continuing:
            new_logits, cache = _prefill(
                graphdef, state, jnp.asarray(ids[:, part]), jnp.asarray(part_lengths), cache, part_embeds, part_mask
            )
        else:
            new_logits, cache = _extend(
                graphdef,
                state,
                jnp.asarray(ids[:, part]),
                jnp.asarray(part_lengths),
                cache,
                False,
                part_embeds,
                part_mask,
            )
        # Rows whose tokens ended in an earlier chunk keep that chunk's logits.
        logits = new_logits if logits is None else jnp.where(jnp.asarray(part_lengths)[:, None] > 0, new_logits, logits)
    return logits, cache


def decode_steps(graphdef, state, logits, cache, max_new_tokens, key, sampling, stop_ids, on_exit=None):
    """Sample from ``logits [B, V]``, then decode one token per step; yield each step's tokens (None for a
    finished sequence). ``on_exit(cache)`` gets the final cache when the generator ends or is closed; its
    ``lengths`` count the prompt plus the drawn tokens already fed back (a token is fed by the step after the
    one that drew it, so a finished sequence's last token is not cached)."""
    S = cache.max_len
    B = logits.shape[0]
    tokens, done = _sample_first(logits, cache.lengths, S, key, sampling, stop_ids)
    finished = np.zeros(B, bool)
    try:
        for step in range(max_new_tokens):
            current, current_done = tokens, done
            if step + 1 < max_new_tokens:
                # Dispatch the next step before reading this one back, so the host round trip overlaps compute.
                tokens, done, cache = _decode_and_sample(
                    graphdef, state, current, current_done, cache, key, step + 1, sampling, stop_ids
                )
            host_tokens, host_done = np.asarray(current), np.asarray(current_done)
            yield [None if finished[b] else int(host_tokens[b]) for b in range(B)]
            finished |= host_done
            if finished.all():
                return
    finally:
        if on_exit is not None:
            on_exit(cache)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = THINKING.temperature,
    top_p: float = THINKING.top_p,
    top_k: int = 0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    max_context: int | None = None,
    inputs_embeds: Sequence | None = None,
    media: Sequence | None = None,
    cache_dtype=None,
    prefill_chunk: int = 512,
) -> list[list[int]]:
    """Generate new tokens for a batch of token-id prompts.

    Args:
      model: a ``K25`` or ``TextModel``.
      prompts: ``B`` lists of token ids, any lengths (batched together, right-padded).
      max_new_tokens: most new tokens per prompt.
      temperature, top_p, top_k: sampling (:func:`sample`); defaults are the model card's thinking mode
        (``sampling_defaults(False)`` gives instant mode). ``temperature=0`` is greedy.
      seed: the sampling RNG seed.
      stop_token_ids: ids that end a sequence (included as its last token); default ``<|im_end|>`` and
        ``[EOS]``; ``()`` for none.
      max_context: the most tokens (prompt + new) a sequence may hold (default ``max_position_embeddings``,
        256K for K2.5). The cache is allocated for the longest prompt plus ``max_new_tokens`` (rounded up to a
        power of two), never more than this; a sequence that reaches it stops.
      inputs_embeds: optional per-prompt ``[T_b, D]`` embeddings (or None) replacing the token embeddings.
      media: optional per-prompt images / video chunks (a ``K25`` with a vision tower): None for a text
        prompt, else ``(pixel_values, grid_thw)`` (``k25jax.media.Media``, e.g. from ``k25jax.chat.prepare``;
        a ``VideoInput`` or a list of items also do) whose items fill the prompt's ``<|media_pad|>`` runs in
        order. The vision tower runs once for the whole batch at prefill.
      cache_dtype: latent cache dtype (default: the model run config's ``cache_dtype``, else its compute dtype).
      prefill_chunk: prompts longer than this (rounded up to a power of two) are prefilled in chunks: the
        first in full form, the rest in absorbed form over the cache, bounding the attention scores to
        ``[B, H, chunk, cache length]``.
    Returns: the new tokens of each prompt, stop token included.
    """
    out: list[list[int]] | None = None
    for step in stream(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_token_ids=stop_token_ids,
        max_context=max_context,
        inputs_embeds=inputs_embeds,
        media=media,
        cache_dtype=cache_dtype,
        prefill_chunk=prefill_chunk,
    ):
        if out is None:
            out = [[] for _ in step]
        for b, token in enumerate(step):
            if token is not None:
                out[b].append(token)
    return out if out is not None else [[] for _ in prompts]
