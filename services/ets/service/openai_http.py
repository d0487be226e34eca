"""The OpenAI-compatible HTTP transport of the search service: a second front door over the runner.

Owns the HTTP edge only, on its own port (``ETS_SEARCH_OPENAI_PORT``, default 8000) in the same
process and event loop as the gRPC server: FastAPI routes served by ``uvicorn.Server.serve()`` as
a task of that loop (no thread, no second loop). ``POST /v1/chat/completions`` becomes a
``SearchCall`` for the shared ``SearchRunner`` (``ets.service.openai_request`` parses it; a
stream is the runner's ``stream``, translated to server-sent events), so
admission, limits, deadline, metrics (``api="openai"``) and the one failure classification
(``ets.service.status.status_for``) are the gRPC path's. This module only renders:

- a chat completion: ``choices[0].message.content`` is the best trajectory, ``usage`` counts the
  whole search, an ``ets`` object carries the answer, resolved config, statistics and (on request)
  every candidate;
- ``stream: true``: server-sent events in the chat-completion-chunk format; the stream starts when
  the search holds a running slot (so 400 and 429 still come as HTTP statuses), then one chunk
  with an empty delta and an ``ets.progress`` field per depth, the content, a ``stop`` chunk with
  the ``ets`` object, the usage chunk when ``stream_options.include_usage``, ``data: [DONE]``;
- errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
  of the search's ``Status`` (``HTTP_STATUS``); a failure after the stream started is an ``error``
  event (the official clients raise it).

A client that disconnects cancels its search (a watcher on the ASGI ``http.disconnect``), as a
cancelled RPC does. ``GET /v1/models`` lists the policy model and one alias per search method;
``GET /health`` is open (probes) and follows the upstreams' readiness like gRPC health. Bearer
auth: the ``authorize(header) -> bool`` hook the server assembly passes (the one token check
every transport shares, ``ets.security.bearer_ok``); 401 without it. TLS (and mTLS) with the
gRPC port's ``ssl.SSLContext`` (``ets.security.ServerSecurity.ssl_context``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
import ssl
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterator, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ets.policy.model_types import policy_model_type
from ets.errors import FieldError
from ets.search.loop import DepthReport
from ets.service.openai_request import METHOD_ALIASES, ChatSearch, parse_chat
from ets.service.openai_response import (
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChunkChoice, Choice, Delta, EtsProgress, EtsResult,
    PromptTokensDetails, Usage,
)
from ets.service.request import RequestError
from ets.search.pipeline import ServedSearch
from ets.service.runner import SearchCall, SearchEvents, SearchFailed, SearchRunner
from ets.service.status import Status, status_for

log = logging.getLogger("ets.service.openai")

API = "openai"  # the ``api`` metric label of searches taken here
# The one status mapping, in HTTP: each search Status has exactly one HTTP status.
HTTP_STATUS: dict[Status, int] = {
    Status.OK: 200,
    Status.INVALID_ARGUMENT: 400,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.UNAVAILABLE: 503,
    Status.DEADLINE_EXCEEDED: 504,
    Status.CANCELLED: 499,  # the client went away (nginx's code); nobody reads it
    Status.INTERNAL: 500,
}
if set(HTTP_STATUS) != set(Status):  # pragma: no cover - a new Status must get its HTTP status here
    raise ImportError(f"HTTP_STATUS misses {set(Status) - set(HTTP_STATUS)}")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                499: "cancelled", 500: "server_error", 503: "service_unavailable", 504: "timeout"}
# The official clients retry 429 and 5xx unless told not to: a bad request, a deadline that passed
# or an internal error would fail the same way again (and re-run the search); 503 is a blip worth
# retrying, 429 comes with Retry-After.
_NO_RETRY = frozenset({400, 401, 404, 405, 413, 500, 504})
MAX_BODY_BYTES = 1 << 20  # a problem is at most 64 000 characters (ets.service.request)

Authorize = Callable[[str | None], bool]


def _error_headers(status: int) -> dict[str, str]:
    """Retry advice the official clients follow (``x-should-retry``, ``retry-after``)."""
    headers = {"x-should-retry": "false"} if status in _NO_RETRY else {}
    if status == 429:
        headers["retry-after"] = "1"
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return headers


def _error_body(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape, with retry advice for the official clients."""
    return JSONResponse(_error_body(status, message, param, code), status_code=status, headers=_error_headers(status))


def _failure(exc: BaseException, chat: ChatSearch | None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) of a failed search, the field named as the client sent it."""
    failure = exc.failure if isinstance(exc, SearchFailed) else status_for(exc)
    cause = exc.__cause__ if isinstance(exc, SearchFailed) else exc
    message, param = failure.message, None
    if failure.status is Status.INVALID_ARGUMENT and isinstance(cause, FieldError):
        # The runner names config fields config.<name>; this client set them as ets.<name>,
        # X-ETS-<Name> or a top-level parameter.
        param = chat.param(cause.field) if chat is not None else cause.field
        message = f"{param}: {cause.message}"
    status = HTTP_STATUS[failure.status]
    return status, _error_body(status, message, param, failure.status.name.lower())


def _error_of(exc: BaseException, chat: ChatSearch) -> JSONResponse:
    status, error = _failure(exc, chat)
    return JSONResponse(error, status_code=status, headers=_error_headers(status))


def _usage(served: ServedSearch) -> Usage:
    """The whole search's tokens: every prompt sent to the policy and every token generated."""
    s = served.result.stats
    return Usage(prompt_tokens=int(s.prompt_tokens), completion_tokens=int(s.generated_tokens),
                 total_tokens=int(s.prompt_tokens + s.generated_tokens),
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=int(s.cached_prompt_tokens)))


def _content(served: ServedSearch) -> str:
    return served.candidates[served.best_index].text if served.best_index is not None else ""


def ets_object(served: ServedSearch, chat: ChatSearch, request_id: str) -> EtsResult:
    """What a chat completion cannot say: the answer, resolved config, statistics, candidates."""
    config = served.config.resolved()
    chat_template = policy_model_type(config.policy_model_type).chat
    result = EtsResult(
        request_id=request_id, answer=served.answer, best_index=served.best_index, config=config,
        # The service's wall time includes formatting/tokenizing the root and answer voting.
        stats=dataclasses.replace(served.result.stats, wall_seconds=served.wall_seconds),
        system_prompt=("none" if chat.system_prompt is None else "applied" if chat_template
                       else f"not used: policy model type {config.policy_model_type!r} has no chat template"),
        votes=list(served.votes),
    )
    if chat.candidates:
        result.candidates = list(served.candidates)
    return result


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _cancel_on_disconnect(request: Request, search: asyncio.Future[Any]) -> None:
    """Cancel ``search`` when the client goes away (the body is already read: the next ASGI
    message is ``http.disconnect``, sent when the client closes or the response is complete)."""
    while not search.done():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            if not search.done():
                log.info("client went away: cancelling its search")
                search.cancel()
            return


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the service's event loop: ``ets serve`` owns the signals (SIGTERM stops
    both transports gracefully), so uvicorn must not replace the handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpenAIFrontDoor:
    """The HTTP transport over ``runner``; ``ready()`` -> (ready, per-upstream error or None)."""

    def __init__(self, runner: SearchRunner, ready: Callable[[], tuple[bool, dict[str, str | None]]],
                 *, authorize: Authorize | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.runner = runner
        self._ready = ready
        self._authorize = authorize
        self._ssl = ssl_context
        self._draining = False
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.app = self._build_app()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (0: any free port) and serve in this event loop; the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            raise OSError(f"cannot bind the OpenAI-compatible endpoint to {host}:{port}: {err}") from err
        sock.listen(1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", http="h11", ws="none",
                                timeout_graceful_shutdown=30)
        config.load()
        # uvicorn builds its context from files; the service's one context (ets.security) is used instead.
        config.ssl = self._ssl
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="ets-openai-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the OpenAI-compatible endpoint stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Refuse new connections; in-flight requests get ``grace`` seconds, then are cancelled."""
        self._draining = True
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace))
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self._server = self._task = None

    # -- routes ------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        # No generated docs: the contract is OpenAI's, documented in docs/openai.md.
        app = FastAPI(title="ETS search (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> Response:
            return error_response(exc.status_code, str(exc.detail), code=None)

        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        return app

    def _denied(self, request: Request) -> Response | None:
        if self._authorize is None or self._authorize(request.headers.get("authorization")):
            return None
        return error_response(401, "missing or wrong bearer token (header 'Authorization: Bearer <token>')",
                              code="unauthenticated")

    async def health(self) -> Response:
        """200 while both upstreams answer, 503 (with why) otherwise or while shutting down."""
        ready, errors = self._ready()
        if self._draining:
            ready = False
        body = {"status": "SERVING" if ready else "NOT_SERVING",
                "upstreams": {k: v or "ok" for k, v in errors.items()}}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def _policy_names(self) -> tuple[str, ...]:
        """The policy's names (served name first, then its path); () while it cannot be asked."""
        try:
            return await self.runner.upstreams.model_names()
        except Exception as err:  # noqa: BLE001 - reported to the caller as the policy being down
            log.info("policy model name unavailable: %s", err)
            return ()

    async def _policy_model(self) -> str | None:
        return next(iter(await self._policy_names()), None)

    async def models(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        policy = await self._policy_model()
        ids = ([policy] if policy else []) + list(METHOD_ALIASES)
        return JSONResponse({"object": "list", "data": [
            {"id": i, "object": "model", "created": 0, "owned_by": "ets"} for i in ids]})

    async def chat_completions(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"body: larger than {MAX_BODY_BYTES} bytes", param="body")
        try:
            body = json.loads(await request.body())
        except ValueError as err:
            return error_response(400, f"body: not valid JSON ({err})", param="body", code="invalid_argument")
        if not isinstance(body, dict):
            return error_response(400, "body: must be a JSON object", param="body", code="invalid_argument")
        model = body.get("model")
        names: tuple[str, ...] = ()
        if isinstance(model, str) and model and model not in METHOD_ALIASES:
            # Only a request naming the policy model needs its names (a probe of the policy server).
            names = await self._policy_names()
            if not names:
                return error_response(503, "policy server unavailable: cannot read its model name",
                                      code="unavailable")
        try:
            chat = parse_chat(body, request.headers, names)
        except RequestError as err:
            return error_response(400, str(err), param=err.field, code="invalid_argument")
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        request_id = chat.request_id or completion_id
        call = SearchCall(problem=chat.problem, overrides=chat.overrides, request_id=request_id,
                          timeout_s=chat.timeout_s, api=API, system_prompt=chat.system_prompt,
                          max_new_tokens=chat.max_new_tokens)
        created = int(time.time())
        if chat.stream:
            return await self._start_stream(request, chat, call, completion_id, created)
        search = asyncio.ensure_future(self.runner.search(call))
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, search))
        try:
            await asyncio.wait([search])
        except asyncio.CancelledError:
            search.cancel()  # the handler itself was cancelled (server stopping)
            raise
        finally:
            watcher.cancel()
        if search.cancelled():
            return Response(status_code=HTTP_STATUS[Status.CANCELLED])
        exc = search.exception()
        if exc is not None:
            return _error_of(exc, chat)
        return JSONResponse(self._completion(search.result(), chat, completion_id, created, request_id))

    async def _start_stream(self, request: Request, chat: ChatSearch, call: SearchCall, completion_id: str,
                            created: int) -> Response:
        """The event stream once the search holds a running slot; a failure before that (400,
        429, ...) is an HTTP status of its own."""
        events = self.runner.stream(call)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, events.task))
        try:
            first = await anext(events, None)  # Started, or the search ended before it could start
        except asyncio.CancelledError:
            events.cancel()  # the handler itself was cancelled (server stopping)
            watcher.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - SearchFailed, or a bug: either way an error response
            watcher.cancel()
            return _error_of(exc, chat)
        if first is None:
            watcher.cancel()
            return Response(status_code=HTTP_STATUS[Status.CANCELLED])
        return StreamingResponse(self._stream(chat, events, watcher, completion_id, created, call.request_id),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    # -- rendering ---------------------------------------------------------------------------------
    def _completion(self, served: ServedSearch, chat: ChatSearch, completion_id: str, created: int,
                    request_id: str) -> dict[str, Any]:
        return ChatCompletion(
            id=completion_id, created=created, model=chat.model,
            choices=[Choice(index=0, message=AssistantMessage(content=_content(served)), finish_reason="stop",
                            logprobs=None)],
            usage=_usage(served), ets=ets_object(served, chat, request_id),
        ).render()

    async def _stream(self, chat: ChatSearch, events: SearchEvents, watcher: asyncio.Future[None],
                      completion_id: str, created: int, request_id: str) -> AsyncIterator[str]:
        def chunk(delta: Delta, finish: Literal["stop"] | None = None, **extra: Any) -> dict[str, Any]:
            return ChatCompletionChunk(
                id=completion_id, created=created, model=chat.model,
                choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=None)], **extra,
            ).render()

        try:
            yield _sse(chunk(Delta(role="assistant", content="")))
            async for event in events:
                if isinstance(event, DepthReport):
                    # Standard clients ignore the extra field; ours read the search's progress.
                    yield _sse(chunk(Delta(), ets=EtsProgress(progress=event)))
                elif isinstance(event, ServedSearch):
                    yield _sse(chunk(Delta(content=_content(event))))
                    yield _sse(chunk(Delta(), "stop", ets=ets_object(event, chat, request_id)))
                    if chat.include_usage:
                        yield _sse(ChatCompletionChunk(id=completion_id, created=created, model=chat.model,
                                                       choices=[], usage=_usage(event)).render())
                    yield _sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - SearchFailed, or a bug: an error event either way
            yield _sse(_failure(exc, chat)[1])
        finally:
            # Stream closed early (client gone, server stopping): stop the search with it. Not
            # awaited: this may run under a cancelled scope; the runner unwinds on its own.
            watcher.cancel()
            events.cancel()
