"""Parsing a generated K2.5 reply into reasoning, content and tool calls (``chat-format.md``), in one incremental
state machine shared by :func:`parse` and the server's streaming ``k25jax.serve.reply.ReplyStream``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

IM_END = "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_ARGS, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


# --------------------------------------------------------------------------------------------------------
# Parsing replies
# --------------------------------------------------------------------------------------------------------

# The reply grammar: ``reasoning</think>content`` (the prompt opened ``<think>``; with thinking off it closed it
# too and everything is content), tool-call sections anywhere in the content,
# ``<|tool_calls_section_begin|>`` + calls + ``<|tool_calls_section_end|>``, each call
# ``<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>``, and a stop
# (``<|im_end|>`` or ``[EOS]``) after which nothing counts. One incremental parser, :class:`ReplyParser`, reads
# it from decoded text (markers by name, as the tokenizer decodes special tokens); :func:`parse` is that parser
# fed the whole text at once, and ``k25jax.serve.reply.ReplyStream`` feeds it token by token.
EOS = "[EOS]"
MARKERS = (THINK, END_THINK, SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_ARGS, CALL_END, IM_END, EOS)
# No marker contains another, so the leftmost complete marker in a buffer is the one a one-shot scan finds, and a
# buffer's tail that is a proper prefix of a marker is all that ever has to wait for more text.
_MARKER_PREFIXES = frozenset(m[:i] for m in MARKERS for i in range(1, len(m)))
_LONGEST_PREFIX = max(len(m) for m in MARKERS) - 1


@dataclasses.dataclass
class Reply:
    """A parsed assistant reply. ``tool_calls`` entries are OpenAI-shaped:
    ``{"id", "type": "function", "function": {"name", "arguments"}}`` with ``arguments`` a JSON object's text
    (always valid JSON: a call whose arguments are not is dropped). ``errors`` lists what was malformed and how
    it was recovered (empty for a well-formed reply)."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[dict] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def message(self) -> dict:
        """The reply as an assistant message for the next :func:`render`."""
        m: dict[str, Any] = {"role": "assistant", "content": self.content, "reasoning_content": self.reasoning_content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m


def parse(text: str, *, thinking: bool = True) -> Reply:
    """Split generated text (decoded with special tokens) into reasoning, content and tool calls.

    ``thinking``: whether the prompt opened a thought (``<think>``). Then the text up to ``</think>`` is the
    reasoning, or up to the first tool-call section when a section comes before any ``</think>`` (the call is
    returned, the thought ends there), or all of it when neither comes. With thinking off everything is content.
    Never raises; the rules for malformed output are :class:`ReplyParser`'s.
    """
    parser = ReplyParser(thinking=thinking)
    parser.push(text)
    parser.finish()
    return parser.reply()


def skipped_special_ids(tokenizer) -> frozenset[int]:
    """The special token ids ``skip_special_tokens`` leaves out of reply text: every one but the reply grammar's
    :data:`MARKERS` (``<think>``, the tool-call markers, the stop tokens), e.g. ``<|reserved_token_N|>``,
    ``<|media_pad|>``, ``[BOS]``."""
    names = getattr(tokenizer, "special_names", {})
    return frozenset(int(i) for i, name in names.items() if name not in MARKERS)


def parse_ids(ids: Sequence[int], tokenizer, *, thinking: bool = True, skip_special_tokens: bool = True) -> Reply:
    """:func:`parse` of generated token ids; special tokens other than the reply grammar's markers are left out
    unless ``skip_special_tokens`` is False (then they appear in the text by name)."""
    if skip_special_tokens:
        skip = skipped_special_ids(tokenizer)
        ids = [i for i in ids if int(i) not in skip]
    return parse(tokenizer.decode(ids), thinking=thinking)


@dataclasses.dataclass
class _Call:
    number: int  # counts every call begun in the reply, dropped ones too (for error messages)
    header: list[str] = dataclasses.field(default_factory=list)  # the id text, up to the argument marker
    arguments: list[str] | None = None  # None until the argument marker


class ReplyParser:
    """The incremental reply parser: :meth:`push` decoded text in pieces of any size, :meth:`finish` at the end.

    Each call returns deltas, in order: ``{"reasoning_content": str}``, ``{"content": str}``, and per returned
    tool call ``{"tool_call": {"index", "id", "name"}}`` then ``{"tool_call": {"index", "arguments"}}``.
    ``index`` counts returned calls from 0. Text is held back only while the buffer's tail could still begin a
    marker; a tool call is held back whole until it is known to be valid (its ``<|tool_call_end|>``), so the
    stream never shows a call that :meth:`reply` drops, and the concatenated deltas equal :meth:`reply`'s fields
    however the text was cut into pieces (errors too are the same for every cut).

    Rules for what a model can get wrong (each noted in ``errors``):

    - a call is returned when it has a name and its arguments are a JSON object (strict: no NaN/Infinity);
      arguments that are empty or missing (no argument marker) become ``{}``; anything else drops the call;
    - a call cut by the end of the text (max_tokens) is dropped; one ended by another marker instead of
      ``<|tool_call_end|>`` (a new call, a section marker, a stop) is returned if its arguments are valid;
    - the id is kept as written when it is ``functions.NAME:IDX``; the name is what lies between ``functions.``
      and ``:IDX`` (dots, dashes kept); an id without the namespace or a numeric index is rewritten to
      ``functions.NAME:{first_call_index + index}``;
    - a section (or a call) that opens before ``</think>`` ends the reasoning there: its calls are returned
      and the text after it is content; a later ``</think>`` is dropped as stray;
    - stray markers (a section end with no section, a call end or argument marker outside a call, ``<think>``
      other than a leading one, ``</think>`` after the reasoning or with thinking off) are dropped, and text
      inside a section but outside a call is dropped: no marker text reaches reasoning or content;
    - ``<think>`` and ``</think>`` inside a call's id or arguments are kept there as text;
    - a call outside a section is read as if its section were there.
    """

    def __init__(self, *, thinking: bool = True, first_call_index: int = 0):
        self.thinking = thinking
        self.first_call_index = first_call_index
        self.reasoning_open = thinking  # text goes to the reasoning
        self.reasoning_ended_by: str | None = None  # END_THINK, SECTION_BEGIN (a section or call) or None
        self.done = False  # a stop marker came, or finish() ran
        self.tool_calls: list[dict] = []
        self.errors: list[str] = []
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._pending = ""  # text not yet classified: a tail that may begin a marker
        self._section: str | None = None  # None, "explicit" or "implicit" (a call with no section begin)
        self._call: _Call | None = None
        self._junk: list[str] = []  # text inside a section, outside any call
        self._calls_begun = 0
        self._out: list[dict] = []

    # -- results ---------------------------------------------------------------------------------------
    @property
    def reasoning_content(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    def reply(self) -> Reply:
        return Reply(self.reasoning_content, self.content, list(self.tool_calls), list(self.errors))

    # -- input -----------------------------------------------------------------------------------------
    def push(self, text: str) -> list[dict]:
        """Deltas for ``text``, the next piece of the decoded reply (nothing after a stop marker counts)."""
        if self.done or not text:
            return []
        buf, start = self._pending + text, 0
        found = {m: buf.find(m) for m in MARKERS}  # each marker's next position at or after ``start``
        while not self.done:
            live = [(i, m) for m, i in found.items() if i >= 0]
            if not live:
                break
            i, marker = min(live)
            self._text(buf[start:i])
            start = i + len(marker)
            self._marker(marker)
            found = {m: (buf.find(m, start) if 0 <= j < start else j) for m, j in found.items()}
        if self.done:
            self._pending = ""
        else:
            rest = buf[start:]
            hold = 0
            if "<" in rest[-_LONGEST_PREFIX:] or "[" in rest[-_LONGEST_PREFIX:]:  # every marker begins so
                hold = next(
                    (k for k in range(min(len(rest), _LONGEST_PREFIX), 0, -1) if rest[-k:] in _MARKER_PREFIXES), 0
                )
            self._text(rest[: len(rest) - hold])
            self._pending = rest[len(rest) - hold :]
        return self._take()

    def finish(self) -> list[dict]:
        """Deltas for the held-back text; closes the reply (a call still open is dropped as cut)."""
        if self.done:
            return self._take()
        self._text(self._pending)
        self._pending = ""
        if self._call is not None:
            self._close_call(None)
        self._end_section()
        if self.reasoning_open:
            self.errors.append(f"no {END_THINK}: the reasoning was not closed")
        self.done = True
        return self._take()

    # -- the state machine -----------------------------------------------------------------------------
    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _emit(self, key: str, text: str) -> None:
        (self._reasoning if key == "reasoning_content" else self._content).append(text)
        if self._out and key in self._out[-1]:
            self._out[-1][key] += text
        else:
            self._out.append({key: text})

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._call is not None:
            (self._call.header if self._call.arguments is None else self._call.arguments).append(text)
        elif self._section is not None:
            self._junk.append(text)
        else:
            self._emit("reasoning_content" if self.reasoning_open else "content", text)

    def _marker(self, marker: str) -> None:
        call = self._call
        if call is not None:
            if marker in (THINK, END_THINK) or (marker == CALL_ARGS and call.arguments is not None):
                self._text(marker)  # inside a call these are text
                return
            if marker == CALL_ARGS:
                call.arguments = []
                return
            self._close_call(marker)
            if marker == CALL_END:
                if self._section == "implicit":
                    self._section = None
                return
        if marker in (IM_END, EOS):
            self._end_section()
            if self.reasoning_open:
                self.errors.append(f"no {END_THINK}: the reasoning was not closed")
            self.done = True
        elif marker == THINK:
            leading = self.reasoning_open and not self._reasoning and self._section is None
            if not leading:
                self.errors.append(f"stray {THINK} dropped")
        elif marker == END_THINK:
            if self.reasoning_open and self._section is None:
                self.reasoning_open, self.reasoning_ended_by = False, END_THINK
            elif not self.thinking:
                self.errors.append(f"{END_THINK} with thinking off dropped (the output is content)")
            else:
                self.errors.append(f"stray {END_THINK} dropped")
        elif marker == SECTION_BEGIN:
            if self._section == "explicit":
                self._flush_junk()
                self.errors.append("tool-call section begun again inside a section; marker dropped")
            else:
                self._end_reasoning_at_calls()
                self._section = "explicit"
        elif marker == SECTION_END:
            if self._section is None:
                self.errors.append("tool-call section end with no section begin dropped")
            self._flush_junk()
            self._section = None
        elif marker == CALL_BEGIN:
            if self._section is None:
                self._end_reasoning_at_calls()
                self.errors.append(f"tool call {self._calls_begun} outside a tool-call section; read as in one")
                self._section = "implicit"
            self._flush_junk()
            self._call = _Call(self._calls_begun)
            self._calls_begun += 1
        elif marker == CALL_ARGS:
            self.errors.append("tool-call argument marker outside a call dropped")
        elif marker == CALL_END:
            self.errors.append("tool-call end with no call begin dropped")

    def _end_reasoning_at_calls(self) -> None:
        if self.reasoning_open:
            self.reasoning_open, self.reasoning_ended_by = False, SECTION_BEGIN
            self.errors.append(f"no {END_THINK} before the tool calls: the reasoning ends there")

    def _flush_junk(self) -> None:
        junk, self._junk = "".join(self._junk), []
        if junk.strip():
            self.errors.append(f"text inside a tool-call section, outside any call, dropped: {junk[:80]!r}")

    def _end_section(self) -> None:
        self._flush_junk()
        if self._section == "explicit":
            self.errors.append("tool-call section not closed")
        self._section = None

    def _close_call(self, ended_by: str | None) -> None:
        """End the open call: ``ended_by`` is the marker that ended it (``<|tool_call_end|>`` when well formed),
        None when the text ran out (a cut call, dropped)."""
        call, self._call = self._call, None
        k = call.number
        if ended_by is None:
            self.errors.append(f"tool call {k} was cut before {CALL_END}; dropped")
            return
        if ended_by != CALL_END:
            self.errors.append(f"tool call {k} not closed ({ended_by} came before {CALL_END})")
        arguments = None if call.arguments is None else "".join(call.arguments)
        parsed = _parse_call("".join(call.header), arguments, k, self.errors)
        if parsed is None:
            return
        call_id, name, arguments = parsed
        index = len(self.tool_calls)
        if call_id is None:
            call_id = f"functions.{name}:{self.first_call_index + index}"
            self.errors.append(f"tool call {k} ({name}): id is not functions.NAME:IDX; set to {call_id}")
        self.tool_calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        self._out.append({"tool_call": {"index": index, "id": call_id, "name": name}})
        self._out.append({"tool_call": {"index": index, "arguments": arguments}})


def _parse_call(header: str, arguments: str | None, k: int, errors: list[str]) -> tuple[str | None, str, str] | None:
    """``(id, name, arguments)`` of a call's id text and argument text (None: no argument marker); the id is
    None when it is not ``functions.NAME:IDX`` (the caller numbers it). None, with the reason in ``errors``,
    when the call has no name or its arguments are not a JSON object."""
    call_id = header.strip()
    head, colon, idx = call_id.rpartition(":")
    numbered = bool(colon) and idx.isascii() and idx.isdigit()
    # ``functions.NAME:IDX``: the name is what lies between the namespace and the index, dots and dashes kept.
    name = (head if numbered else call_id).removeprefix("functions.")
    if not name:
        errors.append(f"tool call {k} has no function name; dropped")
        return None
    text, problem = _arguments(arguments)
    if text is None:
        errors.append(f"tool call {k} ({name}): {problem}; dropped")
        return None
    if problem:
        errors.append(f"tool call {k} ({name}): {problem}")
    well_formed = numbered and call_id.startswith("functions.")
    return (call_id if well_formed else None), name, text


def _arguments(raw: str | None) -> tuple[str | None, str | None]:
    """``(text, problem)``: the arguments' JSON text (stripped), ``{}`` for none, or None when they are not a
    JSON object."""
    if raw is None:
        return "{}", "no arguments marker; arguments set to {}"
    text = raw.strip()
    if not text:
        return "{}", "empty arguments set to {}"
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None, "arguments are not valid JSON"
    if not isinstance(value, dict):
        return None, "arguments are not a JSON object"
    return text, None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")
