"""The reward server (``ets reward-serve``): PRM scoring and sentence embeddings over gRPC.

Owns request validation (INVALID_ARGUMENT naming the field), the ``RewardService``
implementation (grpc.aio) with its call cap and queue bounded by items (``ets.admission``, the
search service's mechanism too), gRPC health (NOT_SERVING while the
PRM backend is down) and reflection, the metrics exporter, and graceful SIGTERM: stop accepting,
let in-flight calls finish within the grace period, stop the PRM subprocess. Its settings and
backend factory are ``ets.reward.settings``; the command line is ``ets.reward.main``.

Model work never runs on the event loop: tokenization in a thread, inference in the backends'
worker threads (or in SGLang).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ets.admission import Admission
from ets.api.v1 import reward_pb2, reward_pb2_grpc
from ets.reward.prm_types import PRM_TYPES
from ets.errors import FieldError
from ets.reward.adapters import AdapterError, EncodedTrajectory
from ets.reward.backends import BackendUnavailable, PrmBackend
from ets.reward.metrics import RewardMetrics
from ets.reward.settings import RewardServerConfig, build_backend
from ets.security import add_port
from ets.tasks import cancel_and_wait

log = logging.getLogger("ets.reward")

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


class InvalidRequest(FieldError):
    """A bad request; the message starts with the offending field."""


class Overloaded(Exception):
    """Every call slot is busy and the queue is full (RESOURCE_EXHAUSTED)."""


def _overloaded(running: int, queued_items: int) -> Overloaded:
    return Overloaded(f"reward server at capacity: {running} calls running, {queued_items} items queued "
                      f"(ETS_REWARD_MAX_CONCURRENT, ETS_REWARD_MAX_QUEUED_ITEMS); retry later")


class RewardService(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, config: RewardServerConfig, backend: PrmBackend, embedder: Any,
                 metrics: RewardMetrics) -> None:
        self.config = config
        self.backend = backend
        self.embedder = embedder
        self.metrics = metrics
        # One of ``max_concurrent`` call slots per call; the queue is bounded by items, not calls
        # (a 256-trajectory batch waits as 256 single ones).
        self.admission = Admission(config.max_concurrent, config.max_queued_items, refuse=_overloaded)
    @asynccontextmanager
    async def _rpc(self, method: str, context: grpc.aio.ServicerContext, items: int) -> AsyncIterator[None]:
        """Metrics plus the mapping of failures to gRPC codes (never a stack trace to the caller)."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self.metrics.inflight.inc()
        self.metrics.request_items.labels(method).observe(items)
        try:
            try:
                yield
            except (InvalidRequest, AdapterError) as exc:
                code = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(code, str(exc))
            except BackendUnavailable as exc:
                code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, f"{method}: {exc}")
            except Overloaded as exc:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                await context.abort(code, f"{method}: {exc}")
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # reported as INTERNAL with the reason
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                await context.abort(code, f"{method}: {type(exc).__name__}: {exc}")
        finally:
            self.metrics.inflight.dec()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)
            self.metrics.requests.labels(method, code.name).inc()
            if code != grpc.StatusCode.OK:
                self.metrics.errors.labels(method, code.name).inc()

    # -- Score --------------------------------------------------------------------------------
    def _validate_score(self, request: reward_pb2.ScoreRequest) -> None:
        n = len(request.trajectories)
        if n == 0:
            raise InvalidRequest("trajectories", "empty: send at least one trajectory")
        if n > self.config.max_batch_size:
            raise InvalidRequest("trajectories", f"{n} exceeds max_batch_size {self.config.max_batch_size}")
        if request.prm_type:
            if request.prm_type not in PRM_TYPES:
                raise InvalidRequest("prm_type",
                                     f"unknown PRM type {request.prm_type!r}; choose from {list(PRM_TYPES)}")
            if request.prm_type != self.config.prm_type:
                raise InvalidRequest("prm_type",
                                     f"this server serves {self.config.prm_type!r}, not {request.prm_type!r}")
        for i, traj in enumerate(request.trajectories):
            if not traj.question.strip():
                raise InvalidRequest(f"trajectories[{i}].question", "empty")
            if not traj.steps:
                raise InvalidRequest(f"trajectories[{i}].steps", "no steps to score")
            # An empty step is valid: a policy may stop right at its delimiter. Every adapter still
            # writes that step's boundary (tag / turn / separator), so the PRM scores it like any other.

    def _encode(self, request: reward_pb2.ScoreRequest) -> list[EncodedTrajectory]:
        encoded = []
        limit = self.backend.max_tokens
        for i, traj in enumerate(request.trajectories):
            try:
                enc = self.backend.adapter.encode(traj.question, list(traj.steps))
            except AdapterError as exc:
                raise InvalidRequest(f"trajectories[{i}].{exc.field}", exc.message) from None
            if len(enc.input_ids) > limit:
                raise InvalidRequest(f"trajectories[{i}]",
                                     f"{len(enc.input_ids)} tokens exceed the PRM's limit of {limit}")
            encoded.append(enc)
        return encoded

    async def Score(self, request: reward_pb2.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> reward_pb2.ScoreResponse:
        async with self._rpc("Score", context, len(request.trajectories)):
            self._validate_score(request)
            if not self.backend.is_up():
                raise BackendUnavailable(f"PRM backend ({self.config.prm_backend}) is not serving")
            async with self.admission.slot(cost=len(request.trajectories)):
                encoded = await asyncio.to_thread(self._encode, request)
                outcome = await self.backend.score(encoded, request.last_step_only)
            self.metrics.prm_tokens.labels("prompt").inc(outcome.prompt_tokens)
            self.metrics.prm_tokens.labels("cached").inc(outcome.cached_tokens)
            self.metrics.scored_steps.inc(sum(len(s) for s in outcome.scores))
            return reward_pb2.ScoreResponse(
                results=[reward_pb2.StepScores(scores=s) for s in outcome.scores],
                prompt_tokens=outcome.prompt_tokens, cached_tokens=outcome.cached_tokens,
            )
        raise AssertionError("unreachable")  # _rpc aborts on every failure

    # -- Embed --------------------------------------------------------------------------------
    async def Embed(self, request: reward_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> reward_pb2.EmbedResponse:
        async with self._rpc("Embed", context, len(request.texts)):
            n = len(request.texts)
            if n == 0:
                raise InvalidRequest("texts", "empty: send at least one text")
            if n > self.config.max_batch_size:
                raise InvalidRequest("texts", f"{n} exceeds max_batch_size {self.config.max_batch_size}")
            async with self.admission.slot(cost=n):
                vectors = await self.embedder.embed(list(request.texts))
            return reward_pb2.EmbedResponse(
                embeddings=[reward_pb2.Embedding(values=row.tolist()) for row in vectors], dim=int(vectors.shape[1])
            )
        raise AssertionError("unreachable")

    async def Info(self, request: reward_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> reward_pb2.InfoResponse:
        async with self._rpc("Info", context, 0):
            return reward_pb2.InfoResponse(
                prm_type=self.config.prm_type, prm_backend=self.config.prm_backend, prm_model=self.config.prm_model,
                embedder_model=self.embedder.model_name, embedding_dim=self.embedder.dim,
                max_batch_size=self.config.max_batch_size,
            )
        raise AssertionError("unreachable")


class RewardServer:
    """One reward server: gRPC + health + reflection + metrics over a backend and an embedder."""

    def __init__(self, config: RewardServerConfig) -> None:
        self.config = config.validate()
        self.metrics = RewardMetrics()
        self.backend: PrmBackend | None = None
        self.embedder: Any = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.service: RewardService | None = None
        self.port = 0
        self.metrics_port = 0
        self._backend_task: asyncio.Task[None] | None = None
        self._stopped = False

    async def _set_serving(self, up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _on_backend(self, up: bool) -> None:
        self.metrics.backend_up.set(1 if up else 0)
        if not self._stopped:
            asyncio.get_running_loop().create_task(self._set_serving(up))

    async def start(self, *, wait_backend: bool = True) -> None:
        """Load the embedder, build the backend, open the ports; with ``wait_backend`` return only
        once the PRM backend is up (else it comes up in the background, health tracking it)."""
        from ets.reward.embedder import Embedder

        cfg = self.config
        self.backend = await asyncio.to_thread(build_backend, cfg, self.metrics)
        self.backend.set_health_listener(self._on_backend)
        self.embedder = Embedder(cfg.embedder_model or None, device=cfg.device,
                                 on_batch=self.metrics.model_batch.labels("embedder").observe)
        await asyncio.to_thread(self.embedder.load)

        self.metrics_port = self.metrics.serve(cfg.metrics_port, host=cfg.host)
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        if cfg.max_connection_age_s > 0:
            # Clients reconnect after this age (spreading over new replicas); calls in flight finish.
            options += [("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(max(cfg.grace_s, 60.0) * 1000))]
        sec = cfg.security()
        self.server = grpc.aio.server(options=options, interceptors=sec.interceptors())
        self.service = RewardService(cfg, self.backend, self.embedder, self.metrics)
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if cfg.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server,
            )
        self.port = add_port(self.server, f"{cfg.host}:{cfg.port}", sec)
        await self._set_serving(False)
        await self.server.start()
        log.info("reward server on %s:%d (%s; metrics %d), PRM %s via %s", cfg.host, self.port, sec.describe(),
                 self.metrics_port, cfg.prm_type, cfg.prm_backend)
        self._backend_task = asyncio.get_running_loop().create_task(self.backend.start())
        if wait_backend:
            await self._backend_task

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, finish in-flight calls within ``grace``, then stop the PRM and embedder."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        await cancel_and_wait(self._backend_task)
        if self.backend is not None:
            await self.backend.close()
        if self.embedder is not None:
            await self.embedder.close()
        self.metrics.shutdown()
