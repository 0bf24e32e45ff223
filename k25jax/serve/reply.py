"""Generated token ids to an assistant message, streamed: reasoning, content and tool-call deltas, then the final
message, for the OpenAI / Anthropic endpoints.

:class:`ReplyStream` decodes tokens incrementally (a UTF-8 character split across tokens waits for its last
byte) and feeds the text to :class:`k25jax.chat_reply.ReplyParser`, the one reply state machine (``k25jax.chat.parse``
is the same parser fed the whole text), so streaming and non-streaming answers agree byte for byte.

What a streaming client sees:

- ``{"reasoning_content": str}`` and ``{"content": str}`` pieces as they come; text that could still begin a
  marker (``<``, ``<|tool_ca``, ``[EO``...) waits for the next token;
- each tool call whole, once its ``<|tool_call_end|>`` (or another marker that ends it) shows it valid: a header
  delta ``{"tool_call": {"index", "id", "name"}}`` then one ``{"tool_call": {"index", "arguments"}}`` with all of
  its arguments. A call that the final message drops (cut by max_tokens, no name, arguments not a JSON object)
  is never streamed, so for every outcome the concatenated deltas equal the final message's fields;
- nothing for stop tokens (``<|im_end|>``, ``[EOS]``) or anything after them;
- nothing for the other special tokens (``<|reserved_token_N|>``, ``<|media_pad|>``, ``[BOS]``...) unless
  ``skip_special_tokens=False`` (vLLM's field, default true): the reply grammar's markers above always count.

``index`` counts the calls returned in this reply from 0 (the OpenAI stream index); the id's IDX is what the
model wrote (an id that is not ``functions.NAME:IDX`` becomes ``functions.NAME:{first_call_index + index}``).
Parse the reply whether or not the request declared tools: the markers are never left in the text.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from k25jax.chat_reply import END_THINK, ReplyParser, skipped_special_ids


class ReplyStream:
    """Incremental parse of one generated reply: :meth:`feed` token ids as they come, :meth:`finish` once."""

    def __init__(self, tokenizer, *, thinking: bool, first_call_index: int = 0, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self._skip = skipped_special_ids(tokenizer) if skip_special_tokens else frozenset()
        self.thinking = thinking
        self.reasoning_tokens = 0  # generated tokens that were reasoning (the closing </think> included)
        self._parser = ReplyParser(thinking=thinking, first_call_index=first_call_index)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._message: dict | None = None

    def feed(self, token_ids: Sequence[int]) -> list[dict]:
        """Deltas for newly generated tokens, in order (see the module docstring for their shapes). Tokens after
        a stop token are ignored."""
        if self._message is not None:
            raise RuntimeError("ReplyStream.feed after finish")
        parser, deltas = self._parser, []
        for token in token_ids:
            if parser.done:
                break
            was_reasoning = parser.reasoning_open
            if int(token) in self._skip:  # no text, but a generated token of the reasoning all the same
                self.reasoning_tokens += was_reasoning
                continue
            text = self._decoder.decode(self.tokenizer.decode_bytes([int(token)]))
            deltas += parser.push(text)
            still = parser.reasoning_open and not parser.done
            if was_reasoning and (still or parser.reasoning_ended_by == END_THINK):
                self.reasoning_tokens += 1
        return _merge(deltas)

    def finish(self, finish_reason: str) -> tuple[list[dict], dict]:
        """Flush held-back text; return the last deltas and the final message ``{"role": "assistant",
        "reasoning_content", "content", "tool_calls": [{"id", "type": "function", "function": {"name",
        "arguments"}}], "errors", "finish_reason"}``. ``finish_reason`` ``"stop"`` becomes ``"tool_calls"`` when
        there are calls; ``"length"`` (and any other) stays: the complete calls are returned, a cut one dropped."""
        if self._message is not None:
            return [], self._message
        parser = self._parser
        deltas = [] if parser.done else parser.push(self._decoder.decode(b"", final=True))
        deltas += parser.finish()
        if finish_reason == "stop" and parser.tool_calls:
            finish_reason = "tool_calls"
        self._message = {
            "role": "assistant",
            "reasoning_content": parser.reasoning_content,
            "content": parser.content,
            "tool_calls": list(parser.tool_calls),
            "errors": list(parser.errors),
            "finish_reason": finish_reason,
        }
        return _merge(deltas), self._message


def parse_reply(
    tokenizer, token_ids: Sequence[int], *, thinking: bool, finish_reason: str = "stop", skip_special_tokens=True
) -> dict:
    """The final message of a whole reply: :class:`ReplyStream` fed every token, then finished."""
    stream = ReplyStream(tokenizer, thinking=thinking, skip_special_tokens=skip_special_tokens)
    stream.feed(token_ids)
    return stream.finish(finish_reason)[1]


def _merge(deltas: list[dict]) -> list[dict]:
    """Adjacent text deltas of one kind joined (pieces from several tokens of one :meth:`ReplyStream.feed`)."""
    out: list[dict] = []
    for d in deltas:
        key = next(iter(d))
        if key != "tool_call" and out and key in out[-1]:
            out[-1] = {key: out[-1][key] + d[key]}
        else:
            out.append(d)
    return out
