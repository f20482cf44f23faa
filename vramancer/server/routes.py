"""The HTTP routes: OpenAI's /v1 endpoints, /health and /metrics, as a Starlette app.

Each completion request is checked, submitted to the engine worker as a `Submit`, and answered
from its events: the first event decides the status (a refusal becomes an OpenAI error with its
status), then text streams as server-sent events (`data: {...}` lines, `data: [DONE]` last) or
is gathered into one JSON answer. A client that goes away cancels its sequence.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vramancer.engine import events as ev
from vramancer.server import protocol as p
from vramancer.server import tool_calls as calls_
from vramancer.server import tools as t
from vramancer.server.guard import BrowserGuard, CountRequests, NoTrailingSlash

if TYPE_CHECKING:
    from vramancer.server.bridge import RequestStream
    from vramancer.server.service import InferenceServer

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits a context
RETRY_AFTER_S = 1  # a full queue drains as answers finish; a second is a fair first wait

# A refusal's reason -> (HTTP status, OpenAI error type, code)
REFUSALS = {
    "too_long": (400, "invalid_request_error", "context_length_exceeded"),
    "queue_full": (429, "rate_limit_error", "queue_full"),
    "bad_request": (400, "invalid_request_error", None),
    "shutting_down": (503, "server_error", "shutting_down"),
    "not_ready": (503, "server_error", "model_not_loaded"),
}
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
MAX_TOKENS_TO_DETOKENIZE = 1 << 18
log = logging.getLogger("uvicorn.error")


class ClientGone(Exception):
    """The client hung up while its request was still being read: nobody to answer."""


def create_app(server: InferenceServer):
    """The ASGI app of one server: its routes read and submit through `server`, behind the
    request counter, the trailing-slash rule and the browser guard (guard.py)."""

    async def models(request: Request) -> Response:
        _authorise(server, request)
        state = server.bridge.model
        if not state.ready:
            raise _not_ready(state)
        return JSONResponse(p.models_body(state.name, server.created))

    async def model(request: Request) -> Response:
        _authorise(server, request)
        state = server.bridge.model
        if not state.ready:
            raise _not_ready(state)
        asked = request.path_params["model"]
        if asked.lower() not in {name.lower() for name in state.names()}:
            raise p.ApiError(404, f"the model '{asked}' does not exist; this server serves '{state.name}'.",
                             param="model", code="model_not_found")
        return JSONResponse(p.model_body(state.name, server.created))

    async def tokenize(request: Request) -> Response:
        """llama-server's shape: {"content", "add_special", "with_pieces"} -> {"tokens": [...]}."""
        _authorise(server, request)
        body = _fields(await _read_json(request, server.limits.body_s), {"content", "add_special", "with_pieces"})
        content = body.get("content")
        if not isinstance(content, str):
            raise p.ApiError(400, "'content' must be the text to tokenize.", param="content")
        add_special, with_pieces = _flag(body, "add_special"), _flag(body, "with_pieces")
        tokenizer = await _tokenizer(server)

        def work() -> list:
            with server.tokenizer_lock:
                ids = tokenizer(content, add_special_tokens=add_special)["input_ids"]
                if not with_pieces:
                    return ids
                return [{"id": i, "piece": tokenizer.decode([i])} for i in ids]

        return JSONResponse({"tokens": await asyncio.to_thread(work)})

    async def detokenize(request: Request) -> Response:
        """llama-server's shape: {"tokens": [ids]} -> {"content": text}."""
        _authorise(server, request)
        body = _fields(await _read_json(request, server.limits.body_s), {"tokens"})
        tokens = body.get("tokens")
        tokenizer = await _tokenizer(server)
        size = len(tokenizer)
        if (not isinstance(tokens, list) or len(tokens) > MAX_TOKENS_TO_DETOKENIZE
                or not all(p.is_int(i) and 0 <= i < size for i in tokens)):
            raise p.ApiError(400, f"'tokens' must be an array of token ids from 0 to {size - 1}.", param="tokens")

        def work() -> str:
            with server.tokenizer_lock:
                return tokenizer.decode(tokens)

        return JSONResponse({"content": await asyncio.to_thread(work)})

    async def chat(request: Request) -> Response:
        return await _complete(server, request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(server, request, chat=False)

    async def health(request: Request) -> Response:
        state = server.bridge.model
        if server.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if state.ready:
            return JSONResponse({"status": "ok", "model": state.name})
        body = {"status": "loading"} if state.error is None else {"status": "error", "message": state.error}
        return JSONResponse(body, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(server.metrics.text(), media_type=PROMETHEUS_TEXT)

    async def api_error(request: Request, exc: p.ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's own 404 and 405, worded as OpenAI errors too."""
        message = (f"no route {request.method} {request.url.path}." if exc.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}.")
        return JSONResponse(p.ApiError(exc.status_code, message).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def client_gone(request: Request, exc: ClientGone) -> Response:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.warning("%s hung up while sending %s %s; nothing was run.", client, request.method, request.url.path)
        return Response(status_code=499)  # never sent: the connection is gone

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={p.ApiError: api_error, HTTPException: http_error, ClientGone: client_gone},
    )
    app.router.redirect_slashes = False  # NoTrailingSlash serves them instead
    guarded = BrowserGuard(app, server.cors_origins, server.allowed_hosts, server.own_host)
    return CountRequests(NoTrailingSlash(guarded), app.routes, server.metrics.count_http)


# --- one completion --------------------------------------------------------------------------


async def _complete(server: InferenceServer, request: Request, chat: bool) -> Response:
    _authorise(server, request)
    if server.draining:
        raise p.ApiError(503, "the server is shutting down; it takes no new requests.", "server_error",
                         code="shutting_down")
    body = await _read_json(request, server.limits.body_s)
    completion = p.parse_chat(body) if chat else p.parse_completion(body)
    state = server.bridge.model
    if not state.ready:
        raise _not_ready(state)
    if completion.model.lower() not in {name.lower() for name in state.names()}:
        raise p.ApiError(404, f"the model '{completion.model}' does not exist; this server serves "
                              f"'{state.name}'.", param="model", code="model_not_found")
    prompt = completion.prompt
    constraint = ("json_schema", completion.json_schema) if completion.json_schema is not None else None
    calls_before = completion.chat and any(m.get("tool_calls") or m["role"] == "tool" for m in prompt)
    call_format = calls_.HERMES
    if completion.tools is not None or calls_before:
        call_format = calls_.format_of((await _tokenizer(server)).chat_template)
        prompt = tuple(t.template_messages(list(prompt)))
        grammar = calls_.grammar(completion.tools, call_format) if completion.tools is not None else None
        if grammar is not None:
            constraint = ("lark", grammar)
    client = f"{request.client.host}:{request.client.port}" if request.client else ""
    if completion.user:
        client = f"{client} ({completion.user})"
    stream = server.bridge.open(completion.id)
    try:
        server.submit(ev.Submit(completion.id, prompt, completion.sampling, raw=completion.raw,
                                stop=completion.stop, client=client, logprobs=completion.logprobs,
                                constraint=constraint, tools=completion.tools.tools if completion.tools else (),
                                prompt_logprobs=completion.echo and completion.logprobs is not None))
    except Exception:
        server.bridge.forget(completion.id)
        raise
    answer = _Answer(server, completion, state.name, stream, call_format)
    if completion.stream:
        # Wait for the engine's first word before the status line: a refusal is a real status.
        first = await _or_disconnect(request, answer.first_event(), answer.cancel)
        if first is None:
            return Response(status_code=499)  # the client left before anything was sent
        return StreamingResponse(answer.events(first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await _or_disconnect(request, answer.whole(), answer.cancel)
    if result is None:
        return Response(status_code=499)
    return JSONResponse(result)


class _Answer:
    """One request's answer, built from its events."""

    def __init__(self, server: InferenceServer, request: p.CompletionRequest, model: str,
                 stream: RequestStream, call_format: calls_.CallFormat = calls_.HERMES) -> None:
        self.server = server
        self.request = request
        self.model = model
        self.stream = stream
        self.call_format = call_format  # how the model writes tool calls, when it may
        self.created = p.now()
        self.finished = False

    def cancel(self) -> None:
        """The client went away: its sequence leaves the batch at the next step, its KV freed."""
        if not self.finished:
            self.finished = True
            self.server.submit(ev.Cancel(self.request.id))

    async def first_event(self) -> ev.Event:
        """The engine's first word on the request (queued, usually); a refusal is raised."""
        _, event = await self.stream.next()
        self._raise_if_refused(event)
        return event

    def _raise_if_refused(self, event: ev.Event) -> None:
        if isinstance(event, ev.RequestRefused):
            self.finished = True
            status, type_, code = REFUSALS.get(event.reason, (400, "invalid_request_error", None))
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
            param = ("messages" if self.request.chat else "prompt") if event.reason == "too_long" else None
            raise p.ApiError(status, event.message, type_, param=param, code=code, headers=headers)
        if isinstance(event, ev.Error):
            self.finished = True
            raise p.ApiError(500, event.message, "server_error")
        if isinstance(event, ev.GenerationDone) and event.cancelled:
            self.finished = True  # ended by a shutdown, not by its client (who is still here)
            raise p.ApiError(503, "the server is shutting down; the answer was not finished.", "server_error",
                             code="shutting_down")

    async def whole(self) -> dict:
        """Wait for the end; the answer as one JSON object. Its logprobs are gathered from the
        same Token events a stream sends, so both carry the same ones."""
        logprobs: list[ev.TokenLogprob] = []
        while True:
            _, event = await self.stream.next()
            self._raise_if_refused(event)
            if isinstance(event, (ev.Token, ev.PromptScored)):  # an echoed prompt's come first
                logprobs.extend(event.logprobs)
            elif isinstance(event, ev.GenerationDone):
                self.finished = True
                text, calls, finish = self._read(event)
                if self.request.echo:
                    text = self.request.prompt + text
                return p.completion_body(self.request, self.model, self.created, text, finish,
                                         event.prompt_tokens, event.new_tokens, logprobs, calls)

    def _read(self, done: ev.GenerationDone) -> tuple[str | None, list, str]:
        """(content, tool calls, finish reason) of a finished answer."""
        if self.request.tools is None:
            return done.text, [], _finish_reason(done)
        content, calls = calls_.read_calls(done.text, self.call_format)
        return content, calls, "tool_calls" if calls else _finish_reason(done)

    async def events(self, first: ev.Event) -> AsyncIterator[str]:
        """The answer as server-sent events. Cancelled (the client went away) at any await."""
        request, model, created = self.request, self.model, self.created
        try:
            if request.chat:
                yield _sse(p.chunk_body(request, model, created, first=True))
            event = first
            offset = 0  # characters of the answer's tokens so far, for completions' text_offset
            reader = calls_.CallStream(self.call_format) if request.tools is not None else None
            if request.echo and request.logprobs is None:
                yield _sse(p.chunk_body(request, model, created, text=request.prompt))
            while True:
                if isinstance(event, ev.PromptScored):  # echo with logprobs: the prompt, scored, first
                    logprobs = p.logprobs_body(request, event.logprobs, offset)
                    offset += sum(len(e.token) for e in event.logprobs)
                    yield _sse(p.chunk_body(request, model, created, text=request.prompt, logprobs=logprobs))
                elif isinstance(event, ev.Token):
                    logprobs = p.logprobs_body(request, event.logprobs, offset)
                    offset += sum(len(e.token) for e in event.logprobs)
                    piece, deltas = event.text, []
                    if reader is not None:  # text that may begin a tool call waits
                        piece, deltas = reader.feed(event.text)
                    if piece or logprobs is not None:
                        yield _sse(p.chunk_body(request, model, created, text=piece, logprobs=logprobs))
                    if deltas:
                        yield _sse(p.chunk_body(request, model, created, tool_calls=deltas))
                elif isinstance(event, (ev.GenerationDone, ev.RequestRefused, ev.Error)):
                    self.finished = True
                    if isinstance(event, ev.GenerationDone) and event.cancelled and self.server.draining:
                        # Ended at the drain's deadline: the client gets what was made, cut short.
                        event = replace(event, finish_reason="length", cancelled=False)
                    try:
                        self._raise_if_refused(event)
                    except p.ApiError as exc:  # an error mid-stream: the status line has gone out
                        yield _sse(exc.body())
                        yield "data: [DONE]\n\n"
                        return
                    if isinstance(event, ev.GenerationDone):
                        finish = _finish_reason(event)
                        if reader is not None:
                            rest, deltas, calls = reader.finish(event.text)
                            if rest:
                                yield _sse(p.chunk_body(request, model, created, text=rest))
                            if deltas:
                                yield _sse(p.chunk_body(request, model, created, tool_calls=deltas))
                            finish = "tool_calls" if calls else finish
                        yield _sse(p.chunk_body(request, model, created, finish_reason=finish,
                                                text=None if request.chat else ""))
                        if request.include_usage:
                            yield _sse(p.chunk_body(request, model, created, no_choice=True,
                                                    usage_=p.usage(event.prompt_tokens, event.new_tokens)))
                        yield "data: [DONE]\n\n"
                        return
                _, event = await self.stream.next()
        finally:
            self.cancel()  # a no-op once finished; else the client left mid-answer


def _finish_reason(done: ev.GenerationDone) -> str:
    return done.finish_reason if done.finish_reason in ("stop", "length") else "stop"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _or_disconnect(request: Request, work, on_disconnect):
    """`work`'s result, or None (after `on_disconnect()`) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        on_disconnect()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    on_disconnect()
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --- reading and checking the request ----------------------------------------------------------


def _authorise(server: InferenceServer, request: Request) -> None:
    """Only when the server was given a key: `Authorization: Bearer KEY`, compared in constant time."""
    if server.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise p.ApiError(401, "an API key is needed: send 'Authorization: Bearer <key>'.",
                         code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), server.api_key):
        raise p.ApiError(401, "the API key is wrong.", code="invalid_api_key")


async def _read_json(request: Request, deadline_s: float) -> object:
    """The body as JSON; over 1 MiB is refused by its Content-Length and, when that is missing or
    lies, while it is read; a body still arriving after `deadline_s` is refused with a 408."""
    try:
        async with asyncio.timeout(deadline_s):
            return await _read_json_now(request)
    except TimeoutError:
        raise p.ApiError(408, f"the request body did not arrive within {deadline_s:g} s.", code="request_timeout",
                         headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None


async def _read_json_now(request: Request) -> object:
    too_big = p.ApiError(413, f"the request body is over {MAX_BODY_BYTES // (1 << 20)} MiB.",
                         code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise p.ApiError(400, "the Content-Length header is not a number.")
        if int(length) > MAX_BODY_BYTES:
            raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise p.ApiError(400, "the request body is not valid JSON.") from None
    except RecursionError:  # a nesting bomb ([[[[...): Python's parser gives up at its stack's depth
        raise p.ApiError(400, "the request body nests arrays or objects too deeply.") from None


def _fields(body: object, allowed: set[str]) -> dict:
    body = p.as_object(body)
    p.only_fields(body, allowed, "")
    return body


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise p.ApiError(400, f"'{name}' must be true or false, not {value!r}.", param=name)
    return value


async def _tokenizer(server: InferenceServer):
    state = server.bridge.model
    tokenizer = await asyncio.to_thread(server.tokenizer) if state.ready else None
    if tokenizer is None:
        raise _not_ready(state)
    return tokenizer


def _not_ready(state) -> p.ApiError:
    if state.error is not None:
        return p.ApiError(503, f"no model is loaded: {state.error}", "server_error", code="model_not_loaded")
    return p.ApiError(503, "the model is still loading; try again when GET /health answers 200.", "server_error",
                      code="model_loading")
