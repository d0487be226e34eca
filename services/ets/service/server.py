"""The gRPC transport of the search service: servicer, health, reflection, metrics endpoint, shutdown.

Owns the gRPC edge only: a ``SearchRequest`` becomes a ``SearchCall`` for the shared
``SearchRunner`` (which checks, admits, bounds and measures it), its result becomes a
``SearchResponse`` (``runner.search``) or the runner's event stream becomes ``SearchEvent``s
(``runner.stream``), and a ``SearchFailed`` status becomes the gRPC code of the same name. The
RPC's deadline goes to the runner; a cancelled RPC cancels its search. ``SearchServer``
assembles the service: upstreams, runner, readiness monitor (driving gRPC health: NOT_SERVING
until policy and reward both answer), the Prometheus endpoint, transport security (TLS/mTLS and
the bearer token of ``ets.security``; health stays open), reflection and connection age as
settings, the response size check (a result beyond ETS_SEARCH_MAX_SEND_BYTES loses its candidate
list, never its answer), the OpenAI-compatible HTTP transport over the same runner
(``ets.service.openai_http``, its own port, same event loop, the same TLS and token), and
graceful stop of both (refuse new searches, let in-flight ones finish within the grace period,
cancel the rest). The command line is ``ets.service.main``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ets import security
from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.search.config import SearchConfig
from ets.search.answers import Grouping
from ets.search.loop import DepthReport
from ets.service import convert
from ets.service.admission import search_admission
from ets.service.grouping import EquivalenceWorker
from ets.service.metrics import MetricsHTTPServer, SearchMetrics
from ets.service.openai_http import OpenAIFrontDoor
from ets.service.readiness import Readiness
from ets.search.pipeline import ServedSearch
from ets.service.runner import SearchCall, SearchFailed, SearchRunner, Upstreams
from ets.service.status import Status
from ets.service.settings import ServiceSettings
from ets.service.upstreams import LiveUpstreams

log = logging.getLogger("ets.service")

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
# The abstract statuses carry gRPC's names; INTERNAL's outcome label is "error".
GRPC_CODES: dict[Status, grpc.StatusCode] = {s: grpc.StatusCode[s.name] for s in Status}
# Room for the gRPC frame and a stream event's wrapper around a response.
_ENVELOPE_BYTES = 1024


def _timeout_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    # grpc reports "no deadline" as None or as a huge number depending on the version.
    if remaining is None or remaining >= 10 * 365 * 24 * 3600:
        return None
    return max(remaining, 0.0)


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """Search and SearchStream over one shared ``SearchRunner``."""

    def __init__(self, runner: SearchRunner, max_send_bytes: int = 4 * 1024 * 1024) -> None:
        self._runner = runner
        self._max_send_bytes = max_send_bytes

    async def Search(self, request: search_pb2.SearchRequest,
                     context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        try:
            served = await self._runner.search(_call(request, context))
        except SearchFailed as failed:
            await _abort(context, failed)
        return self._response(served, request)

    async def SearchStream(self, request: search_pb2.SearchRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[search_pb2.SearchEvent]:
        # Leaving the block (the client went away, the deadline passed) cancels the search too.
        async with self._runner.stream(_call(request, context)) as events:
            try:
                async for event in events:
                    if isinstance(event, DepthReport):
                        yield search_pb2.SearchEvent(progress=convert.progress_to_proto(event))
                    elif isinstance(event, ServedSearch):
                        yield search_pb2.SearchEvent(result=self._response(event, request))
            except SearchFailed as failed:
                await _abort(context, failed)

    def _response(self, served: ServedSearch, request: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
        response = convert.response_to_proto(served, request.request_id)
        if request.summary_only:
            convert.omit_candidates(response)
        elif response.ByteSize() > self._max_send_bytes - _ENVELOPE_BYTES:
            # The GPU work is done: never lose the result to the send limit, drop the list instead.
            log.warning("search %s: response of %d bytes exceeds ETS_SEARCH_MAX_SEND_BYTES (%d): candidates omitted",
                        request.request_id or "-", response.ByteSize(), self._max_send_bytes)
            self._runner.metrics.results_truncated.inc()
            convert.omit_candidates(response)
            if response.ByteSize() > self._max_send_bytes - _ENVELOPE_BYTES:
                response.best.text = response.best.text[: self._max_send_bytes // 2]  # answer and stats remain
        return response


def _call(request: search_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> SearchCall:
    return SearchCall(problem=request.problem, overrides=convert.config_overrides(request.config),
                      request_id=request.request_id, timeout_s=_timeout_of(context))


async def _abort(context: grpc.aio.ServicerContext, failed: SearchFailed) -> NoReturn:
    await context.abort(GRPC_CODES[failed.failure.status], failed.failure.message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def server_options(max_send_bytes: int, max_connection_age_s: float, age_grace_s: float) -> list[tuple[str, int]]:
    """gRPC server options shared by the search and reward servers; ``age_grace_s``: how long a
    call may still run on a connection past its maximum age (the longest call allowed)."""
    options = [("grpc.so_reuseport", 0), ("grpc.max_send_message_length", max_send_bytes)]
    if max_connection_age_s > 0:
        # Clients reconnect (to any pod behind the Service) after this age; calls in flight get the
        # grace to finish, so a long search is not cut by the rotation.
        options += [("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(max(age_grace_s, 1.0) * 1000))]
    return options


class SearchServer:
    """The assembled service: gRPC server, health, reflection, metrics endpoint, readiness.

    ``upstreams``: the live policy and reward servers unless given (in-process tests pass
    scripted ones); ``grouping``: answer equivalence (a bounded worker process
    unless given)."""

    def __init__(self, settings: ServiceSettings, defaults: SearchConfig, *, upstreams: Upstreams | None = None,
                 metrics: SearchMetrics | None = None, grouping: Grouping | None = None) -> None:
        self.settings = settings
        self.defaults = defaults
        self.metrics = metrics or SearchMetrics()
        self.upstreams: Upstreams = upstreams or LiveUpstreams(
            settings.policy_url, settings.reward_addr, metrics=self.metrics,
            policy_engine_url=settings.policy_engine_url, reward_security=settings.reward_security(),
            policy_api_key=settings.policy_api_key())
        self._worker: EquivalenceWorker | None = None
        if grouping is None:
            self._worker = EquivalenceWorker()
            grouping = self._worker.group
        self.admission = search_admission(settings.max_concurrent, settings.max_queued, self._admission_changed,
                                          max_weight=settings.max_concurrent_width)
        self.health = health.aio.HealthServicer()
        self.readiness = Readiness(self.upstreams.probe, self.metrics, on_change=self._readiness_changed)
        self.runner = SearchRunner(self.upstreams, defaults, self.admission, self.metrics,
                                   grouping=grouping,
                                   on_upstream_failure=self.readiness.reprobe,
                                   upstreams_down=self.readiness.down if settings.fail_fast else None,
                                   limits=settings.limits(), selection_workers=settings.selection_workers)
        self.servicer = SearchServicer(self.runner, settings.max_send_bytes)
        self.security = settings.server_security()
        self.server = grpc.aio.server(options=server_options(settings.max_send_bytes, settings.max_connection_age_s,
                                                             settings.limit_search_s),
                                      interceptors=self.security.interceptors())
        search_pb2_grpc.add_SearchServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server)
        self.port = 0
        self._metrics_http: MetricsHTTPServer | None = None
        self.openai: OpenAIFrontDoor | None = None
        if settings.openai_port is not None:
            # The same TLS/mTLS and bearer token as the gRPC port (ets.security, one check).
            token = self.security.token()
            self.openai = OpenAIFrontDoor(
                self.runner, lambda: (self.readiness.ready, self.readiness.errors),
                authorize=None if token is None else (lambda header: security.bearer_ok(header, token)),
                ssl_context=self.security.ssl_context())

    def _admission_changed(self, running: int, queued: int) -> None:
        self.metrics.in_flight.set(running)
        self.metrics.queued.set(queued)

    async def _readiness_changed(self, ready: bool) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.SERVING if ready
                               else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_status(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> int:
        s = self.settings
        self.port = security.add_port(self.server, f"{s.host}:{s.port}", self.security)
        if self.port == 0:
            raise OSError(f"cannot bind the search service to {s.host}:{s.port}")
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if s.metrics_port is not None:
            self._metrics_http = MetricsHTTPServer(self.metrics, s.metrics_port, s.host)
        if self.openai is not None and s.openai_port is not None:
            await self.openai.start(s.host, s.openai_port)
        self.readiness.start()
        log.info("search service on %s:%d (%s; OpenAI-compatible HTTP %s; metrics %s), policy %s, reward %s",
                 s.host, self.port, self.security.describe(), self.openai.port if self.openai else "off",
                 self._metrics_http.port if self._metrics_http else "off", self.upstreams.policy_address,
                 self.upstreams.reward_address)
        return self.port

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_http.port if self._metrics_http else None

    async def wait_ready(self, timeout: float) -> bool:
        return await self.readiness.wait_ready(timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new searches, finish in-flight ones within ``grace``, cancel the rest."""
        grace = self.settings.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.readiness.stop()
        # Both transports drain at once within the same grace period.
        await asyncio.gather(self.server.stop(grace), self.openai.stop(grace) if self.openai else asyncio.sleep(0))
        # Handler tasks the server cancelled may still be unwinding their upstream calls.
        if self.runner.active:
            await asyncio.wait(list(self.runner.active), timeout=5)
        await self.runner.close()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.close)
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None
