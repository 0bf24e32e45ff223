"""``k25jax.generate`` and ``k25jax.stream``: a batch of token-id prompts through the engine.

Both build an :class:`k25jax.serve.engine.Engine` with one slot per prompt and a cache sized to the longest
prompt plus ``max_new_tokens`` (a power of two, at most ``max_context``), submit every prompt, and run it.
Prompt ``b`` draws with seed ``seed + b`` unless its :class:`k25jax.sampling.Sampling` names one, so a prompt
gives the same tokens in any batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from k25jax.sampling import THINKING, Sampling, request_sampling
from k25jax.serve.engine import Engine, EngineError, bucket
from k25jax.serve.steps import text_model


def _check_prompts(prompts) -> list[list[int]]:
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        prompts = np.asarray(prompts).tolist()
    prompts = list(prompts)
    if not prompts:
        raise EngineError("generate: prompts is empty; give a list of token-id lists")
    if isinstance(prompts[0], int | np.integer):
        raise EngineError("generate: prompts must be a batch (a list of token-id lists), e.g. [[1, 2, 3]]")
    return [[int(t) for t in p] for p in prompts]


def stream(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
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
    decode_window: int = 8,
    tokenizer=None,
) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts, yielding one list per decode step: the new token of each prompt, or
    None for one that has already finished. Arguments as :func:`generate`."""
    prompts = _check_prompts(prompts)
    if max_new_tokens <= 0:
        return
    cfg = text_model(model).cfg
    max_context = int(max_context or cfg.max_position_embeddings)
    for name, given in (("media", media), ("inputs_embeds", inputs_embeds)):
        if given is not None and len(given) != len(prompts):
            raise EngineError(f"generate: {len(given)} {name} entries for {len(prompts)} prompts")
    if media is not None and inputs_embeds is not None:
        raise EngineError("generate: give media or inputs_embeds, not both")
    longest = max(len(p) for p in prompts)
    if longest >= max_context:
        i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
        raise EngineError(
            f"generate: prompt {i} has {longest} tokens, leaving no room for a new one in max_context {max_context}"
        )
    shorthand = dict(temperature=temperature, top_p=top_p, top_k=top_k, stop_token_ids=stop_token_ids)
    engine = Engine(
        model,
        max_slots=len(prompts),
        max_context=min(max_context, bucket(longest + max_new_tokens, 128)),
        cache_dtype=cache_dtype,
        decode_window=decode_window,
        prefill_chunk=prefill_chunk,
        prefill_budget=None,
        block_size=0,
        tokenizer=tokenizer,
    )
    requests = []
    for b, p in enumerate(prompts):
        s = request_sampling(sampling, seed=seed + b, **shorthand)
        try:
            r = engine.submit(
                p,
                s,
                media=None if media is None else media[b],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[b],
                max_tokens=max_new_tokens,
            )
        except ValueError as err:  # the engine numbers requests from 0, as the prompts are
            raise type(err)(str(err).replace(f"request {b}", f"generate: prompt {b}", 1)) from None
        requests.append(r)
    emitted = 0
    while True:
        running = [len(r.tokens) for r in requests if not r.finished]
        if running:
            engine.step()
            running = [len(r.tokens) for r in requests if not r.finished]
        # Step j is complete once every running prompt has its j-th token.
        ready = min(running) if running else max(len(r.tokens) for r in requests)
        for j in range(emitted, ready):
            yield [r.tokens[j] if j < len(r.tokens) else None for r in requests]
        emitted = max(emitted, ready)
        if not running:
            return


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
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
    decode_window: int = 8,
    tokenizer=None,
) -> list[list[int]]:
    """Generate new tokens for a batch of token-id prompts (through the engine; module doc).

    Args:
      model: a ``K25`` or ``TextModel`` (on one device or sharded on a mesh).
      prompts: ``B`` lists of token ids, any lengths.
      sampling: a :class:`k25jax.sampling.Sampling` (penalties, logit bias, min-p, stop strings with a
        ``tokenizer``, ...). Without it ``temperature``, ``top_p``, ``top_k`` build one; the defaults are the
        model card's thinking mode (``sampling_defaults(False)`` gives instant mode); ``temperature=0`` is
        greedy.
      max_new_tokens: most new tokens per prompt.
      seed: prompt ``b`` draws with seed ``seed + b`` (unless ``sampling.seed`` is set).
      stop_token_ids: ids that end a prompt's reply (kept as its last token); default ``<|im_end|>`` and
        ``[EOS]``; ``()`` for none.
      max_context: the most tokens (prompt + new) a sequence may hold (default ``max_position_embeddings``);
        a sequence that reaches it stops.
      inputs_embeds: optional per-prompt ``[T_b, D]`` embeddings (or None) replacing the token embeddings.
      media: optional per-prompt images / video chunks (a ``K25`` with a vision tower): None for a text
        prompt, else anything ``k25jax.media.as_media`` takes (e.g. ``k25jax.chat.prepare(...).media``),
        filling the prompt's ``<|media_pad|>`` runs in order.
      cache_dtype: latent cache dtype (default: the run config's).
      prefill_chunk: prompts longer than this (rounded up to a power of two) are prefilled in chunks, the
        attention scores bounded by ``[H, chunk, cache length]``.
      decode_window: decode steps per dispatch.
    Returns: the new tokens of each prompt, stop token included.
    """
    out: list[list[int]] | None = None
    for step in stream(
        model,
        prompts,
        sampling,
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
        decode_window=decode_window,
        tokenizer=tokenizer,
    ):
        if out is None:
            out = [[] for _ in step]
        for b, token in enumerate(step):
            if token is not None:
                out[b].append(token)
    return out if out is not None else [[] for _ in prompts]
