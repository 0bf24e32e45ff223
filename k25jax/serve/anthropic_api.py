"""The Anthropic Messages endpoint, ``POST /v1/messages``, on the same engine and reply parser as the OpenAI ones.

The request becomes an OpenAI-format message list for ``k25jax.chat.prepare``: ``system`` first, ``text`` and
``image`` blocks as content parts (base64 sources decoded here), ``tool_use`` blocks as the assistant's
``tool_calls``, ``thinking`` blocks as its ``reasoning_content``, ``tool_result`` blocks as tool messages.
``thinking: {"type": "enabled", "budget_tokens": N}`` closes the reasoning after N tokens (``</think>`` is
appended and the answer goes on); ``{"type": "disabled"}`` is instant mode; without it the model's default
(thinking) applies. Streams carry ``message_start``, ``ping``, per block ``content_block_start`` /
``content_block_delta`` (``thinking_delta``, ``text_delta``, ``input_json_delta``) / ``content_block_stop``,
then ``message_delta`` with the ``stop_reason`` and ``message_stop``. Errors are Anthropic-shaped.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from k25jax.serve import guided
from k25jax.serve.protocol import (
    APIError,
    Job,
    MediaFiles,
    anthropic_error_body,
    authorize,
    build_sampling,
    canonical_tool_ids,
    check_context,
    decode_base64,
    fetch_media,
    thinking_of,
    watching,
)

router = APIRouter(dependencies=[Depends(authorize)])


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageSource(_Model):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class TextBlock(_Model):
    type: Literal["text"]
    text: str


class ImageBlock(_Model):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: str
    name: str = Field(min_length=1)
    input: dict = Field(default_factory=dict)


def _blocks(value: Any) -> Any:
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


ResultContent = Annotated[
    list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]], BeforeValidator(_blocks)
]


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: ResultContent | None = None
    is_error: bool | None = None


class ThinkingBlock(_Model):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Model):
    type: Literal["redacted_thinking"]
    data: str | None = None


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class AnthropicMessage(_Model):
    role: Literal["user", "assistant"]
    content: Annotated[list[Block], BeforeValidator(_blocks)]


class AnthropicTool(_Model):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict = Field(default_factory=lambda: {"type": "object"})


class AnthropicToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)


class MessagesRequest(_Model):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Annotated[list[TextBlock], BeforeValidator(_blocks)] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    metadata: dict | None = None


# --------------------------------------------------------------------------------------------------------
# Request -> chat messages
# --------------------------------------------------------------------------------------------------------


async def _image(source: ImageSource, param: str, service) -> dict:
    if source.type == "base64":
        data = decode_base64(source.data, f"{param}.data")
    else:
        data = await fetch_media(source.url or "", f"{param}.url", service.allow_remote_media)
    return {"type": "image_url", "image_url": {"url": data}}


async def chat_messages(body: MessagesRequest, service) -> tuple[list[dict], dict[str, str]]:
    """The request as OpenAI-format messages, and ``messages[k].content[p]`` -> the block's path for errors."""
    out: list[dict] = []
    params: dict[str, str] = {}
    if body.system:
        out.append({"role": "system", "content": "".join(b.text for b in body.system)})
    for i, m in enumerate(body.messages):
        parts: list[tuple[dict, str | None]] = []

        def flush(role: str, parts=parts) -> None:
            if parts:
                k = len(out)
                for p, (_, where) in enumerate(parts):
                    if where is not None:
                        params[f"messages[{k}].content[{p}]"] = where
                out.append({"role": role, "content": [part for part, _ in parts]})
                parts.clear()

        if m.role == "assistant":
            text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
            thought = "".join(b.thinking for b in m.content if isinstance(b, ThinkingBlock))
            calls = [
                {
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)},
                }
                for b in m.content
                if isinstance(b, ToolUseBlock)
            ]
            message = {"role": "assistant", "content": text}
            if thought:
                message["reasoning_content"] = thought
            if calls:
                message["tool_calls"] = calls
            out.append(message)
            continue
        for j, b in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(b, TextBlock):
                parts.append(({"type": "text", "text": b.text}, None))
            elif isinstance(b, ImageBlock):
                parts.append((await _image(b.source, f"{where}.source", service), f"{where}.source"))
            elif isinstance(b, ToolResultBlock):
                flush("user")
                result: list[tuple[dict, str | None]] = []
                for q, c in enumerate(b.content or []):
                    inner = f"{where}.content[{q}]"
                    if isinstance(c, TextBlock):
                        result.append(({"type": "text", "text": c.text}, None))
                    else:
                        result.append((await _image(c.source, f"{inner}.source", service), f"{inner}.source"))
                k = len(out)
                for p, (_, w) in enumerate(result):
                    if w is not None:
                        params[f"messages[{k}].content[{p}]"] = w
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": [r for r, _ in result]})
            elif isinstance(b, ToolUseBlock | ThinkingBlock):
                raise APIError(
                    400, f"{where}.type: {b.type} blocks belong in assistant messages", param=f"{where}.type"
                )
        flush("user")
    return out, params


def _guide(body: MessagesRequest, service, tools: list[dict]):
    choice = body.tool_choice
    if choice is None or choice.type == "auto":
        return None, {}
    if choice.type == "none":
        return None, {service.section_begin: -100.0}
    if not tools:
        raise APIError(400, "tool_choice: forcing a tool call needs tools", param="tool_choice")
    if choice.type == "tool" and not choice.name:
        raise APIError(400, "tool_choice.name: required for type tool", param="tool_choice.name")
    name = choice.name if choice.type == "tool" else None
    parallel = not choice.disable_parallel_tool_use
    try:
        return service.guide_factory(guided.tool_call_guide, tools, name=name, parallel=parallel), {}
    except APIError as err:
        if err.param == "tool_choice.function.name":
            raise APIError(
                400, err.message.replace("tool_choice.function.name", "tool_choice.name"), param="tool_choice.name"
            ) from None
        raise


# --------------------------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------------------------


def _stop_reason(g, message: dict) -> tuple[str, str | None]:
    if message["tool_calls"] and g.finish_reason in ("stop", "length"):
        return ("tool_use" if g.finish_reason == "stop" else "max_tokens"), None
    if g.finish_reason == "length":
        return "max_tokens", None
    if isinstance(g.stop_reason, str):
        return "stop_sequence", g.stop_reason
    return "end_turn", None


def _input(arguments: str) -> dict:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _usage(g) -> dict:
    u = g.usage
    return {
        "input_tokens": u["prompt_tokens"],
        "output_tokens": u["completion_tokens"],
        "cache_read_input_tokens": u["prompt_tokens_details"]["cached_tokens"],
        "cache_creation_input_tokens": 0,
    }


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    service = request.app.state.service
    name = service.check_model(body.model)
    switch = {}
    if body.thinking is not None:  # "adaptive": thinking with no budget
        switch = {
            "thinking": {
                "type": "disabled" if body.thinking.type == "disabled" else "enabled",
                "budget_tokens": body.thinking.budget_tokens,
            }
        }
    thinking, budget = thinking_of(switch)
    tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}
        for t in body.tools or []
    ]
    for t in tools:
        if t["function"]["description"] is None:
            del t["function"]["description"]
    guide, bias = _guide(body, service, tools)
    fields = dict(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop_sequences,
        logit_bias=bias or None,
    )
    sampling = build_sampling(fields, thinking, names={"stop": "stop_sequences"})
    converted, params = await chat_messages(body, service)
    converted, calls = canonical_tool_ids(converted)
    files = MediaFiles()
    try:
        ids, media = await service.prepare(converted, tools or None, thinking, params, files)
    finally:
        files.close()
    limit = check_context(len(ids), body.max_tokens, service.max_context, "max_tokens", service.max_tokens_cap)
    [g] = service.start([Job(ids, media, sampling, limit, thinking, guide, budget)])
    pipe = service.pipeline(thinking=thinking, first_call_index=calls, stop=sampling.stop)
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(
            stream_events(g, pipe, msg_id, name),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    message = None
    async with watching(request, [g]):
        async for u in g.updates():
            if u.done:
                g.raise_error()
                message = pipe.finish(u.tokens, g.finish_reason, g.stop_reason)[1]
            else:
                pipe.feed(u.tokens)
    if g.finish_reason == "cancelled" or message is None:
        raise APIError(499, "the client closed the request", code="client_closed")
    content: list[dict] = []
    if message["reasoning_content"]:
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message["content"]:
        content.append({"type": "text", "text": message["content"]})
    for c in message["tool_calls"]:
        content.append(
            {
                "type": "tool_use",
                "id": c["id"],
                "name": c["function"]["name"],
                "input": _input(c["function"]["arguments"]),
            }
        )
    stop_reason, stop_sequence = _stop_reason(g, message)
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": name,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(g),
    }


def event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class BlockWriter:
    """Reply deltas -> content-block events: a block opens when its kind of delta first comes and closes when
    another kind comes (thinking, then text, then one block per tool call)."""

    def __init__(self):
        self.index = -1
        self.open: str | None = None

    def _start(self, kind: str, block: dict) -> list[str]:
        out = self.close()
        self.index += 1
        self.open = kind
        return out + [event("content_block_start", {"index": self.index, "content_block": block})]

    def close(self) -> list[str]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            out.append(
                event(
                    "content_block_delta", {"index": self.index, "delta": {"type": "signature_delta", "signature": ""}}
                )
            )
        self.open = None
        return out + [event("content_block_stop", {"index": self.index})]

    def write(self, deltas: list[dict]) -> list[str]:
        out: list[str] = []
        for d in deltas:
            if "reasoning_content" in d:
                if self.open != "thinking":
                    out += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta({"type": "thinking_delta", "thinking": d["reasoning_content"]}))
            elif "content" in d:
                if self.open != "text":
                    out += self._start("text", {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": d["content"]}))
            elif "id" in d["tool_call"]:
                c = d["tool_call"]
                out += self._start("tool_use", {"type": "tool_use", "id": c["id"], "name": c["name"], "input": {}})
            else:
                out.append(self._delta({"type": "input_json_delta", "partial_json": d["tool_call"]["arguments"]}))
        return out

    def _delta(self, delta: dict) -> str:
        return event("content_block_delta", {"index": self.index, "delta": delta})


async def stream_events(g, pipe, msg_id: str, name: str):
    usage = _usage(g)
    start = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": name,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 0},
    }
    yield event("message_start", {"message": start})
    yield event("ping", {})
    blocks = BlockWriter()
    try:
        async for u in g.updates():
            if not u.done:
                out = blocks.write(pipe.feed(u.tokens))
            else:
                g.raise_error()
                deltas, message = pipe.finish(u.tokens, g.finish_reason, g.stop_reason)
                out = blocks.write(deltas) + blocks.close()
                stop_reason, stop_sequence = _stop_reason(g, message)
                out.append(
                    event(
                        "message_delta",
                        {
                            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                            "usage": {"output_tokens": len(g.tokens)},
                        },
                    )
                )
                out.append(event("message_stop", {}))
            if out:
                yield "".join(out)
    except APIError as err:
        yield f"event: error\ndata: {json.dumps(anthropic_error_body(err))}\n\n"
