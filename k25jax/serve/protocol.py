"""What the OpenAI and Anthropic endpoints share: errors, the thinking switch, tool-call ids, media and sampling.

Every bad request becomes an :class:`APIError` (status, message, the field at fault as ``param``); the server
renders it in the shape of the API that was called. Pydantic validates the request bodies;
:func:`param_of` turns a pydantic error location into the client's field path (``messages[2].content[1].image_url``).

:class:`Job` is what an endpoint hands the server's engine bridge (``k25jax.serve.server``); :func:`merged`
and :func:`watching` follow its generations; :func:`authorize` is the API-key dependency of every route.

The rules here are the ones ``shared/docs/serving.md`` lists as what clients actually send: the thinking switch
in four forms, tool-call ids other than ``functions.NAME:IDX`` in the history (rewritten, IDX counted over the
whole conversation), images as base64 ``data:`` URLs with a space after the comma, video as ``data:video/mp4``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import dataclasses
import json
import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from starlette.requests import Request

from k25jax.chat_reply import skipped_special_ids
from k25jax.sampling import Sampling, SamplingError, sampling_defaults

CANONICAL_ID = re.compile(r"^functions\.(?P<name>.+):(?P<index>\d+)$")
MAX_MEDIA_BYTES = 64 * 2**20  # the most bytes one image or video may hold (decoded or downloaded)
DISCONNECT_POLL_S = 0.05  # how often a non-streaming handler checks that its client is still there


class APIError(Exception):
    """A request the server refuses: HTTP ``status``, a message naming the field, ``param`` (the field path),
    an error ``type`` / ``code`` (OpenAI's vocabulary; the Anthropic endpoint maps the status), extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.headers = dict(headers or {})


_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def openai_error_body(err: APIError) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def anthropic_error_body(err: APIError) -> dict:
    """``{"type": "error", "error": {"type", "message"}}`` (the field path leads the message)."""
    kind = _ANTHROPIC_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


# --------------------------------------------------------------------------------------------------------
# Pydantic error locations -> field paths
# --------------------------------------------------------------------------------------------------------


def param_of(loc: Sequence[Any], body: Any) -> str | None:
    """The client's path of a pydantic error location: ``("body", "messages", 2, "content", 1, "image_url",
    "image_url")`` -> ``messages[2].content[1].image_url``.

    Pydantic puts union labels (``str``, ``list[...]``, the tag of a tagged union) between the real keys; they
    are told apart by walking the request body along the location: a key the body has, or an index of a list,
    is kept; a name in last place under an object is the missing field; anything else is a label and skipped.
    """
    loc = list(loc)
    if loc and loc[0] == "body":
        loc = loc[1:]
    path, node = "", body
    for k, key in enumerate(loc):
        last = k == len(loc) - 1
        if isinstance(node, list) and isinstance(key, int):
            path, node = f"{path}[{key}]", node[key] if key < len(node) else None
        elif isinstance(node, Mapping) and isinstance(key, str) and (key in node or (last and not _LABEL.search(key))):
            path, node = f"{path}.{key}" if path else key, node.get(key)
    return path or None


_LABEL = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\]]")  # pydantic union labels


def validation_error(errors: Sequence[Mapping], body: Any) -> APIError:
    """An :class:`APIError` (400) for the first of pydantic's errors, naming its field."""
    if not errors:
        return APIError(400, "invalid request body")
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # the deepest: inside a union, the branch that fit
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = param_of(first.get("loc", ()), body)
    if first.get("type") in ("union_tag_invalid", "union_tag_not_found") and param:
        param += ".type"
    message = str(first.get("msg", "invalid value"))
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def field_error(err: ValueError, names: Mapping[str, str] | None = None) -> APIError:
    """A 400 from a library error whose message starts with the field (``sampling.top_p: ...``,
    ``tools[0].function.name: ...``); ``names`` maps library field names to the request's."""
    text = str(err)
    head = text.split(":", 1)[0].strip()
    field = head.removeprefix("sampling.")
    if " " in field or not field:
        return APIError(400, text)
    field = (names or {}).get(field, field)
    rest = text.split(":", 1)[1].strip() if ":" in text else text
    return APIError(400, f"{field}: {rest}", param=field)


# --------------------------------------------------------------------------------------------------------
# The thinking switch
# --------------------------------------------------------------------------------------------------------


def thinking_of(body: Mapping, default: bool = True) -> tuple[bool, int | None]:
    """``(thinking, budget_tokens)`` from any of the forms clients send, first match wins:

    - ``thinking: {"type": "enabled" | "disabled", "budget_tokens": N}`` (Moonshot's API and Anthropic's),
    - ``chat_template_kwargs: {"thinking": bool}`` (vLLM / SGLang) or ``{"enable_thinking": bool}``,
    - ``reasoning_effort: "none"`` (off; any other effort leaves it on).
    """
    budget = None
    switch = body.get("thinking")
    if switch is not None:
        if isinstance(switch, bool):
            return switch, None
        if not isinstance(switch, Mapping) or switch.get("type") not in ("enabled", "disabled"):
            raise APIError(400, 'thinking.type: must be "enabled" or "disabled"', param="thinking.type")
        budget = switch.get("budget_tokens")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise APIError(400, "thinking.budget_tokens: must be an integer >= 1", param="thinking.budget_tokens")
        return switch["type"] == "enabled", budget if switch["type"] == "enabled" else None
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, Mapping):
            raise APIError(400, "chat_template_kwargs: must be an object", param="chat_template_kwargs")
        for key in ("thinking", "enable_thinking"):
            if key in kwargs:
                if not isinstance(kwargs[key], bool):
                    raise APIError(
                        400, f"chat_template_kwargs.{key}: must be a boolean", param=f"chat_template_kwargs.{key}"
                    )
                return kwargs[key], None
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
            raise APIError(
                400, "reasoning_effort: must be none, minimal, low, medium or high", param="reasoning_effort"
            )
        return effort != "none", None
    return default, None


# --------------------------------------------------------------------------------------------------------
# Tool-call ids
# --------------------------------------------------------------------------------------------------------


def canonical_tool_ids(messages: list[dict]) -> tuple[list[dict], int]:
    """Rewrite the history's tool-call ids to ``functions.NAME:IDX``, IDX counting every call of the conversation
    from 0, and each tool message's ``tool_call_id`` with them (a client that reuses an id in a later turn gets the
    later turn's). Returns the new messages and the number of calls in the history (where the reply's own
    numbering continues)."""
    out, count = [], 0
    latest: dict[str, str] = {}  # client id -> canonical, the most recent assistant turn's winning
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                call = dict(call)
                fn = call.get("function") or {}
                canonical = f"functions.{fn.get('name', '')}:{count}"
                client = call.get("id")
                if client and client != canonical:
                    latest[client] = canonical
                call["id"] = canonical
                calls.append(call)
                count += 1
            m["tool_calls"] = calls
        elif m.get("role") == "tool" and m.get("tool_call_id") in latest:
            m["tool_call_id"] = latest[m["tool_call_id"]]
        out.append(m)
    return out, count


# --------------------------------------------------------------------------------------------------------
# Media
# --------------------------------------------------------------------------------------------------------


class MediaFiles:
    """Temporary files of one request's videos (PyAV reads files); :meth:`close` deletes them."""

    def __init__(self):
        self.paths: list[str] = []

    def write(self, data: bytes, suffix: str) -> str:
        fd, path = tempfile.mkstemp(prefix="k25jax-media-", suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.paths.append(path)
        return path

    def close(self) -> None:
        for path in self.paths:
            try:
                os.remove(path)
            except OSError:
                pass
        self.paths.clear()


def decode_data_url(url: str, param: str) -> tuple[str, bytes]:
    """``(mime type, bytes)`` of a base64 ``data:`` URL; whitespace in the payload is ignored (the model card
    writes ``data:image/png;base64, ...``)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{param}: only base64 data URLs are supported (data:<mime>;base64,<data>)", param=param)
    return header[len("data:") : -len(";base64")], decode_base64(payload, param, what="the data URL")


def decode_base64(data: Any, param: str, what: str = "the value") -> bytes:
    """The bytes of a base64 string (Anthropic's ``source.data``, a data URL's payload); whitespace is ignored."""
    if not isinstance(data, str):
        raise APIError(400, f"{param}: must be a base64 string", param=param)
    try:
        out = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: {what} holds invalid base64", param=param) from None
    if not out:
        raise APIError(400, f"{param}: {what} is empty", param=param)
    return out


async def fetch_media(url: str, param: str, allow_remote: bool) -> bytes:
    """The bytes behind an ``http(s)`` URL (only with ``--allow-remote-media``)."""
    if not url.startswith(("http://", "https://")):
        raise APIError(
            400, f"{param}: only data: URLs (and http(s) URLs with --allow-remote-media) are read", param=param
        )
    if not allow_remote:
        raise APIError(
            400,
            f"{param}: remote media URLs are refused by this server (send a base64 data: URL, or start it with "
            "--allow-remote-media)",
            param=param,
        )
    import httpx

    try:
        async with httpx.AsyncClient(timeout=30.0, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise APIError(400, f"{param}: fetching {url} gave HTTP {response.status_code}", param=param)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_MEDIA_BYTES:
                        raise APIError(400, f"{param}: {url} is larger than {MAX_MEDIA_BYTES} bytes", param=param)
                    chunks.append(chunk)
    except httpx.HTTPError as err:
        raise APIError(400, f"{param}: fetching {url} failed: {err}", param=param) from None
    return b"".join(chunks)


async def media_part(kind: str, url: Any, param: str, files: MediaFiles, allow_remote: bool) -> dict:
    """The content part ``k25jax.chat.prepare`` takes for an image or video given by ``url`` (data: or http(s)):
    images as bytes, videos as a temporary file."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{param}: must be a URL string", param=param)
    if url.startswith("data:"):
        _, data = decode_data_url(url, param)
    else:
        data = await fetch_media(url, param, allow_remote)
    if len(data) > MAX_MEDIA_BYTES:
        raise APIError(400, f"{param}: larger than {MAX_MEDIA_BYTES} bytes", param=param)
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": data}}
    return {"type": "video_url", "video_url": {"url": files.write(data, ".mp4")}}


def media_error(err: Exception, params: Mapping[str, str], files: MediaFiles) -> APIError:
    """A 400 for an image or video that would not decode, naming the request field (``params`` maps the
    ``messages[i].content[j]`` that ``prepare`` names to the client's path)."""
    text = str(err)
    for path in files.paths:
        text = text.replace(path, "the video")
    match = re.match(r"(messages\[\d+\]\.content\[\d+\])", text)
    param = params.get(match.group(1)) if match else None
    if match and param:
        text = param + text[match.end() :]
    return APIError(400, text, param=param, code="invalid_media")


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------


def build_sampling(fields: Mapping[str, Any], thinking: bool, names: Mapping[str, str] | None = None) -> Sampling:
    """A checked :class:`Sampling` from request fields (``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``seed``, penalties, ``logit_bias``, ``stop``, ``stop_token_ids``, ``logprobs``); unset temperature and top_p
    take the model card's values for the mode. ``names`` maps the sampling fields to the request's for errors."""
    base = sampling_defaults(thinking)
    values = {k: v for k, v in fields.items() if v is not None}
    if values.get("top_k") == -1:  # vLLM's "off"
        values["top_k"] = 0
    stop = values.get("stop")
    if isinstance(stop, str):
        values["stop"] = (stop,)
    elif stop is not None:
        values["stop"] = tuple(s for s in stop if s)
    try:
        return base.replace(**values).check()
    except SamplingError as err:
        raise field_error(err, names) from None


def check_context(prompt_len: int, max_tokens: int | None, max_context: int, tokens_field: str, cap: int | None) -> int:
    """The new-token limit of a request: ``max_tokens`` (None: the room left in the context) lowered to the
    server's cap; a prompt that leaves no room, or a prompt plus ``max_tokens`` over the context, is a 400 giving
    both numbers."""
    if prompt_len >= max_context:
        raise APIError(
            400,
            f"messages: the prompt has {prompt_len} tokens, which leaves no room in this model's context of "
            f"{max_context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is not None and cap is not None:
        max_tokens = min(max_tokens, cap)
    if max_tokens is None:
        return min(max_context - prompt_len, cap or max_context)
    if prompt_len + max_tokens > max_context:
        raise APIError(
            400,
            f"{tokens_field}: this model's context is {max_context} tokens, but the request asks for "
            f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)",
            param=tokens_field,
            code="context_length_exceeded",
        )
    return max_tokens


# --------------------------------------------------------------------------------------------------------
# Jobs and their streams (what the endpoints hand to ``k25jax.serve.server``'s engine bridge)
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """One generation: the prompt ids (media expanded) and media, settings, the new-token limit, the mode,
    ``guide(thinking) -> Guide`` for guided decoding (None: free), ``budget``: thinking tokens after which the
    reasoning is closed with ``</think>`` and the answer continues."""

    prompt: list[int]
    media: Any
    sampling: Sampling
    max_tokens: int
    thinking: bool
    guide: Callable[[bool], Any] | None = None
    budget: int | None = None


def authorize(request: Request) -> None:
    """The API-key check (a route dependency): ``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
    key = request.app.state.service.api_key
    if key is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not secrets.compare_digest(given.encode(), key.encode()):
        raise APIError(
            401,
            "missing or incorrect API key (send Authorization: Bearer KEY or x-api-key: KEY)",
            code="invalid_api_key",
        )


async def merged(generations: Sequence) -> AsyncIterator[tuple[int, Any]]:
    """``(index, update)`` of several ``k25jax.serve.server.Generation`` s as they come (the choices of ``n > 1``);
    closing it cancels those still running."""
    if len(generations) == 1:
        async for u in generations[0].updates():
            yield 0, u
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g) -> None:
        async for u in g.updates():
            await queue.put((i, u))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    left = len(generations)
    try:
        while left:
            i, u = await queue.get()
            left -= u.done
            yield i, u
    finally:
        for t in tasks:
            t.cancel()
        for g in generations:
            if g.finish_reason is None:
                g.cancel()


@contextlib.asynccontextmanager
async def watching(request: Request, generations: Sequence):
    """Cancel ``generations`` when the client of a non-streaming ``request`` disconnects."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        for g in generations:
            g.cancel()

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


# --------------------------------------------------------------------------------------------------------
# Response pieces
# --------------------------------------------------------------------------------------------------------


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    return [None if seed is None else (seed + i) % 2**32 for i in range(n)]


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def token_text(tok, token: int) -> str:
    return tok.decode([token])


def chat_logprobs(tok, entries: list) -> dict:
    """OpenAI's ``logprobs.content`` of ``(token, (logprob, [(id, logprob), ...]))`` pairs."""
    content = []
    for token, (lp, top) in entries:
        text = token_text(tok, token)
        content.append(
            {
                "token": text,
                "logprob": lp,
                "bytes": list(tok.decode_bytes([token])),
                "top_logprobs": [
                    {"token": token_text(tok, t), "logprob": v, "bytes": list(tok.decode_bytes([t]))} for t, v in top
                ],
            }
        )
    return {"content": content}


class TextPipeline:
    """Generated tokens -> completion text: UTF-8 completed across tokens, the final stop token dropped, stop
    strings held back and cut (as :class:`~k25jax.serve.server.ReplyPipeline` does for chat); with
    ``skip_special_tokens`` the special tokens other than the reply grammar's markers give no text."""

    def __init__(self, tokenizer, stop, stop_ids, skip_special_tokens: bool = True):
        self.tok, self.stop, self.stop_ids = tokenizer, [s for s in stop if s], set(stop_ids)
        self.skip = skipped_special_ids(tokenizer) if skip_special_tokens else frozenset()
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending, self.text = "", ""

    def feed(self, tokens, final=False, stop_reason=None) -> str:
        if final and tokens and tokens[-1] in self.stop_ids and stop_reason == tokens[-1]:
            tokens = tokens[:-1]
        tokens = [t for t in tokens if int(t) not in self.skip]
        self.pending += self.decoder.decode(self.tok.decode_bytes(tokens), final=final)
        if final:
            if isinstance(stop_reason, str) and stop_reason in self.pending:
                self.pending = self.pending[: self.pending.index(stop_reason)]
            out, self.pending = self.pending, ""
        else:
            n = len(self.pending) - self.hold
            out, self.pending = (self.pending[:n], self.pending[n:]) if n > 0 else ("", self.pending)
        self.text += out
        return out


def completion_logprobs(tok, entries: list, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, (lp, top) in entries:
        text = token_text(tok, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({token_text(tok, t): v for t, v in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
