"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/tokenize``, ``/detokenize``.

Request bodies are pydantic models (unknown fields are ignored, as vLLM does); the handlers turn them into a
:class:`~k25jax.serve.server.Job` per choice: messages rendered by ``k25jax.chat.prepare`` (history tool-call
ids made canonical, images and videos read from ``data:`` URLs), sampling defaults of the model card for the
mode, guided decoding for ``tool_choice`` required / named and ``response_format``. Replies stream as SSE
chunks (the role rides with the first token) or come whole; both are built from the same deltas.
"""

from __future__ import annotations

import time
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
    TextPipeline,
    authorize,
    build_sampling,
    canonical_tool_ids,
    chat_logprobs,
    check_context,
    choice_seeds,
    completion_logprobs,
    media_part,
    merged,
    openai_error_body,
    sse,
    thinking_of,
    watching,
)

router = APIRouter(dependencies=[Depends(authorize)])
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# --------------------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class URLField(_Model):
    url: str
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: URLField


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: URLField


def _parts(value: Any) -> Any:
    return [{"type": "text", "text": value}] if isinstance(value, str) else value  # a string is one text part


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]
Content = Annotated[list[Part] | None, BeforeValidator(_parts)]


class CallFunction(_Model):
    name: str = Field(min_length=1)
    arguments: str | dict = "{}"


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CallFunction


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class ChoiceName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: ChoiceName


class JSONSchemaFormat(_Model):
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Model):
    include_usage: bool | None = None


class SamplingFields(_Model):
    """Fields every generating endpoint takes."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # vLLM's field: special tokens but the reply markers give no text
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    thinking: dict | bool | None = None
    chat_template_kwargs: dict | None = None
    reasoning_effort: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


# --------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------


def sampling_of(body: SamplingFields, service, thinking: bool, *, logprobs: int | None, extra_bias=None):
    """The request's :class:`~k25jax.sampling.Sampling` (model card defaults for what it leaves unset)."""
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias.{key}: keys must be token ids", param=f"logit_bias.{key}") from None
        if not 0 <= token < service.vocab_size:
            raise APIError(
                400, f"logit_bias.{key}: token id outside [0, {service.vocab_size})", param=f"logit_bias.{key}"
            )
        bias[token] = value
    bias.update(extra_bias or {})
    stop_ids = None
    if body.ignore_eos:
        stop_ids = tuple(body.stop_token_ids or ())
    elif body.stop_token_ids:
        stop_ids = tuple(dict.fromkeys([*service.engine.default_stop, *body.stop_token_ids]))
    fields = dict(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=None if body.seed is None else body.seed % 2**32,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=bias or None,
        stop=body.stop,
        stop_token_ids=stop_ids,
        logprobs=logprobs,
    )
    return build_sampling(fields, thinking, names={"logprobs": "top_logprobs"})


# --------------------------------------------------------------------------------------------------------
# /v1/chat/completions
# --------------------------------------------------------------------------------------------------------


async def chat_prompt(service, body: ChatCompletionRequest, thinking: bool):
    """``(ids, media, first_call_index)`` of the request's messages."""
    messages = [m.model_dump(exclude_none=True, by_alias=True) for m in body.messages]
    for m in messages:
        if "reasoning_content" not in m and "reasoning" in m:
            m["reasoning_content"] = m["reasoning"]
        m.pop("reasoning", None)
        if m["role"] == "developer":
            m["role"] = "system"
    messages, calls = canonical_tool_ids(messages)
    files, params = MediaFiles(), {}
    try:
        for i, m in enumerate(messages):
            for j, part in enumerate(m.get("content") or []):
                if part["type"] in ("image_url", "video_url"):
                    where = f"messages[{i}].content[{j}]"
                    params[where] = f"{where}.{part['type']}"
                    kind = part["type"].split("_")[0]
                    m["content"][j] = await media_part(
                        kind, part[part["type"]]["url"], params[where], files, service.allow_remote_media
                    )
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        ids, media = await service.prepare(messages, tools, thinking, params, files)
    finally:
        files.close()
    return ids, media, calls


def chat_guide(service, body: ChatCompletionRequest):
    """``(guide factory or None, extra logit bias)`` of ``tool_choice`` / ``response_format``."""
    choice, tools = body.tool_choice, [t.model_dump(exclude_none=True) for t in body.tools or []]
    fmt = body.response_format
    structured = fmt is not None and fmt.type != "text"
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and not tools:
        raise APIError(400, "tool_choice: forcing a tool call needs tools", param="tool_choice")
    if forced and structured:
        raise APIError(400, "response_format: cannot be combined with a forced tool call", param="response_format")
    if choice == "none":
        return None, {service.section_begin: -100.0}
    if forced:
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        parallel = body.parallel_tool_calls is not False
        return service.guide_factory(guided.tool_call_guide, tools, name=name, parallel=parallel), {}
    if structured:
        schema = None
        if fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(
                    400,
                    "response_format.json_schema.schema: required for type json_schema",
                    param="response_format.json_schema.schema",
                )
            schema = fmt.json_schema.schema_
        return service.guide_factory(guided.json_guide, schema), {}
    return None, {}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service = request.app.state.service
    name = service.check_model(body.model)
    thinking, budget = thinking_of(
        body.model_dump(include={"thinking", "chat_template_kwargs", "reasoning_effort"}, exclude_none=True)
    )
    guide, bias = chat_guide(service, body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    base = sampling_of(body, service, thinking, logprobs=logprobs, extra_bias=bias)
    ids, media, calls = await chat_prompt(service, body, thinking)
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    limit = check_context(
        len(ids), body.max_completion_tokens or body.max_tokens, service.max_context, field, service.max_tokens_cap
    )
    jobs = [
        Job(ids, media, base.replace(seed=s) if s is not None else base, limit, thinking, guide, budget)
        for s in choice_seeds(base.seed, body.n)
    ]
    gens = service.start(jobs)
    pipes = [
        service.pipeline(
            thinking=thinking, first_call_index=calls, stop=base.stop, skip_special_tokens=body.skip_special_tokens
        )
        for _ in gens
    ]
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_chat(service, gens, pipes, meta, usage), media_type="text/event-stream", headers=SSE_HEADERS
        )
    return await whole_chat(service, request, gens, pipes, meta)


def _delta(deltas: list[dict], slots: dict[int, int]) -> dict:
    """One chunk's ``delta`` from reply deltas (``slots``: reply call index -> stream index)."""
    delta: dict[str, Any] = {}
    calls: dict[int, dict] = {}
    for d in deltas:
        if "tool_call" in d:
            c = d["tool_call"]
            index = slots.setdefault(c["index"], len(slots))
            entry = calls.setdefault(index, {"index": index})
            if "id" in c:
                entry.update(id=c["id"], type="function", function={"name": c["name"], "arguments": ""})
            if "arguments" in c:
                entry.setdefault("function", {"arguments": ""})
                entry["function"]["arguments"] += c["arguments"]
        else:
            kind, text = next(iter(d.items()))
            delta[kind] = delta.get(kind, "") + text
    if "reasoning_content" in delta:
        delta["reasoning"] = delta["reasoning_content"]
    if calls:
        delta["tool_calls"] = list(calls.values())
    return delta


def _usage(gens, pipes) -> dict:
    prompt = gens[0].usage["prompt_tokens"]
    completion = sum(g.usage["completion_tokens"] for g in gens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": gens[0].usage["prompt_tokens_details"]["cached_tokens"]},
        "completion_tokens_details": {"reasoning_tokens": sum(p.reasoning_tokens for p in pipes)},
    }


def _stop_reason(g):
    return g.stop_reason if isinstance(g.stop_reason, str | int) and g.finish_reason == "stop" else None


async def stream_chat(service, gens, pipes, meta, include_usage: bool):
    tok = service.tokenizer
    head = {**meta, "object": "chat.completion.chunk"}
    role_sent = [False] * len(gens)
    slots: list[dict[int, int]] = [{} for _ in gens]
    lps: list[list] = [[] for _ in gens]
    want_lps = gens[0].job.sampling.logprobs is not None

    def chunk(i: int, deltas: list[dict], finish=None, stop_reason=None):
        delta = _delta(deltas, slots[i])
        if not delta and finish is None and not (want_lps and lps[i]):
            return None
        if not role_sent[i]:
            delta = {"role": "assistant", **delta}
            role_sent[i] = True
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        if want_lps and lps[i]:
            choice["logprobs"] = chat_logprobs(tok, lps[i])
            lps[i] = []
        return sse({**head, "choices": [choice]})

    try:
        async for i, u in merged(gens):
            lps[i] += [(t, lp) for t, lp in zip(u.tokens, u.logprobs, strict=True) if lp is not None]
            if not u.done:
                out = chunk(i, pipes[i].feed(u.tokens))
            else:
                g = gens[i]
                g.raise_error()
                deltas, message = pipes[i].finish(u.tokens, g.finish_reason, g.stop_reason)
                out = (chunk(i, deltas) or "") + chunk(i, [], message["finish_reason"], _stop_reason(g))
            if out:
                yield out
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(gens, pipes)})
    except APIError as err:
        yield sse(openai_error_body(err))
    yield "data: [DONE]\n\n"


async def whole_chat(service, request: Request, gens, pipes, meta):
    tok = service.tokenizer
    messages: list[dict | None] = [None] * len(gens)
    lps: list[list] = [[] for _ in gens]
    async with watching(request, gens):
        async for i, u in merged(gens):
            lps[i] += [(t, lp) for t, lp in zip(u.tokens, u.logprobs, strict=True) if lp is not None]
            if u.done:
                gens[i].raise_error()
                messages[i] = pipes[i].finish(u.tokens, gens[i].finish_reason, gens[i].stop_reason)[1]
            else:
                pipes[i].feed(u.tokens)
    if any(g.finish_reason == "cancelled" for g in gens):
        raise APIError(499, "the client closed the request", code="client_closed")
    choices = []
    for i, (g, m) in enumerate(zip(gens, messages, strict=True)):
        calls = m["tool_calls"]
        out = {
            "role": "assistant",
            "content": m["content"] if m["content"] or not calls else None,
            "reasoning_content": m["reasoning_content"] or None,
            "reasoning": m["reasoning_content"] or None,
        }
        if calls:
            out["tool_calls"] = calls
        choices.append(
            {
                "index": i,
                "message": out,
                "finish_reason": m["finish_reason"],
                "stop_reason": _stop_reason(g),
                "logprobs": chat_logprobs(tok, lps[i]) if g.job.sampling.logprobs is not None else None,
            }
        )
    return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(gens, pipes)}


# --------------------------------------------------------------------------------------------------------
# /v1/completions
# --------------------------------------------------------------------------------------------------------


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    service = request.app.state.service
    tok = service.tokenizer
    name = service.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix: not supported by this model", param="suffix")
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: empty", param="prompt")
    prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    for k, ids in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
        if not ids:
            raise APIError(400, f"{where}: empty", param=where)
        bad = [t for t in ids if not 0 <= t < service.vocab_size]
        if bad:
            raise APIError(400, f"{where}: token ids {bad[:8]} outside [0, {service.vocab_size})", param=where)
    base = sampling_of(body, service, True, logprobs=body.logprobs)
    jobs = []
    for ids in prompts:
        limit = check_context(len(ids), body.max_tokens, service.max_context, "max_tokens", service.max_tokens_cap)
        jobs += [
            Job(ids, None, base.replace(seed=s) if s is not None else base, limit, True)
            for s in choice_seeds(base.seed, body.n)
        ]
    gens = service.start(jobs)
    stop_ids = base.stop_token_ids if base.stop_token_ids is not None else service.engine.default_stop
    pipes = [TextPipeline(tok, base.stop, stop_ids, body.skip_special_tokens) for _ in gens]
    echo = [tok.decode(g.job.prompt) if body.echo else "" for g in gens]
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name, "object": "text_completion"}
    want_lps = body.logprobs is not None

    def entries_of(u) -> list:
        return [(t, lp) for t, lp in zip(u.tokens, u.logprobs, strict=True) if lp is not None]

    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            try:
                started = [False] * len(gens)
                pending: list[list] = [[] for _ in gens]  # logprobs of tokens whose text has not been sent
                offsets = [len(e) for e in echo]
                async for i, u in merged(gens):
                    g = gens[i]
                    if u.done:
                        g.raise_error()
                    pending[i] += entries_of(u)
                    text = pipes[i].feed(u.tokens, u.done, g.stop_reason)
                    if not started[i]:
                        text, started[i] = echo[i] + text, True
                    if not (text or u.done):
                        continue
                    lps = None
                    if want_lps:
                        lps = completion_logprobs(tok, pending[i], offsets[i])
                        offsets[i] += sum(len(x) for x in lps["tokens"])
                        pending[i] = []
                    choice = {
                        "index": i,
                        "text": text,
                        "logprobs": lps,
                        "finish_reason": g.finish_reason if u.done else None,
                        "stop_reason": _stop_reason(g) if u.done else None,
                    }
                    yield sse({**meta, "choices": [choice]})
                if usage:
                    yield sse({**meta, "choices": [], "usage": _text_usage(gens)})
            except APIError as err:
                yield sse(openai_error_body(err))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    entries: list[list] = [[] for _ in gens]
    async with watching(request, gens):
        async for i, u in merged(gens):
            if u.done:
                gens[i].raise_error()
            entries[i] += entries_of(u)
            pipes[i].feed(u.tokens, u.done, gens[i].stop_reason)
    if any(g.finish_reason == "cancelled" for g in gens):
        raise APIError(499, "the client closed the request", code="client_closed")
    choices = []
    for i, g in enumerate(gens):
        choices.append(
            {
                "index": i,
                "text": echo[i] + pipes[i].text,
                "finish_reason": g.finish_reason,
                "stop_reason": _stop_reason(g),
                "logprobs": completion_logprobs(tok, entries[i], len(echo[i])) if want_lps else None,
            }
        )
    return {**meta, "choices": choices, "usage": _text_usage(gens)}


def _text_usage(gens) -> dict:
    prompt = sum(len(g.job.prompt) for g in gens)
    completion = sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --------------------------------------------------------------------------------------------------------
# /tokenize, /detokenize (vLLM's)
# --------------------------------------------------------------------------------------------------------


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    thinking: dict | bool | None = None
    chat_template_kwargs: dict | None = None
    reasoning_effort: str | None = None


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    service = request.app.state.service
    service.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "prompt: give either prompt or messages", param="prompt")
    if body.prompt is not None:
        ids = service.tokenizer.encode(body.prompt)
    else:
        thinking, _ = thinking_of(
            body.model_dump(include={"thinking", "chat_template_kwargs", "reasoning_effort"}, exclude_none=True)
        )
        chat = ChatCompletionRequest(messages=body.messages, tools=body.tools)
        ids = (await chat_prompt(service, chat, thinking))[0]
    return {"count": len(ids), "max_model_len": service.max_context, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    service = request.app.state.service
    service.check_model(body.model)
    bad = [t for t in body.tokens if not 0 <= t < service.vocab_size]
    if bad:
        raise APIError(400, f"tokens: ids {bad[:8]} outside [0, {service.vocab_size})", param="tokens")
    return {"prompt": service.tokenizer.decode(body.tokens)}
