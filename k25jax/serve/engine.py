"""The generation engine: continuous batching over the latent cache.

The engine owns ``max_slots`` rows of latent cache, ``max_context`` positions each. A submitted request
waits for a free slot; once in one, its prompt is prefilled chunk by chunk (batch 1, lengths bucketed to
powers of two, at most ``prefill_chunk`` tokens a chunk, at most ``prefill_budget`` tokens a step over all
prefilling slots, media through the vision tower first), and its first token is drawn by the last chunk. All
live slots then decode together, ``decode_window`` steps per dispatch in one compiled loop, stop conditions
checked on device; the host reads the tokens back once per window. A finished or cancelled request frees its
slot at the next step boundary and a waiting one takes it. Every request samples with its own settings and
its own RNG stream (:mod:`k25jax.sampling`), so what it gives does not depend on what else runs.

One :meth:`Engine.step` is: cancellations, admissions (prefix reuse, :mod:`k25jax.serve.prefix`), prefill
chunks within the budget, one decode window. ``k25jax.generate`` / ``k25jax.stream``, ``Session``, the CLI and
the server all run here.

Example::

    engine = Engine(model, max_slots=8, max_context=4096, tokenizer=tok)
    a = engine.submit(ids_a, Sampling(temperature=0.0, max_tokens=64))
    b = engine.submit(ids_b, Sampling(temperature=0.6, seed=1, stop=["\\n\\n"]))
    engine.run()                 # or: while not engine.idle: engine.step()
    a.tokens, a.finish_reason, b.usage
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax import sampling as smp
from k25jax.cache import LatentCache
from k25jax.media import as_media
from k25jax.sampling import THINKING, Sampling
from k25jax.serve import steps
from k25jax.serve.prefix import PrefixIndex, cut_to_runs, media_keys, select_items
from k25jax.serve.request import EngineError, Guide, Request, bucket, default_stop_ids  # noqa: F401
from k25jax.sharding import mesh_of, use_mesh


class Engine:
    """Slot-based continuous batching over one model (module doc).

    Args:
      model: a ``K25`` (with or without vision tower) or a ``TextModel``, on one device or placed on a mesh
        (``k25jax.shard_model``): the cache is then created sharded and every step runs on that mesh.
      max_slots: sequences decoded together (cache rows).
      max_context: positions per slot, prompt plus new tokens (default ``max_position_embeddings``).
      cache_dtype: latent cache dtype (default: the run config's ``cache_dtype``, else its compute dtype).
      decode_window: decode steps per dispatch (the host reads tokens back once per window).
      prefill_chunk: most tokens of one prefill chunk (rounded up to a power of two).
      prefill_budget: most prompt tokens prefilled per step over all slots (None: every waiting prompt whole);
        at least one chunk always runs, so a long prompt advances while the live streams keep decoding.
      block_size: prefix-reuse block (0 turns reuse off).
      tokenizer: needed for stop strings.
      max_logprobs: the most alternatives a request may ask for (``sampling.logprobs``).
      bias_width, stop_width: the most logit-bias entries and stop ids a request may give.
      default_max_tokens: ``max_tokens`` for requests that give none (None: until the context is full).
    """

    def __init__(
        self,
        model,
        *,
        max_slots: int = 8,
        max_context: int | None = None,
        cache_dtype=None,
        decode_window: int = 8,
        prefill_chunk: int = 512,
        prefill_budget: int | None = 2048,
        block_size: int = 16,
        tokenizer=None,
        max_logprobs: int = 20,
        bias_width: int = 64,
        stop_width: int = 8,
        default_max_tokens: int | None = None,
    ):
        self.model = model
        self.text = steps.text_model(model)
        cfg = self.text.cfg
        if max_slots < 1:
            raise EngineError(f"engine: max_slots must be >= 1, got {max_slots}")
        if decode_window < 1:
            raise EngineError(f"engine: decode_window must be >= 1, got {decode_window}")
        self.max_slots = int(max_slots)
        self.max_context = int(max_context or cfg.max_position_embeddings)
        if self.max_context < 2:
            raise EngineError(f"engine: max_context must be >= 2, got {self.max_context}")
        self.decode_window = int(decode_window)
        from k25jax.plan import LONG_CONTEXT, LONG_CONTEXT_BLOCK

        if self.max_context > LONG_CONTEXT and self.text.run.attention_block is None:
            warnings.warn(
                f"engine: max_context {self.max_context} with plain attention: a prefill chunk's scores span the "
                f"whole cache; model.set_run(attention_block={LONG_CONTEXT_BLOCK}) attends blockwise (k25jax plan)",
                stacklevel=2,
            )
        self.prefill_chunk = bucket(prefill_chunk)
        self.prefill_budget = prefill_budget
        self.tokenizer = tokenizer
        self.max_logprobs = int(max_logprobs)
        self.bias_width, self.stop_width = int(bias_width), int(stop_width)
        self.default_max_tokens = default_max_tokens
        self.vocab = cfg.vocab_size
        self.mask_words = -(-self.vocab // 32)
        self.default_stop = default_stop_ids(model)
        has_vision = getattr(model, "vision", None) is not None
        self.pad_id = model.cfg.media_placeholder_token_id if has_vision else None

        self.graphdef, self.state = nnx.split(self.text)
        self.mesh = mesh_of(self.state)
        self.fns = steps.compiled(self.graphdef)
        dtype = cache_dtype or self.text.run.cache
        self.cache = LatentCache.zeros(cfg, self.max_slots, self.max_context, dtype, mesh=self.mesh)
        self.ss = self._place(steps.SlotState.empty(self.max_slots, self.vocab))
        self.params = self._place(smp.SlotParams.empty(self.max_slots, self.bias_width, self.stop_width))
        self.index = PrefixIndex(self.max_slots, block_size or 1)
        self.reuse_prefixes = block_size > 0

        self.slots: list[Request | None] = [None] * self.max_slots
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._last_id = -1
        self._seeds = np.random.default_rng()
        self.stats = {"windows": 0, "decode_steps": 0, "prefill_chunks": 0, "prefill_tokens": 0, "cached_tokens": 0}

    def _place(self, tree):
        if self.mesh is None:
            return tree
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    # ----------------------------------------------------------------------------------------------------
    # Requests
    # ----------------------------------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        sampling: Sampling | None = None,
        *,
        media=None,
        inputs_embeds=None,
        max_tokens: int | None = None,
        guide: Guide | None = None,
        on_update: Callable[[Request], None] | None = None,
    ) -> Request:
        """Queue a request; return its :class:`Request` (filled in as the engine runs).

        ``guide``: a :class:`Guide` restricting the tokens (JSON schema, tool calls); ``on_update(request)`` is
        called (from the thread stepping the engine) after every step in which the request got tokens or
        finished.

        ``prompt``: token ids (media placeholders expanded, as ``k25jax.chat.prepare`` gives them); ``media``:
        anything ``k25jax.media.as_media`` takes; ``inputs_embeds``: ``[len(prompt), D]`` embeddings replacing
        the token embeddings (no prefix reuse then); ``max_tokens`` overrides ``sampling.max_tokens``.
        Raises :class:`EngineError` / ``SamplingError`` naming the field at fault.
        """
        sampling = (sampling or THINKING).check(self.vocab, max_logprobs=self.max_logprobs)
        rid = self._last_id = next(self._ids)
        what = f"request {rid}"
        if isinstance(prompt, str):
            raise EngineError(f"{what}: prompt must be token ids, not a string (tokenize it first)")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise EngineError(f"{what}: prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab]
        if bad:
            raise EngineError(f"{what}: prompt has token ids {bad[:8]} outside the vocabulary [0, {self.vocab})")
        if len(prompt) >= self.max_context:
            raise EngineError(
                f"{what}: prompt has {len(prompt)} tokens, leaving no room for a new one in max_context "
                f"{self.max_context}"
            )
        if sampling.stop and self.tokenizer is None:
            raise EngineError(f"{what}: sampling.stop (stop strings) needs an engine made with a tokenizer")
        limit = self.max_context - len(prompt)
        max_tokens = max_tokens or sampling.max_tokens or self.default_max_tokens or limit
        stop_ids = tuple(self.default_stop if sampling.stop_token_ids is None else sampling.stop_token_ids)
        seed = int(self._seeds.integers(2**32)) if sampling.seed is None else int(sampling.seed)
        media = as_media(media, f"{what}: media")
        if media is not None and inputs_embeds is not None:
            raise EngineError(f"{what}: give media or inputs_embeds, not both")
        if media is not None and getattr(self.model, "vision", None) is None:
            name = getattr(getattr(self.model, "cfg", None), "name", type(self.model).__name__)
            raise EngineError(f"{what}: media given but model {name!r} has no vision tower (no vision_config)")
        embeds = None
        if inputs_embeds is not None:
            embeds = np.asarray(inputs_embeds, np.float32)
            if embeds.shape != (len(prompt), self.text.cfg.hidden_size):
                raise EngineError(
                    f"{what}: inputs_embeds has shape {embeds.shape}, expected ({len(prompt)}, "
                    f"{self.text.cfg.hidden_size})"
                )
        keys, runs = media_keys(prompt, media, self.pad_id, what)
        if embeds is not None:
            keys = [("embeds", rid, i) for i in range(len(prompt))]  # never shared
        request = Request(
            id=rid,
            prompt=prompt,
            sampling=sampling,
            max_tokens=int(min(max_tokens, limit)),
            stop_ids=stop_ids,
            seed=seed,
            media=media,
            embeds=embeds,
            keys=keys,
            runs=runs,
            logprobs=[] if sampling.logprobs is not None else None,
            guide=guide,
            on_update=on_update,
        )
        smp.slot_row(sampling, seed, request.max_tokens, stop_ids, self.bias_width, self.stop_width)  # size check
        request.times["submitted"] = time.perf_counter()
        with self._lock:
            self.waiting.append(request)
        self._notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request``: it frees its slot at the next step boundary (``finish_reason`` ``"cancelled"``)."""
        request.cancel_requested = True
        self._notify()

    @property
    def idle(self) -> bool:
        """No request waiting or running."""
        return not self.waiting and all(s is None for s in self.slots)

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while not self.idle:
            self.step()

    # ----------------------------------------------------------------------------------------------------
    # One step
    # ----------------------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Cancellations, admissions, prefill within the budget, one decode window. Returns the requests that
        got tokens or finished in this step."""
        touched: dict[int, Request] = {}
        with use_mesh(self.mesh):
            self._cancellations(touched)
            self._admit()
            self._prefill(touched)
            self._decode(touched)
        for r in touched.values():
            if r.on_update is not None:
                r.on_update(r)
        return list(touched.values())

    # ----------------------------------------------------------------------------------------------------
    # Background loop (the server)
    # ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Step in a background thread whenever requests are waiting or running; :meth:`submit` and
        :meth:`cancel` may then be called from any thread. A step that raises fails every request in the
        engine (``finish_reason`` ``"error"``, ``request.error`` the message) and the loop goes on."""
        if getattr(self, "_thread", None) is not None:
            return
        self._running = True
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="k25jax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the background loop (requests still running stay as they are)."""
        thread = getattr(self, "_thread", None)
        if thread is None:
            return
        self._running = False
        self._wake.set()
        thread.join()
        self._thread = None

    def _notify(self) -> None:
        wake = getattr(self, "_wake", None)
        if wake is not None:
            wake.set()

    def _loop(self) -> None:
        while self._running:
            if self.idle:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 (report to every request, keep serving)
                self._fail_all(f"{type(err).__name__}: {err}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            failed = list(self.waiting) + [r for r in self.slots if r is not None]
            self.waiting.clear()
        for r in failed:
            r.error = message
            self._finish(r, "error", None)
        self.slots = [None] * self.max_slots
        self.ss = self._place(steps.SlotState.empty(self.max_slots, self.vocab))
        self.index = PrefixIndex(self.max_slots, self.index.block_size)
        for r in failed:
            if r.on_update is not None:
                r.on_update(r)

    def _cancellations(self, touched) -> None:
        with self._lock:
            for r in [r for r in self.waiting if r.cancel_requested]:
                self.waiting.remove(r)
                self._finish(r, "cancelled", None)
                touched[r.id] = r
        for r in self.slots:
            if r is not None and r.cancel_requested and not r.finished:
                self._finish(r, "cancelled", None)
                touched[r.id] = r
        for slot, r in enumerate(self.slots):
            if r is not None and r.finished:
                self._free(slot)

    def _free(self, slot: int) -> None:
        r = self.slots[slot]
        self.ss = self.fns.release(self.ss, slot)
        # The row holds the prompt's written part and every drawn token but the last (never fed back).
        fed = r.written + max(len(r.drawn) - 1, 0) if r.written == len(r.prompt) else r.written
        self.index.set_content(slot, (r.keys + r.drawn)[:fed] if self.reuse_prefixes else [])
        self.index.touch(slot)
        self.slots[slot] = None

    def _admit(self) -> None:
        free = [s for s, r in enumerate(self.slots) if r is None]
        while free:
            with self._lock:
                if not self.waiting:
                    return
                r = self.waiting.popleft()
            limit = len(r.prompt) - 1  # at least one prompt token runs: it gives the first token's logits
            slot, reuse, source = self.index.choose(r.keys, free, limit if self.reuse_prefixes else 0)
            reuse = cut_to_runs(reuse, r.runs)
            free.remove(slot)
            if source is not None and reuse > 0:
                self.index.truncate(slot, 0)
                self.cache = self.fns.copy_prefix(self.cache, source, slot, reuse)
            self.index.truncate(slot, reuse)
            self.index.touch(slot)
            row = smp.slot_row(r.sampling, r.seed, r.max_tokens, r.stop_ids, self.bias_width, self.stop_width)
            ids = np.full((bucket(len(r.prompt)),), smp.NO_BIAS, np.int32)
            ids[: len(r.prompt)] = r.prompt
            self.cache, self.ss, self.params = self.fns.admit(
                self.cache, self.ss, self.params, slot, row, jnp.asarray(ids), reuse
            )
            r.slot, r.written, r.cached_tokens = slot, reuse, reuse
            self.stats["cached_tokens"] += reuse
            self.slots[slot] = r
            self._vision(r)

    def _vision(self, r: Request) -> None:
        """The embeddings of the prompt's part after the reused prefix, when it carries media or embeds."""
        suffix = r.prompt[r.written :]
        if r.embeds is not None:
            r.suffix_embeds = jnp.asarray(r.embeds[r.written :])
            return
        items = [k for start, _, k in r.runs if start >= r.written]
        if not items:
            return
        ids = np.zeros((1, len(suffix)), np.int32)
        ids[0] = suffix
        r.suffix_embeds = steps.media_embeds(self.model, ids, [select_items(r.media, items)], f"request {r.id}")[0]

    def _prefill(self, touched) -> None:
        """Prompt chunks within the budget, in rounds: each round takes the next chunk of every slot still
        prefilling (oldest request first) and runs those of one form and finality as one batch."""
        budget = self.prefill_budget
        spent = 0
        pending = sorted((r for r in self.slots if r is not None and r.written < len(r.prompt)), key=lambda r: r.id)
        while pending:
            chunks = []
            for r in pending:
                if budget is not None and spent >= budget and (spent > 0 or chunks):
                    break
                n = min(len(r.prompt) - r.written, self.prefill_chunk)
                chunks.append((r, r.written, n))
                spent += n
            if not chunks:
                return
            groups: dict[tuple[str, bool], list] = {}
            for r, start, n in chunks:
                groups.setdefault(("full" if start == 0 else "absorbed", start + n == len(r.prompt)), []).append(
                    (r, start, n)
                )
            for (form, final), group in groups.items():
                self._prefill_group(group, form, final, touched)
            if budget is not None and spent >= budget:
                return
            pending = [r for r in pending if r.written < len(r.prompt) and not r.finished]

    def _width(self, rows: int) -> int:
        """The batch a step of ``rows`` slots runs at: a power of two, at most ``max_slots``."""
        return min(bucket(rows, 1), self.max_slots)

    def _span(self, positions: int) -> int:
        """The cache positions a step reaching ``positions`` gathers and attends over: a power of two, at least
        128, at most ``max_context``."""
        return min(self.max_context, bucket(positions, 128))

    def _padded_rows(self, slots: list[int]) -> list[int]:
        """``slots`` then other slots, up to :meth:`_width`: batch sizes, hence compilations, repeat."""
        width = self._width(len(slots))
        return slots + [s for s in range(self.max_slots) if s not in slots][: width - len(slots)]

    def _prefill_group(self, group, form: str, final: bool, touched) -> None:
        # Padded with rows of other slots and no tokens, which change nothing.
        taken = self._padded_rows([r.slot for r, _, _ in group])
        P = len(taken)
        T = bucket(max(n for _, _, n in group))
        ids = np.zeros((P, T), np.int32)
        for p, (r, start, n) in enumerate(group):
            ids[p, :n] = r.prompt[start : start + n]
        embeds = mask = None
        if any(r.suffix_embeds is not None for r, _, _ in group):
            D = self.text.cfg.hidden_size
            parts, valid = [], np.zeros((P, T), bool)
            for p in range(P):
                r, start, n = group[p] if p < len(group) else (None, 0, 0)
                if r is None or r.suffix_embeds is None:
                    parts.append(jnp.zeros((T, D), self.text.dtype))
                    continue
                off = start - r.cached_tokens
                part = r.suffix_embeds[off : off + n].astype(self.text.dtype)
                parts.append(jnp.pad(part, ((0, T - n), (0, 0))))
                valid[p, :n] = True
            embeds, mask = jnp.stack(parts), jnp.asarray(valid)
        n_lp = self.max_logprobs if final and any(r.logprobs is not None for r, _, _ in group) else None
        bitmask = None
        if final and any(r.guide is not None for r, _, _ in group):
            bitmask = np.full((P, self.mask_words), -1, np.int32)
            for p, (r, _, _) in enumerate(group):
                if r.guide is not None:
                    r.guide.fill(bitmask[p])
            bitmask = jnp.asarray(bitmask)
        slots = jnp.asarray(taken, jnp.int32)
        lengths = jnp.asarray([n for _, _, n in group] + [0] * (P - len(group)), jnp.int32)
        # Positions the chunk reads or writes: every row's start plus the padded chunk.
        span = self._span(max(start for _, start, _ in group) + T)
        self.cache, self.ss, out = self.fns.prefill_chunk(
            self.state, self.cache, self.ss, self.params, slots, jnp.asarray(ids), lengths, embeds, mask, bitmask,
            form=form, final=final, span=span, n_logprobs=n_lp,
        )  # fmt: skip
        self.stats["prefill_chunks"] += 1
        for r, start, n in group:
            r.written = start + n
            self.stats["prefill_tokens"] += n
            if self.reuse_prefixes:
                self.index.set_content(r.slot, r.keys[: r.written])
        if not final:
            return
        host = jax.device_get(out)
        now = time.perf_counter()
        for p, (r, _, _) in enumerate(group):
            r.suffix_embeds = None
            r.times["first_token"] = now
            lps = [tuple(x[p] for x in host[2:])] if n_lp is not None and r.logprobs is not None else None
            self._emit(r, [int(host[0][p])], lps)
            touched[r.id] = r
            if bool(host[1][p]) and not r.finished:
                self._finish_on_device_stop(r)

    def _decode(self, touched) -> None:
        live = [r for r in self.slots if r is not None and r.written == len(r.prompt) and not r.finished]
        if not live:
            return
        n_lp = self.max_logprobs if any(r.logprobs is not None for r in live) else None
        guided = [r for r in live if r.guide is not None]
        steps_now = 1 if guided else self.decode_window
        # The live slots, padded with slots that are not live (their rows do not change).
        rows = self._padded_rows([r.slot for r in live])
        width = len(rows)
        longest = max(len(r.prompt) + len(r.drawn) for r in live)
        span = self._span(longest + steps_now + 1)
        bitmask = None
        if guided:  # the masks change with every token: one step per window
            bitmask = np.full((width, self.mask_words), -1, np.int32)
            for r in guided:
                r.guide.fill(bitmask[rows.index(r.slot)])
            bitmask = jnp.asarray(bitmask)
        self.cache, self.ss, out = self.fns.decode_window(
            self.state, self.cache, self.ss, self.params, jnp.asarray(rows, jnp.int32), bitmask,
            steps=steps_now, span=span, n_logprobs=n_lp,
        )  # fmt: skip
        host = jax.device_get(out)
        count, done, tokens = int(host[0]), host[1], host[2]
        self.stats["windows"] += 1
        self.stats["decode_steps"] += count
        for r in live:
            j = rows.index(r.slot)
            column = tokens[:count, j]
            new = [int(t) for t in column if t != smp.NO_TOKEN]
            lps = None
            if n_lp is not None and r.logprobs is not None:
                lps = [tuple(x[i, j] for x in host[3:]) for i in range(count) if column[i] != smp.NO_TOKEN]
            if new:
                self._emit(r, new, lps)
                touched[r.id] = r
            if bool(done[j]) and not r.finished:
                self._finish_on_device_stop(r)

    # ----------------------------------------------------------------------------------------------------
    # Results
    # ----------------------------------------------------------------------------------------------------

    def _emit(self, r: Request, new: list[int], lps) -> None:
        """Append drawn tokens (host-side stop strings cut them and finish the request)."""
        r.drawn.extend(new)
        if r.finished:
            return
        for i, token in enumerate(new):
            r.tokens.append(token)
            if r.guide is not None:
                r.guide.advance(token)
            if lps is not None:
                chosen, top_ids, top_values = lps[i]
                k = r.sampling.logprobs
                alts = [(int(a), float(b)) for a, b in zip(top_ids[:k], top_values[:k], strict=True)]
                r.logprobs.append((float(chosen), alts))
            hit = self._stop_string(r)
            if hit is not None:
                self._finish(r, "stop", hit)
                return
            if r.guide is not None and r.guide.finished() and token not in r.stop_ids:
                self._finish(r, "stop", None)
                return

    def _stop_string(self, r: Request) -> str | None:
        if not r.sampling.stop:
            return None
        # Checked after every token, so a stop string is new in the text of the last few tokens.
        tail = self.tokenizer.decode(r.tokens[-(max(len(s) for s in r.sampling.stop) + 8) :])
        return next((s for s in r.sampling.stop if s in tail), None)

    def _finish_on_device_stop(self, r: Request) -> None:
        last = r.tokens[-1] if r.tokens else None
        if last is not None and last in r.stop_ids:
            self._finish(r, "stop", last)
        else:
            self._finish(r, "length", None)

    def _finish(self, r: Request, reason: str, stop_reason) -> None:
        if r.finished:
            return
        r.finished, r.finish_reason, r.stop_reason = True, reason, stop_reason
        r.times["finished"] = time.perf_counter()

    # ----------------------------------------------------------------------------------------------------
    # Compiling ahead of traffic
    # ----------------------------------------------------------------------------------------------------

    def warmup_shapes(self, max_length: int = 1024) -> dict[str, list[tuple[int, ...]]]:
        """The compiled-step shapes plain traffic meets while every sequence (prompt plus new tokens) stays
        within ``max_length`` positions: ``"prefill"``: ``(rows, chunk)`` of the whole-prompt final chunks
        (rows: the batch of prompts prefilled together; chunk: the bucketed prompt length); ``"decode"``:
        ``(rows, span)`` of the decode windows (rows: live slots, bucketed; span: cache positions attended).

        Rows are powers of two up to ``max_slots``; chunks powers of two from 16 up to ``prefill_chunk`` (and
        ``max_length``); spans powers of two from 128 up to ``max_context`` (and ``max_length``). With prefix reuse on
        (``block_size > 0``), ``"prefill_after_prefix"``: ``(rows, chunk, span)`` of a prompt's rest after a reused
        prefix (the absorbed form over the cache). Not covered (they compile when first met): prompts longer than
        one chunk, logprobs, guided decoding, media (the vision tower compiles per grid)."""
        limit = min(int(max_length), self.max_context)
        if limit < 2:
            raise EngineError(f"engine: warmup max_length must be >= 2, got {max_length}")
        rows = sorted({self._width(n) for n in range(1, self.max_slots + 1)})
        # bucket(n, 16) for every chunk length n up to the longest, likewise the spans: each power of two once
        chunks = sorted({bucket(n) for n in _powers_up_to(min(self.prefill_chunk, limit - 1))})
        spans = sorted({self._span(n) for n in _powers_up_to(limit)})
        return {
            "prefill": [(P, T) for P in rows for T in chunks],
            "decode": [(P, S) for P in rows for S in spans],
            # after a reused prefix (block_size > 0): the rest of the prompt in absorbed form over span positions
            "prefill_after_prefix": [(P, T, S) for P in rows for T in chunks for S in spans if T <= S]
            if self.reuse_prefixes
            else [],
        }

    def warmup(self, max_length: int = 1024, *, progress: bool = True) -> dict:
        """Compile the prefill and decode steps of :meth:`warmup_shapes` now, so the first requests of each
        batch size do not wait for the compiler (a few seconds per shape on a CPU for a small model).

        Only on an idle engine. Every call runs with no live rows: the prefill chunks carry no tokens and the
        decode windows find nothing to do, so the cache and the slots are unchanged; the compiled code is what
        later steps of those shapes reuse. Returns ``{"shapes": n, "seconds": s}``."""
        if not self.idle:
            raise EngineError("engine: warmup() needs an idle engine (no request waiting or running)")
        shapes = self.warmup_shapes(max_length)
        work = [("prefill", P, T, self._span(T)) for P, T in shapes["prefill"]]
        work += [("absorbed", *s) for s in shapes["prefill_after_prefix"]]
        work += [("decode", P, 0, S) for P, S in shapes["decode"]]
        from tqdm.auto import tqdm

        start = time.perf_counter()
        row = smp.slot_row(THINKING, 0, 1, (), self.bias_width, self.stop_width)
        with use_mesh(self.mesh):
            for T in sorted({T for _, T in shapes["prefill"]}):  # a free slot's settings: rewritten on admission
                self.cache, self.ss, self.params = self.fns.admit(
                    self.cache, self.ss, self.params, 0, row, jnp.zeros((T,), jnp.int32), 0
                )
            for kind, P, T, span in tqdm(work, desc="engine warm-up", unit="shape", disable=not progress):
                slots = jnp.arange(P, dtype=jnp.int32)
                if kind == "decode":
                    self.cache, self.ss, out = self.fns.decode_window(
                        self.state, self.cache, self.ss, self.params, slots, None,
                        steps=self.decode_window, span=span, n_logprobs=None,
                    )  # fmt: skip
                else:
                    self.cache, self.ss, out = self.fns.prefill_chunk(
                        self.state, self.cache, self.ss, self.params, slots, jnp.zeros((P, T), jnp.int32),
                        jnp.zeros((P,), jnp.int32), None, None, None, form="full" if kind == "prefill" else "absorbed",
                        final=True, span=span, n_logprobs=None,
                    )  # fmt: skip
                jax.block_until_ready(out)
        return {"shapes": len(work), "seconds": time.perf_counter() - start}

    # ----------------------------------------------------------------------------------------------------

    def grow(self, max_context: int) -> None:
        """More positions per slot (contents kept); only between steps."""
        if max_context > self.max_context:
            self.cache = self.fns.grow(self.cache, int(max_context))
            self.max_context = int(max_context)

    def refresh(self) -> None:
        """Take the model's current parameters (after training or ``set_run`` of the same structure)."""
        graphdef, self.state = nnx.split(self.text)
        if graphdef != self.graphdef:
            self.graphdef, self.fns = graphdef, steps.compiled(graphdef)


def _powers_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= ``n``."""
    return [2**k for k in range(max(int(n) - 1, 0).bit_length() + 1)]
