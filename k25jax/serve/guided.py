"""Guided decoding with llguidance: JSON schemas and Kimi tool-call sections enforced as a token mask per slot.

A guide (:class:`k25jax.serve.engine.Guide`) wraps an llguidance ``LLMatcher``: before each token the engine
asks it for the allowed-token bitmask of its slot, and feeds it the drawn token. The grammars are llguidance's
Lark dialect with its ``%json`` schemas and the tokenizer's special tokens (``<|tool_call_begin|>``, ...), so the
arguments of a forced tool call always validate against the declared schema. Nothing is hand-parsed here.

In thinking mode the model reasons before it answers: the grammar applies from the ``</think>`` that closes the
reasoning on (the reasoning itself is free text). In instant mode the prompt already ends with
``<think></think>`` and the grammar applies from the first token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

END_THINK = "</think>"
_TOOL_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>")
_TOKENIZERS: dict[int, object] = {}


class GuideError(ValueError):
    """A schema or tool list llguidance cannot compile; the message names the field."""


def ll_tokenizer(tokenizer, vocab_size: int):
    """The llguidance tokenizer of a ``k25jax.Tokenizer`` (cached: building one takes about a second)."""
    from llguidance.tiktoken import lltokenizer_from_encoding

    key = id(tokenizer)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = lltokenizer_from_encoding(
            tokenizer._enc, n_vocab=vocab_size, eos_token=tokenizer.stop_ids[0]
        )
    return _TOKENIZERS[key]


class GrammarGuide:
    """A guide over one llguidance matcher, open from the start or from the first ``</think>``."""

    def __init__(self, matcher, tokenizer, *, after_thinking: bool):
        self.matcher = matcher
        self.tokenizer = tokenizer
        self.open = not after_thinking
        self.reasoning: list[int] = []
        # While reasoning, the tool-call markers are forbidden: a call begun inside the thought would escape the
        # grammar (it opens only at ``</think>``).
        self.closed_ids = [tokenizer.token_id(m) for m in _TOOL_MARKERS] if after_thinking else []

    def fill(self, row: np.ndarray) -> None:
        if not self.open:
            row[:] = -1
            for t in self.closed_ids:
                row[t // 32] &= np.int32(~np.uint32(1 << (t % 32)).view(np.int32))
            return
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.size * row.itemsize)

    def advance(self, token: int) -> None:
        if not self.open:
            self.reasoning.append(token)
            self.open = self.tokenizer.decode(self.reasoning[-8:]).endswith(END_THINK)
            return
        if not self.matcher.consume_token(token):
            raise GuideError(f"guided decoding: token {token} rejected: {self.matcher.get_error()}")

    def finished(self) -> bool:
        return self.open and self.matcher.is_stopped()


def _matcher(lark: str, tokenizer, vocab_size: int, field: str):
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
    except Exception as err:  # noqa: BLE001 (llguidance raises plain exceptions)
        raise GuideError(f"{field}: {err}") from None
    if matcher.is_error():
        raise GuideError(f"{field}: {matcher.get_error()}")
    return matcher


def _json(schema: Mapping | None) -> str:
    schema = dict(schema) if schema else {"type": "object"}
    schema.setdefault("x-guidance", {"whitespace_flexible": False})
    return "%json " + json.dumps(schema)


def json_guide(tokenizer, vocab_size: int, schema: Mapping | None, *, thinking: bool) -> GrammarGuide:
    """The reply's content is one JSON value valid against ``schema`` (None: any JSON object), then
    ``<|im_end|>``: OpenAI's ``response_format`` ``json_schema`` / ``json_object``."""
    lark = f"start: body <|im_end|>\nbody: {_json(schema)}\n"
    matcher = _matcher(lark, tokenizer, vocab_size, "response_format.json_schema.schema")
    return GrammarGuide(matcher, tokenizer, after_thinking=thinking)


def tool_call_guide(
    tokenizer,
    vocab_size: int,
    tools: Sequence[Mapping],
    *,
    name: str | None = None,
    parallel: bool = True,
    thinking: bool,
) -> GrammarGuide:
    """The reply is a tool-call section: one call (``parallel`` False, or a named ``name``) or several, each
    ``functions.NAME:IDX`` with arguments valid against that function's ``parameters``, then ``<|im_end|>``
    (OpenAI's ``tool_choice`` ``required`` or ``{"type": "function", "function": {"name": ...}}``)."""
    functions = [t.get("function", t) for t in tools]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise GuideError(f"tool_choice.function.name: {name!r} is not among the declared tools")
    if not functions:
        raise GuideError("tools: tool_choice needs at least one declared function")
    rules, alternatives = [], []
    for i, f in enumerate(functions):
        fname = f.get("name")
        if not isinstance(fname, str) or not fname:
            raise GuideError(f"tools[{i}].function.name: missing")
        rules.append(
            f'call{i}: <|tool_call_begin|> "functions.{fname}:" INDEX <|tool_call_argument_begin|> '
            f"args{i} <|tool_call_end|>\nargs{i}: {_json(f.get('parameters'))}"
        )
        alternatives.append(f"call{i}")
    calls = "call+" if parallel and name is None else "call"
    lark = (
        f"start: <|tool_calls_section_begin|> {calls} <|tool_calls_section_end|> <|im_end|>\n"
        f"call: {' | '.join(alternatives)}\n" + "\n".join(rules) + "\nINDEX: /[0-9]{1,4}/\n"
    )
    matcher = _matcher(lark, tokenizer, vocab_size, "tools")
    return GrammarGuide(matcher, tokenizer, after_thinking=thinking)
