"""The HTTP server: OpenAI- and Anthropic-compatible endpoints over one :class:`~k25jax.serve.engine.Engine`.

:func:`create_app` builds the FastAPI app (``k25jax serve`` runs it with uvicorn, :func:`serve`). The engine
steps in its own thread (``Engine.start``); a request handler submits its prompt and awaits the tokens through
``on_update`` callbacks, which wake the event loop (``call_soon_threadsafe``). What the endpoints share lives
here: :class:`Service` (the engine, tokenizer, limits and metrics of one app), :class:`Generation` (one engine
request seen from the event loop: its token updates, the thinking budget, cancellation) and
:class:`ReplyPipeline` (tokens -> reasoning / content / tool-call deltas -> the final message, stop strings cut).

A client that goes away cancels its engine request, streaming or not (Starlette cancels a streaming body; a
non-streaming handler polls ``request.is_disconnected()``), so the slot frees within one decode window. On
SIGTERM uvicorn stops accepting, lets in-flight requests finish, then the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from k25jax.sampling import SamplingError
from k25jax.serve import anthropic_api, openai_api
from k25jax.serve.engine import Engine, EngineError
from k25jax.serve.guided import GuideError
from k25jax.serve.metrics import Metrics
from k25jax.serve.protocol import (
    APIError,
    Job,
    MediaFiles,
    anthropic_error_body,
    authorize,
    field_error,
    media_error,
    openai_error_body,
    validation_error,
)
from k25jax.serve.reply import ReplyStream


@dataclasses.dataclass
class Update:
    """New tokens of a :class:`Generation` (``logprobs`` aligned with them: ``(logprob, [(id, logprob)])``, None
    for a token the server inserted), and whether it finished."""

    tokens: list[int]
    logprobs: list
    done: bool


class Service:
    """The state one app serves from: engine, tokenizer, names and limits, metrics."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        served_model_name,
        root,
        api_key,
        max_queue,
        max_tokens_cap,
        allow_remote_media,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        self.root = root or self.names[0]
        self.api_key = api_key
        self.max_queue = max_queue
        self.max_tokens_cap = max_tokens_cap
        self.allow_remote_media = allow_remote_media
        self.vocab_size = engine.vocab
        self.max_context = engine.max_context
        self.metrics = Metrics(engine, self.names[0])
        self.draining = False
        self.created = int(time.time())
        self.end_think = tokenizer.token_id("</think>")
        self.section_begin = tokenizer.token_id("<|tool_calls_section_begin|>")
        self.live: set[Generation] = set()

    def check_model(self, name: str | None) -> str:
        """The served name a request's ``model`` field asks for (404 if it names another)."""
        if name in (None, "") or name in self.names or name == self.root:
            return self.names[0]
        raise APIError(
            404,
            f"model: the model `{name}` does not exist (served: {', '.join(self.names)})",
            param="model",
            code="model_not_found",
        )

    def admit(self, count: int = 1) -> None:
        """Refuse (503, Retry-After) when draining or when ``count`` more requests would overfill the queue."""
        if self.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"}, code="shutting_down")
        waiting = len(self.engine.waiting)
        if waiting + count > self.max_queue:
            raise APIError(
                503,
                f"the request queue is full ({waiting} waiting, at most {self.max_queue}); retry later",
                headers={"Retry-After": "1"},
                code="queue_full",
            )

    async def prepare(self, messages: list[dict], tools, thinking: bool, params: dict[str, str], files: MediaFiles):
        """``k25jax.chat.prepare`` off the event loop (images are decoded and resized there); errors as 400s."""
        from k25jax.chat import ChatFormatError, prepare
        from k25jax.vision.preprocess import MediaError

        try:
            return await asyncio.to_thread(prepare, messages, self.tokenizer, tools=tools, thinking=thinking)
        except MediaError as err:
            raise media_error(err, params, files) from None
        except ChatFormatError as err:
            raise media_error(err, params, files) if "content[" in str(err) else APIError(400, str(err)) from None
        except (ValueError, TypeError) as err:
            raise APIError(400, f"messages: {err}", param="messages") from None

    def start(self, jobs: Sequence[Job]) -> list[Generation]:
        """Submit the jobs of one request (all or none: a refusal cancels those already submitted)."""
        self.admit(len(jobs))
        out: list[Generation] = []
        try:
            for job in jobs:
                out.append(Generation(self, job))
        except BaseException:
            for g in out:
                g.cancel()
            raise
        return out

    def pipeline(
        self, *, thinking: bool, first_call_index: int = 0, stop: Sequence[str] = (), skip_special_tokens: bool = True
    ) -> ReplyPipeline:
        """A :class:`ReplyPipeline` for one reply."""
        return ReplyPipeline(
            self.tokenizer,
            thinking=thinking,
            first_call_index=first_call_index,
            stop=stop,
            skip_special_tokens=skip_special_tokens,
        )

    def guide_factory(self, make: Callable[..., Any], *args, **kwargs) -> Callable[[bool], Any]:
        """``thinking -> guide`` for :class:`Job` (built now once, so a bad schema fails before any submit)."""
        try:
            make(self.tokenizer, self.vocab_size, *args, thinking=False, **kwargs)
        except GuideError as err:
            raise field_error(err) from None
        return lambda thinking: make(self.tokenizer, self.vocab_size, *args, thinking=thinking, **kwargs)


class Generation:
    """One :class:`Job` on the engine, seen from the event loop. Submits at construction (errors are 400s),
    then :meth:`updates` yields the tokens as they come. With a thinking ``budget`` the first engine request
    stops at the budget; if the reasoning is still open a second one continues the prompt, the reasoning and
    ``</think>`` (which the updates carry as a token) for what is left of ``max_tokens``."""

    def __init__(self, service: Service, job: Job):
        self.service, self.job = service, job
        self.loop = asyncio.get_running_loop()
        self.news = asyncio.Event()
        self.tokens: list[int] = []
        self.requests: list = []
        self.cancelled = False
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.error: str | None = None
        first = job.max_tokens
        if job.thinking and job.budget is not None and job.budget < job.max_tokens:
            first = job.budget
        self._submit(job.prompt, first, job.guide(job.thinking) if job.guide else None)
        service.live.add(self)

    def _submit(self, prompt: list[int], max_tokens: int, guide) -> None:
        engine = self.service.engine
        try:
            r = engine.submit(
                prompt,
                self.job.sampling,
                media=self.job.media,
                max_tokens=max_tokens,
                guide=guide,
                on_update=self._wake,
            )
        except SamplingError as err:
            raise field_error(err) from None
        except EngineError as err:
            raise APIError(400, f"messages: {str(err).split(': ', 1)[-1]}", param="messages") from None
        self.requests.append(r)
        self._read = 0

    def _wake(self, _request) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.news.set)

    def cancel(self) -> None:
        self.cancelled = True
        if self.requests:
            self.service.engine.cancel(self.requests[-1])

    async def updates(self) -> AsyncIterator[Update]:
        """The new tokens, step by step; the last update has ``done``. Cancelling the consumer cancels the
        engine request."""
        try:
            while True:
                await self.news.wait()
                self.news.clear()
                r = self.requests[-1]
                finished = r.finished  # read before the tokens: once set, they are complete
                end = len(r.tokens)
                if r.logprobs is not None and not finished:  # a token's logprobs are appended just after it
                    end = min(end, len(r.logprobs))
                new = r.tokens[self._read : end]
                lps = list(r.logprobs[self._read : end]) if r.logprobs is not None else [None] * len(new)
                self._read = end
                self.tokens += new
                if finished and self._continue(r):
                    yield Update(new + [self.service.end_think], lps + [None], False)
                    self.tokens.append(self.service.end_think)
                    continue
                if finished:
                    self._finished(r)
                    yield Update(new, lps, True)
                    return
                if new:
                    yield Update(new, lps, False)
        finally:
            if self.finish_reason is None:
                self.cancel()
            self.service.live.discard(self)

    def _continue(self, r) -> bool:
        """Start the answer phase after a thinking budget ran out (True when it started)."""
        job = self.job
        if len(self.requests) > 1 or self.cancelled or r.finish_reason != "length" or job.budget is None:
            return False
        if not job.thinking or self.service.end_think in self.tokens or self.service.section_begin in self.tokens:
            return False
        left = job.max_tokens - len(self.tokens) - 1
        if left < 1:
            return False
        self._submit(job.prompt + self.tokens + [self.service.end_think], left, job.guide(False) if job.guide else None)
        return True

    def _finished(self, r) -> None:
        self.finish_reason, self.stop_reason, self.error = r.finish_reason, r.stop_reason, r.error
        first = self.requests[0]
        times = {
            "submitted": first.times.get("submitted"),
            "first_token": first.times.get("first_token"),
            "finished": r.times.get("finished"),
        }
        if self.finish_reason in ("stop", "length"):
            self.service.metrics.observe(
                prompt_tokens=len(self.job.prompt),
                generated=len(self.tokens),
                times=times,
                finish_reason=self.finish_reason,
            )

    @property
    def usage(self) -> dict:
        cached = self.requests[0].cached_tokens if self.requests else 0
        prompt = len(self.job.prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(self.tokens),
            "total_tokens": prompt + len(self.tokens),
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def raise_error(self) -> None:
        if self.finish_reason == "error":
            raise APIError(500, f"generation failed: {self.error}", code="engine_error")


class ReplyPipeline:
    """Generated tokens -> reply deltas (:class:`~k25jax.serve.reply.ReplyStream`) with the request's stop
    strings cut out of the text and canonical tool-call ids (:meth:`_id`). With stop strings
    the last ``len(longest) - 1`` characters wait, so a stop string is never sent; the stop string and what
    follows it are dropped. The final message's text is exactly the concatenated deltas."""

    def __init__(
        self,
        tokenizer,
        *,
        thinking: bool,
        first_call_index: int = 0,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ):
        self.stream = ReplyStream(
            tokenizer, thinking=thinking, first_call_index=first_call_index, skip_special_tokens=skip_special_tokens
        )
        self.first_call_index = first_call_index
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.kind: str | None = None
        self.pending = ""
        self.sent = {"reasoning_content": "", "content": ""}
        self.cut = False

    def feed(self, tokens: Sequence[int]) -> list[dict]:
        return self._release(self.stream.feed(tokens), hold=self.hold)

    def finish(self, tokens: Sequence[int], finish_reason: str, stop_reason) -> tuple[list[dict], dict]:
        """The deltas of the last tokens and the final message (``finish_reason`` ``tool_calls`` with calls)."""
        deltas = self.stream.feed(tokens)
        more, message = self.stream.finish(finish_reason)
        out = self._release(deltas + more, hold=None, stop_reason=stop_reason)
        message = dict(message, **self.sent)
        message["tool_calls"] = [
            dict(c, id=self._id(k, c["function"]["name"])) for k, c in enumerate(message["tool_calls"])
        ]
        return out, message

    def _id(self, index: int, name: str) -> str:
        """The reply's call ``index`` gets ``functions.NAME:IDX``, IDX counting on from the history's calls
        (whatever IDX the model wrote: the next turn renders the history with these)."""
        return f"functions.{name}:{self.first_call_index + index}"

    def _release(self, deltas: list[dict], hold: int | None, stop_reason=None) -> list[dict]:
        out: list[dict] = []
        for d in deltas:
            if self.cut:
                break
            if "tool_call" in d:
                out += self._flush(None)
                call = dict(d["tool_call"])
                if "id" in call:
                    call["id"] = self._id(call["index"], call["name"])
                out.append({"tool_call": call})
                continue
            kind, text = next(iter(d.items()))
            if kind != self.kind:
                out += self._flush(None)
                self.kind = kind
            self.pending += text
            if hold is not None:
                out += self._flush(hold)
        if hold is None:
            if isinstance(stop_reason, str) and stop_reason in self.pending and not self.cut:
                self.pending = self.pending[: self.pending.index(stop_reason)]
                self.cut = True
            out += self._flush(None)
        return out

    def _flush(self, hold: int | None) -> list[dict]:
        if not self.pending or self.kind is None:
            return []
        n = len(self.pending) - (hold or 0)
        if n <= 0:
            return []
        text, self.pending = self.pending[:n], self.pending[n:]
        self.sent[self.kind] += text
        return [{self.kind: text}]

    @property
    def reasoning_tokens(self) -> int:
        return self.stream.reasoning_tokens


# --------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------


def create_app(
    model,
    tokenizer,
    *,
    served_model_name: str | Sequence[str] = "kimi-k2.5",
    root: str | None = None,
    api_key: str | None = None,
    max_slots: int = 8,
    max_context: int | None = None,
    max_queue: int = 256,
    max_tokens_cap: int | None = None,
    allow_remote_media: bool = False,
    engine_options: dict | None = None,
    warmup: int = 0,
) -> FastAPI:
    """The server app over ``model`` (a ``K25``, optionally sharded) and its tokenizer.

    ``served_model_name``: the name(s) clients give as ``model`` (``root``, e.g. the checkpoint path, is
    accepted too and listed by ``/v1/models``); ``api_key``: required as ``Authorization: Bearer`` or
    ``x-api-key`` on the API routes; ``max_slots`` / ``max_context``: the engine's sequences and positions per
    sequence; ``max_queue``: requests that may wait for a slot (more get 503 with ``Retry-After``);
    ``max_tokens_cap``: the most new tokens any request gets (a larger ``max_tokens`` is lowered to it);
    ``allow_remote_media``: fetch ``http(s)`` image / video URLs (else only ``data:`` URLs are read);
    ``engine_options``: more :class:`~k25jax.serve.engine.Engine` arguments; ``warmup``: compile the engine's
    prefill and decode shapes for sequences up to this many positions before serving
    (:meth:`~k25jax.serve.engine.Engine.warmup`; 0: compile each shape when a request first needs it).
    """
    engine = Engine(model, max_slots=max_slots, max_context=max_context, tokenizer=tokenizer, **(engine_options or {}))
    if warmup:
        engine.warmup(warmup)
    service = Service(
        engine,
        tokenizer,
        served_model_name=served_model_name,
        root=root,
        api_key=api_key,
        max_queue=max_queue,
        max_tokens_cap=max_tokens_cap,
        allow_remote_media=allow_remote_media,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:  # uvicorn let in-flight requests finish first (graceful shutdown); cancel what is left
            service.draining = True
            for g in list(service.live):
                g.cancel()
            await asyncio.to_thread(_settle, engine, 5.0)
            engine.stop()

    app = FastAPI(title="k25jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    _install_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(anthropic_api.router)
    _install_plain_routes(app, service)
    return app


def _settle(engine: Engine, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not engine.idle and time.monotonic() < end:
        time.sleep(0.01)


def _is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def error_response(request: Request, err: APIError) -> JSONResponse:
    body = anthropic_error_body(err) if _is_anthropic(request) else openai_error_body(err)
    status = 529 if err.status == 503 and _is_anthropic(request) else err.status
    return JSONResponse(body, status_code=status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return error_response(request, err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return error_response(request, validation_error(err.errors(), getattr(err, "body", None)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed"}
        return error_response(request, APIError(err.status_code, message.get(err.status_code, str(err.detail))))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        return error_response(request, APIError(500, f"internal error: {type(err).__name__}: {err}"))


def _install_plain_routes(app: FastAPI, service: Service) -> None:
    from fastapi import Depends

    @app.get("/health")
    async def health():
        if service.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        data, content_type = service.metrics.exposition()
        return Response(data, media_type=content_type)

    def card(name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": service.created,
            "owned_by": "k25jax",
            "root": service.root,
            "parent": None,
            "max_model_len": service.max_context,
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [card(name) for name in service.names]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str):
        return card(service.check_model(name))


def serve(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0, log_level: str = "info"
) -> None:
    """Run ``app`` with uvicorn until SIGINT / SIGTERM (then drain: in-flight requests get ``drain_timeout``
    seconds to finish, the engine stops)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level=log_level)
