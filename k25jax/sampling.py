"""Sampling settings and the math that turns logits into tokens, per row, so one compiled step serves a batch
of requests that each sample their own way.

:class:`Sampling` is what callers pass (``k25jax.generate``, the engine, the server). On device a batch of
requests becomes :class:`SlotParams`: one array per setting with a row per engine slot. The order of work on
the float32 logits of a row is:

1. ``logit_bias`` is added (OpenAI: a value per token id);
2. ``repetition_penalty`` (the transformers / vLLM rule) divides positive and multiplies negative logits of
   every token seen in the prompt or the output so far;
3. ``frequency_penalty`` * count and ``presence_penalty`` * (count > 0) are subtracted, counts over the output
   so far (OpenAI);
4. temperature 0 takes the argmax of these; otherwise they are divided by the temperature, and top-k, then
   top-p (nucleus, of the top-k renormalised), then min-p (probability >= ``min_p`` times the top one) keep
   a set of tokens (always at least the top one) to draw from.

A row's draw uses its own key, ``fold_in(key(seed), i)`` for its ``i``-th new token, so a seeded request
gives the same tokens whatever else runs beside it. Log-probabilities are those of the model itself (the
log-softmax of the raw logits, before any of the above), as OpenAI and vLLM report them.

Defaults follow the model card: thinking mode temperature 1.0, instant mode 0.6, top_p 0.95 (:data:`THINKING`,
:data:`INSTANT`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NO_TOKEN = -1  # padding of stop-id rows and of output buffers
NO_BIAS = 2**30  # padding id of logit-bias rows: out of range, so the scatter drops it


class SamplingError(ValueError):
    """A sampling setting out of range; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a request draws its tokens (see the module doc for the order of work).

    Attributes:
      temperature: 0 is greedy.
      top_p: nucleus mass in (0, 1]; 1 keeps all.
      top_k: keep the k most likely; 0 keeps all.
      min_p: keep tokens with probability >= min_p * the top probability; 0 keeps all.
      seed: the request's RNG seed (None: the caller picks one).
      presence_penalty, frequency_penalty: OpenAI's, in [-2, 2], over the tokens generated so far.
      repetition_penalty: > 0; 1 is off; over the prompt and the tokens generated so far.
      logit_bias: token id -> value added to its logit (OpenAI: [-100, 100]).
      max_tokens: most new tokens (None: the caller's default).
      stop: strings that end the reply (checked on the decoded text; needs a tokenizer).
      stop_token_ids: ids that end the reply, kept as its last token (None: ``<|im_end|>`` and ``[EOS]``).
      logprobs: None for no log-probabilities; n >= 0 for the chosen token's and the n most likely.
    """

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None
    logprobs: int | None = None

    def replace(self, **changes) -> Sampling:
        """A copy with ``changes`` (fields left None in ``changes`` are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def check(self, vocab_size: int | None = None, *, max_logprobs: int = 20) -> Sampling:
        """Raise :class:`SamplingError` naming the first field out of range; return self."""

        def bad(field, why):
            raise SamplingError(f"sampling.{field}: {why} (got {getattr(self, field)!r})")

        if not self.temperature >= 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 keeps all)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        for field in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, field) <= 2:
                bad(field, "must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1 is off)")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            bad("logprobs", f"must be in [0, {max_logprobs}]")
        if self.seed is not None and not 0 <= int(self.seed) < 2**32:
            bad("seed", "must be in [0, 2**32)")
        if isinstance(self.stop, str):
            raise SamplingError("sampling.stop: give a list of strings, not one string")
        for token, value in (self.logit_bias or {}).items():
            if vocab_size is not None and not 0 <= int(token) < vocab_size:
                raise SamplingError(f"sampling.logit_bias: token id {token} outside the vocabulary [0, {vocab_size})")
            if not -100 <= float(value) <= 100:
                raise SamplingError(f"sampling.logit_bias: value {value} for token {token} outside [-100, 100]")
        return self


THINKING = Sampling(temperature=1.0, top_p=0.95)  # model card, thinking mode
INSTANT = Sampling(temperature=0.6, top_p=0.95)  # model card, instant mode (thinking off)


def sampling_defaults(thinking: bool = True) -> Sampling:
    """The model card's settings: :data:`THINKING` (temperature 1.0, top_p 0.95) or, with thinking off,
    :data:`INSTANT` (temperature 0.6, top_p 0.95); top-k off in both."""
    return THINKING if thinking else INSTANT


def request_sampling(
    sampling: Sampling | None,
    *,
    temperature: float = THINKING.temperature,
    top_p: float = THINKING.top_p,
    top_k: int = 0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
) -> Sampling:
    """The settings of one request of the convenience calls (``k25jax.generate``, ``stream``, ``Session``):
    ``sampling``, or without it one built from ``temperature`` / ``top_p`` / ``top_k``; ``seed`` unless
    ``sampling`` names one; ``stop_token_ids`` replacing its stop ids when given."""
    s = sampling if sampling is not None else Sampling(temperature=temperature, top_p=top_p, top_k=top_k)
    if s.seed is None:
        s = s.replace(seed=seed % 2**32)
    if stop_token_ids is not None:
        s = s.replace(stop_token_ids=tuple(stop_token_ids))
    return s


# --------------------------------------------------------------------------------------------------------
# Per-slot arrays
# --------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotParams:
    """The sampling settings of ``B`` slots as arrays (leading dim ``B``): traced, so changing them never
    recompiles. ``bias_ids [B, NB]`` / ``bias_values`` hold each row's logit bias (padded with
    :data:`NO_BIAS`), ``stop_ids [B, NS]`` its stop ids (padded with :data:`NO_TOKEN`)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    seed: jax.Array
    max_tokens: jax.Array
    bias_ids: jax.Array
    bias_values: jax.Array
    stop_ids: jax.Array

    @classmethod
    def empty(cls, batch: int, bias_width: int, stop_width: int) -> SlotParams:
        return cls(**jax.device_put(_row_values(batch, bias_width, stop_width)))  # one transfer call, not 12

    def row(self, slot) -> SlotParams:
        """The ``[1, ...]`` settings of one slot (``slot`` may be traced)."""
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), self)

    def set_row(self, slot, values: SlotParams) -> SlotParams:
        """These settings with row ``slot`` replaced by ``values`` (``[1, ...]`` leaves)."""
        return jax.tree.map(
            lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v.astype(a.dtype), slot, 0), self, values
        )


def _row_values(batch: int, bias_width: int, stop_width: int) -> dict[str, np.ndarray]:
    return {
        "temperature": np.zeros(batch, np.float32),
        "top_p": np.ones(batch, np.float32),
        "top_k": np.zeros(batch, np.int32),
        "min_p": np.zeros(batch, np.float32),
        "presence": np.zeros(batch, np.float32),
        "frequency": np.zeros(batch, np.float32),
        "repetition": np.ones(batch, np.float32),
        "seed": np.zeros(batch, np.uint32),
        "max_tokens": np.ones(batch, np.int32),
        "bias_ids": np.full((batch, bias_width), NO_BIAS, np.int32),
        "bias_values": np.zeros((batch, bias_width), np.float32),
        "stop_ids": np.full((batch, stop_width), NO_TOKEN, np.int32),
    }


def slot_row(s: Sampling, seed: int, max_tokens: int, stop_ids: Sequence[int], bias_width: int, stop_width: int):
    """Host values (``[1, ...]`` numpy arrays, a :class:`SlotParams`) of one request's settings."""
    bias = dict(s.logit_bias or {})
    if len(bias) > bias_width:
        raise SamplingError(f"sampling.logit_bias: {len(bias)} entries, this engine takes at most {bias_width}")
    stops = list(stop_ids)
    if len(stops) > stop_width:
        raise SamplingError(f"sampling.stop_token_ids: {len(stops)} ids, this engine takes at most {stop_width}")
    v = _row_values(1, bias_width, stop_width)
    v["temperature"][0] = s.temperature
    v["top_p"][0] = s.top_p
    v["top_k"][0] = s.top_k
    v["min_p"][0] = s.min_p
    v["presence"][0] = s.presence_penalty
    v["frequency"][0] = s.frequency_penalty
    v["repetition"][0] = s.repetition_penalty
    v["seed"][0] = np.uint32(seed)
    v["max_tokens"][0] = max_tokens
    v["bias_ids"][0, : len(bias)] = [int(t) for t in bias]
    v["bias_values"][0, : len(bias)] = [float(x) for x in bias.values()]
    v["stop_ids"][0, : len(stops)] = stops
    return SlotParams(**v)


# --------------------------------------------------------------------------------------------------------
# Device math
# --------------------------------------------------------------------------------------------------------


def _col(x):
    """A per-row setting as a ``[B, 1]`` column (a scalar stays a scalar)."""
    x = jnp.asarray(x)
    return x[:, None] if x.ndim == 1 else x


def _ranked_filtered(logits: jax.Array, temperature, top_p, top_k, min_p=0.0) -> tuple[jax.Array, jax.Array]:
    """``(order, ranked)``: token ids by decreasing logit ``[B, V]`` and their temperature-scaled logits with the
    tokens outside top-k, then outside the top-p nucleus (of the top-k renormalised), then below min-p set to
    ``-inf``. Each setting is a scalar or one value per row."""
    temperature, top_p, top_k, min_p = (_col(x) for x in (temperature, top_p, top_k, min_p))
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(ranked.shape[-1])[None, :]
    ranked = jnp.where((top_k <= 0) | (rank < top_k), ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p) & (probs >= min_p * probs[:, :1])
    ranked = jnp.where(keep | (rank == 0), ranked, -jnp.inf)
    return order, ranked


def sample(logits: jax.Array, key: jax.Array, temperature, top_p, top_k) -> jax.Array:
    """Draw one token per row of ``logits [B, V]`` with one key for the batch: temperature, then top-k, then
    top-p (nucleus). Scalars are traced (changing them does not recompile). Temperature 0 returns the argmax.
    Returns ``[B]`` int32; the distribution drawn from is :func:`sampling_probs`."""
    logits = logits.astype(jnp.float32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        order, ranked = _ranked_filtered(logits, temperature, top_p, top_k)
        choice = jax.random.categorical(key, ranked, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, None)


def sampling_probs(logits: jax.Array, temperature, top_p, top_k, min_p=0.0) -> jax.Array:
    """The distribution a row draws from: float32 ``[B, V]`` in vocabulary order, ``softmax(logits /
    temperature)`` restricted by top-k, top-p and min-p in that order and renormalised (zero elsewhere);
    one-hot at the argmax for temperature 0."""
    logits = logits.astype(jnp.float32)
    if float(temperature) <= 0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    order, ranked = _ranked_filtered(logits, temperature, top_p, top_k, min_p)
    probs = jax.nn.softmax(ranked, axis=-1)
    return jnp.zeros_like(probs).at[jnp.arange(probs.shape[0])[:, None], order].set(probs)


def penalized(logits: jax.Array, params: SlotParams, counts: jax.Array, seen: jax.Array) -> jax.Array:
    """Steps 1-3 of the module doc on float32 ``logits [B, V]``: logit bias, repetition penalty (tokens in
    ``seen [B, V]`` (the prompt) or with ``counts [B, V]`` > 0 (the output)), frequency and presence penalties."""
    B = logits.shape[0]
    logits = logits.astype(jnp.float32)
    logits = logits.at[jnp.arange(B)[:, None], params.bias_ids].add(params.bias_values, mode="drop")
    used = counts > 0
    rep = params.repetition[:, None]
    logits = jnp.where(seen | used, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - params.frequency[:, None] * counts - params.presence[:, None] * used


def draw(logits: jax.Array, params: SlotParams, index: jax.Array) -> jax.Array:
    """One token per row of processed ``logits [B, V]`` (:func:`penalized`): the argmax for rows of temperature
    0, else a draw with the row's key ``fold_in(key(seed), index)`` from its filtered distribution."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        order, ranked = _ranked_filtered(logits, params.temperature, params.top_p, params.top_k, params.min_p)

        def one(seed, i, row):
            return jax.random.categorical(jax.random.fold_in(jax.random.key(seed), i), row)

        choice = jax.vmap(one)(params.seed, index, ranked)
        drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(params.temperature > 0), sampled, lambda _: greedy, None)


def logprobs(logits: jax.Array, tokens: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's log-probabilities (log-softmax of the raw ``logits [B, V]``): of ``tokens [B]`` and the ``n``
    most likely ids with theirs: ``(chosen [B], top_ids [B, n], top_logprobs [B, n])``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, jnp.maximum(tokens, 0)[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logp, n) if n else (logp[:, :0], jnp.zeros((logp.shape[0], 0), jnp.int32))
    return chosen, top_ids.astype(jnp.int32), top_values
