"""The gRPC search service (``ets serve``): servicer, health, reflection, metrics, shutdown.

Owns the transport edge only: request validation and status mapping, admission control
(RESOURCE_EXHAUSTED beyond the limits), deadline/cancellation propagation (the search runs in
the RPC's task, so a cancelled or expired RPC cancels its policy and reward calls), the
per-depth progress stream, the upstream readiness monitor that drives the gRPC health status
(NOT_SERVING until policy and reward both answer; the service starts even when they are down),
the Prometheus endpoint, and SIGTERM: stop accepting, let in-flight searches finish within the
grace period, cancel the rest.

    ets serve [--port 50051] [--metrics-port 9091] [--policy-url URL] [--policy-engine-url URL]
              [--reward-addr HOST:PORT] [--grace 30] [--max-concurrent N] [--max-queued N]

Settings (env vars and the flags generated from them): ``ets.service.settings.ServiceSettings``;
search defaults: ETS_SEARCH_<FIELD> (``SearchConfig.from_env``).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.config import ConfigError, SearchConfig
from ets.service import convert
from ets.service.admission import Admission, QueueFull
from ets.service.metrics import MetricsHTTPServer, SearchMetrics
from ets.service.runner import (
    LiveUpstreams,
    SearchRunner,
    ServedSearch,
    UpstreamRejected,
    UpstreamUnavailable,
)
from ets.service.settings import ServiceSettings, settings_from_args

__all__ = ["SearchServer", "SearchServicer", "ServiceSettings", "serve", "settings_from_args"]

log = logging.getLogger("ets.service")

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
# How often upstreams are probed: quickly while one is down, slowly once both answer.
PROBE_INTERVAL_DOWN_S = 1.0
PROBE_INTERVAL_UP_S = 5.0


class _Outcome(Exception):
    """An RPC failure with its status and the metric outcome label."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """Search and SearchStream over one shared ``SearchRunner``."""

    def __init__(self, runner: SearchRunner, defaults: SearchConfig, admission: Admission,
                 metrics: SearchMetrics, on_upstream_failure: Callable[[], None] | None = None) -> None:
        self._runner = runner
        self._defaults = defaults
        self._admission = admission
        self._metrics = metrics
        self._on_upstream_failure = on_upstream_failure
        # Tasks of searches in progress (the RPC handler tasks); tests and shutdown look here.
        self.active: set[asyncio.Task[object]] = set()

    # -- RPCs ---------------------------------------------------------------------------------
    async def Search(self, request: search_pb2.SearchRequest,
                     context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        served = await self._serve(request, context, on_depth=None)
        if served is None:  # the status is already set on the context
            return search_pb2.SearchResponse()
        return served

    async def SearchStream(self, request: search_pb2.SearchRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[search_pb2.SearchEvent]:
        events: asyncio.Queue[search_pb2.DepthProgress | None] = asyncio.Queue()
        task = asyncio.ensure_future(self._serve(request, context, on_depth=events.put_nowait))
        task.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while True:
                progress = await events.get()
                if progress is None:
                    break
                yield search_pb2.SearchEvent(progress=progress)
            response = await task
        finally:
            # The client went away (or the deadline passed) mid-stream: stop the search too.
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if response is not None:
            yield search_pb2.SearchEvent(result=response)

    # -- shared path --------------------------------------------------------------------------
    async def _serve(self, request: search_pb2.SearchRequest, context: grpc.aio.ServicerContext,
                     on_depth: Callable[[search_pb2.DepthProgress], None] | None,
                     ) -> search_pb2.SearchResponse | None:
        method = (request.config.method.strip() or self._defaults.method)[:32]
        started = time.perf_counter()
        task = asyncio.current_task()
        if task is not None:
            self.active.add(task)
        try:
            try:
                problem = convert.validate_problem(request.problem)
                config = convert.config_from_proto(request.config, self._defaults)
                method = config.method
                async with self._admission.slot() as waited:
                    self._metrics.queue_wait.observe(waited)
                    run_started = time.perf_counter()

                    def report(progress: object) -> None:
                        self._metrics.observe_selection(method, int(getattr(progress, "kv_tokens", 0)))
                        if on_depth is not None:
                            on_depth(convert.progress_to_proto(progress))

                    served = await self._run_bounded(context, problem, config, report,
                                                     request.config.prm_type.strip())
                    self._metrics.search_duration.labels(method=method).observe(time.perf_counter() - run_started)
            except convert.RequestError as err:
                raise _Outcome(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            except ConfigError as err:  # raised by the search core on a combination it refuses
                raise _Outcome(grpc.StatusCode.INVALID_ARGUMENT, f"config.{err.field}: {err.message}") from None
            except QueueFull as err:
                raise _Outcome(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
            except UpstreamUnavailable as err:
                if self._on_upstream_failure is not None:
                    self._on_upstream_failure()
                raise _Outcome(grpc.StatusCode.UNAVAILABLE, str(err)) from None
            except UpstreamRejected as err:
                raise _Outcome(err.code, str(err)) from None
            except TimeoutError:
                raise _Outcome(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"search did not finish before the deadline ({time.perf_counter() - started:.1f}s)") from None
        except _Outcome as failure:
            self._metrics.observe_failure(method, failure.code.name.lower())
            log.info("search %s failed: %s: %s", request.request_id or "-", failure.code.name, failure.message)
            await context.abort(failure.code, failure.message)
            return None  # pragma: no cover - abort raises
        except asyncio.CancelledError:
            # The client gives up at its own deadline and cancels the stream, which can reach us a
            # little before our copy of the deadline passes: count the last second as expiry.
            expired = _has_deadline(context) and (context.time_remaining() or 0.0) <= DEADLINE_SLACK_S
            self._metrics.observe_failure(method, "deadline_exceeded" if expired else "cancelled")
            log.info("search %s %s", request.request_id or "-", "deadline passed" if expired else "cancelled")
            raise
        except Exception as err:  # noqa: BLE001 - last line: a clear INTERNAL, never a stack trace
            if isinstance(err, grpc.aio.AbortError):
                raise
            log.exception("search %s failed", request.request_id or "-")
            self._metrics.observe_failure(method, "error")
            await context.abort(grpc.StatusCode.INTERNAL, f"search failed: {type(err).__name__}: {err}")
            return None  # pragma: no cover
        finally:
            if task is not None:
                self.active.discard(task)
        self._metrics.observe_result(method, served.result.stats)
        response = served.to_proto(request.request_id)
        log.info("search %s ok: method=%s width=%d answer=%r wall=%.2fs", request.request_id or "-", method,
                 config.width, response.answer, response.stats.wall_seconds)
        return response

    async def _run_bounded(self, context: grpc.aio.ServicerContext, problem: str, config: SearchConfig,
                           report: Callable[[object], None], expect_prm_type: str) -> ServedSearch:
        # grpc.aio cancels the handler when the client cancels; the explicit timeout makes the
        # deadline bind even while the search is between awaits on the network.
        remaining = context.time_remaining() if _has_deadline(context) else None
        run = self._runner.run(problem, config, on_depth=report, expect_prm_type=expect_prm_type)
        if remaining is None:
            return await run
        async with asyncio.timeout(max(remaining, 0.0)):
            return await run


DEADLINE_SLACK_S = 1.0


def _has_deadline(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    # grpc reports "no deadline" as None or as a huge number depending on the version.
    return remaining is not None and remaining < 10 * 365 * 24 * 3600


class SearchServer:
    """The assembled service: gRPC server, health, reflection, metrics endpoint, readiness."""

    def __init__(self, settings: ServiceSettings, defaults: SearchConfig,
                 runner: SearchRunner | None = None, metrics: SearchMetrics | None = None) -> None:
        self.settings = settings
        self.defaults = defaults
        self.metrics = metrics or SearchMetrics()
        self.runner: SearchRunner = runner or SearchRunner(
            LiveUpstreams(settings.policy_url, settings.reward_addr, metrics=self.metrics,
                          policy_engine_url=settings.policy_engine_url))
        self.admission = Admission(settings.max_concurrent, settings.max_queued, self._admission_changed)
        self.health = health.aio.HealthServicer()
        self.servicer = SearchServicer(self.runner, defaults, self.admission, self.metrics,
                                       on_upstream_failure=self.reprobe)
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        search_pb2_grpc.add_SearchServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        self.port = 0
        self._metrics_http: MetricsHTTPServer | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._reprobe = asyncio.Event()
        self.ready = False
        self.upstream_errors: dict[str, str | None] = {"policy": "not probed yet", "reward": "not probed yet"}

    def _admission_changed(self, running: int, queued: int) -> None:
        self.metrics.in_flight.set(running)
        self.metrics.queued.set(queued)

    async def start(self) -> int:
        s = self.settings
        self.port = self.server.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the search service to {s.host}:{s.port}")
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if s.metrics_port is not None:
            self._metrics_http = MetricsHTTPServer(self.metrics, s.metrics_port, s.host)
        self._monitor = asyncio.create_task(self._watch_upstreams(), name="ets-upstream-monitor")
        log.info("search service on %s:%d (metrics %s), policy %s, reward %s", s.host, self.port,
                 self._metrics_http.port if self._metrics_http else "off", s.policy_url, s.reward_addr)
        return self.port

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_http.port if self._metrics_http else None

    async def _set_status(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def reprobe(self) -> None:
        """Probe the upstreams now (after a search saw one fail)."""
        self._reprobe.set()

    async def probe_once(self) -> bool:
        errors = await self.runner.probe()
        self.upstream_errors = errors
        for upstream, error in errors.items():
            self.metrics.upstream_up.labels(upstream=upstream).set(0 if error else 1)
        ready = all(e is None for e in errors.values())
        if ready != self.ready:
            log.info("upstreams %s: %s", "ready" if ready else "not ready",
                     {k: v or "ok" for k, v in errors.items()})
        self.ready = ready
        await self._set_status(health_pb2.HealthCheckResponse.SERVING if ready
                               else health_pb2.HealthCheckResponse.NOT_SERVING)
        return ready

    async def _watch_upstreams(self) -> None:
        while True:
            try:
                ready = await self.probe_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive any probe bug
                log.exception("upstream probe failed")
                ready = False
            self._reprobe.clear()
            try:
                await asyncio.wait_for(self._reprobe.wait(),
                                       PROBE_INTERVAL_UP_S if ready else PROBE_INTERVAL_DOWN_S)
            except TimeoutError:
                pass

    async def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.ready

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new searches, finish in-flight ones within ``grace``, cancel the rest."""
        grace = self.settings.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        await self.server.stop(grace)
        # Handler tasks the server cancelled may still be unwinding their upstream calls.
        if self.servicer.active:
            await asyncio.wait(list(self.servicer.active), timeout=5)
        await self.runner.close()
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None


async def serve(settings: ServiceSettings, defaults: SearchConfig,
                ready: Callable[[SearchServer], Awaitable[None]] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    server = SearchServer(settings, defaults)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if ready is not None:
        await ready(server)
    await stop.wait()
    log.info("shutting down: %d search(es) in flight, grace %.0fs", server.admission.running, settings.grace_s)
    await server.stop()
    log.info("stopped")


def main(argv: list[str]) -> None:
    settings = settings_from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One series per counter: the *_created gauges only double the exposition.
    prometheus_client.disable_created_metrics()
    try:
        defaults = SearchConfig.from_env()
    except ConfigError as err:
        print(f"ets serve: bad search default {err}", file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(serve(settings, defaults))


if __name__ == "__main__":
    main(sys.argv[1:])
