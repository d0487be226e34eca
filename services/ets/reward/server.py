"""The reward server (``ets reward-serve``): PRM scoring and sentence embeddings over gRPC.

Owns the server configuration (``RewardServerConfig``: env ``ETS_PRM_*``, ``ETS_EMBEDDER_MODEL``,
``ETS_DEVICE``, ``ETS_REWARD_*``, and the flags generated from them by ``ets.settings``), request
validation (INVALID_ARGUMENT naming the field), the ``RewardService`` implementation (grpc.aio),
gRPC health (NOT_SERVING while the PRM backend is down) and reflection, the metrics exporter, and graceful SIGTERM:
stop accepting, let in-flight calls finish within the grace period, stop the PRM subprocess.

Model work never runs on the event loop: tokenization in a thread, inference in the backends'
worker threads (or in SGLang).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ets import settings
from ets.api.v1 import reward_pb2, reward_pb2_grpc
from ets.config import MODEL_FREE_PRM_TYPES, PRM_TYPES
from ets.engine.launcher import DEVICES
from ets.errors import FieldError
from ets.reward.adapters import AdapterError, EncodedTrajectory, PrmOptions
from ets.reward.backends import BACKENDS, BackendUnavailable, PrmBackend
from ets.reward.metrics import RewardMetrics
from ets.security import ServerSecurity, add_port
from ets.settings import setting

log = logging.getLogger("ets.reward")

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
GPU_PRM_MEM_FRACTION = 0.85


class ConfigError(FieldError):
    """An invalid server setting; ``field`` names the env var."""


class InvalidRequest(FieldError):
    """A bad request; the message starts with the offending field."""


@dataclass(frozen=True)
class RewardServerConfig:
    """The reward server's settings: each field's env var, ``--flag``, default and bounds are
    declared once here (``ets.settings``); ``validate`` adds the rules that span fields."""

    prm_model: str = setting("", env="ETS_PRM_MODEL", help="PRM model folder (none for the rules backend)")
    prm_type: str = setting("math-shepherd", env="ETS_PRM_TYPE", choices=PRM_TYPES)
    prm_backend: str = setting("sglang", env="ETS_PRM_BACKEND", choices=BACKENDS)
    # Attach to this SGLang PRM server instead of spawning one (sglang backend only).
    prm_url: str = setting("", env="ETS_PRM_URL", help="attach to this SGLang PRM server instead of spawning one")
    prm_port: int = setting(30001, env="ETS_PRM_PORT", ge=0, le=65535, help="port of the spawned SGLang PRM server")
    # Bind address of the spawned PRM server: loopback by default (only the reward server talks to
    # it); 0.0.0.0 in containers so Prometheus can scrape its /metrics.
    prm_host: str = setting("127.0.0.1", env="ETS_PRM_HOST", help="bind address of the spawned SGLang PRM server")
    prm_mem_fraction: float | None = setting(None, env="ETS_PRM_MEM_FRACTION", gt=0, lt=1,
                                             help="spawned PRM's --mem-fraction-static (0.85 on GPU)")
    prm_start_timeout_s: float = setting(600.0, env="ETS_PRM_START_TIMEOUT_S", ge=0,
                                         help="seconds the spawned PRM server may take to become healthy")
    prm_dtype: str = setting("auto", env="ETS_PRM_DTYPE", help="transformers backend dtype: auto|bfloat16|float32")
    embedder_model: str = setting("", env="ETS_EMBEDDER_MODEL", help="sentence-transformers model")
    device: str = setting("cuda", env="ETS_DEVICE", choices=DEVICES, lower=True)
    host: str = setting("0.0.0.0", env="ETS_REWARD_HOST", help="bind address")
    port: int = setting(50052, env="ETS_REWARD_PORT", ge=0, le=65535, help="gRPC port (0 = any free port)")
    metrics_port: int = setting(9092, env="ETS_REWARD_METRICS_PORT", ge=0, le=65535, help="Prometheus port")
    # Trajectories per Score call and texts per Embed call.
    max_batch_size: int = setting(256, env="ETS_REWARD_MAX_BATCH_SIZE", ge=1, help="trajectories/texts per call")
    grace_s: float = setting(10.0, env="ETS_REWARD_GRACE_S", ge=0, help="SIGTERM grace period for in-flight calls")
    log_dir: str = setting("/tmp/ets-reward-logs", env="ETS_REWARD_LOG_DIR", help="where the spawned PRM server logs")
    log_level: str = setting("INFO", env="ETS_LOG_LEVEL", help="Python logging level")
    # Capacity: Score/Embed calls at once, and trajectories/texts of the calls waiting for a turn;
    # beyond the queue a call gets RESOURCE_EXHAUSTED at once (memory bounded by configuration).
    max_concurrent: int = setting(32, env="ETS_REWARD_MAX_CONCURRENT", ge=1,
                                  help="Score/Embed calls served at once")
    max_queued_items: int = setting(4096, env="ETS_REWARD_MAX_QUEUED_ITEMS", ge=0,
                                    help="trajectories/texts of calls waiting for a turn; beyond: RESOURCE_EXHAUSTED")
    reflection: bool = setting(True, env="ETS_REWARD_REFLECTION", help="gRPC server reflection")
    max_connection_age_s: float = setting(300.0, env="ETS_REWARD_MAX_CONNECTION_AGE_S", ge=0,
                                          help="close client connections after this long (0 = never)")
    tls_cert_file: str = setting("", env="ETS_REWARD_TLS_CERT_FILE", help="server TLS certificate (PEM); "
                                 "unset = plaintext")
    tls_key_file: str = setting("", env="ETS_REWARD_TLS_KEY_FILE", help="server TLS private key (PEM)")
    tls_client_ca_file: str = setting("", env="ETS_REWARD_TLS_CLIENT_CA_FILE",
                                      help="CA of client certificates; set = mTLS")
    auth_token_file: str = setting("", env="ETS_REWARD_AUTH_TOKEN_FILE",
                                   help="bearer token Score/Embed/Info require (health stays open); unset = no auth")
    # ETS_PRM_STEP_TAG, _PLUS, _MINUS, _SEPARATOR, _YES, _NO, _JUDGE_*_TURN (PrmOptions.from_env).
    options: PrmOptions = field(default_factory=PrmOptions)

    def validate(self) -> "RewardServerConfig":
        settings.check(self, error=ConfigError, naming="env")
        model_free = self.prm_type in MODEL_FREE_PRM_TYPES
        if model_free and self.prm_backend != "rules":
            raise ConfigError("ETS_PRM_BACKEND", f"PRM type {self.prm_type!r} is scored by rules without a model: "
                              f"set ETS_PRM_BACKEND=rules, got {self.prm_backend!r}")
        if self.prm_backend == "rules" and not model_free:
            raise ConfigError("ETS_PRM_TYPE", f"the rules backend serves {list(MODEL_FREE_PRM_TYPES)}; "
                              f"{self.prm_type!r} needs a model (ETS_PRM_BACKEND=sglang or transformers)")
        if model_free and self.prm_model:
            # Info would report a model that scores nothing.
            raise ConfigError("ETS_PRM_MODEL", f"PRM type {self.prm_type!r} uses no model; leave it empty")
        if not model_free and not self.prm_model:
            raise ConfigError("ETS_PRM_MODEL", "required: the PRM model folder (its tokenizer is read locally)")
        if not self.prm_host or any(c.isspace() for c in self.prm_host):
            raise ConfigError("ETS_PRM_HOST",
                              f"must be one bind address (127.0.0.1, 0.0.0.0, ...), got {self.prm_host!r}")
        if self.prm_url and self.prm_backend != "sglang":
            raise ConfigError("ETS_PRM_URL", "only the sglang backend attaches to a PRM server URL")
        try:
            self.security().check()
        except FieldError as err:
            raise ConfigError(err.field, err.message) from None
        return self

    def security(self) -> ServerSecurity:
        return ServerSecurity(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file, self.auth_token_file,
                              env_prefix="ETS_REWARD_")

    def replace(self, **overrides: Any) -> "RewardServerConfig":
        return replace(self, **overrides)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RewardServerConfig":
        env = os.environ if env is None else env
        return settings.from_env(cls, env, base=cls(options=PrmOptions.from_env(env)), error=ConfigError)


def build_backend(config: RewardServerConfig, metrics: RewardMetrics) -> PrmBackend:
    """The configured PRM backend (not started). Raises AdapterError/ConfigError naming the setting."""
    on_batch = metrics.model_batch.labels("prm").observe
    if config.prm_backend == "rules":
        from ets.reward.backends.rules_backend import RulesBackend

        return RulesBackend(config.prm_type)
    if config.prm_backend == "transformers":
        from ets.reward.backends.transformers_backend import TransformersBackend

        return TransformersBackend(config.prm_model, config.prm_type, options=config.options, device=config.device,
                                   dtype=config.prm_dtype, max_batch_items=config.max_batch_size, on_batch=on_batch)
    from ets.engine.launcher import config_from_env
    from ets.engine.supervisor import EngineSupervisor
    from ets.reward.backends.sglang_backend import SglangBackend

    names: dict[str, Any] = dict(name="PRM", port_setting="ETS_PRM_PORT", url_setting="ETS_PRM_URL")
    if config.prm_url:
        supervisor = EngineSupervisor(url=config.prm_url, start_timeout_s=config.prm_start_timeout_s,
                                      on_restart=metrics.prm_restarts.inc, **names)
    else:
        # ETS_PRM_SGLANG_* tunes the spawned server like ETS_POLICY_* tunes the policy's.
        launch = config_from_env(prefix="ETS_PRM_SGLANG_", default_port=config.prm_port).replace(
            model_path=config.prm_model, host=config.prm_host, port=config.prm_port, device=config.device,
            served_name="prm",
        )
        if launch.mem_fraction_static is None:
            mem = config.prm_mem_fraction
            if mem is None and config.device == "cuda":
                mem = GPU_PRM_MEM_FRACTION
            launch = launch.replace(mem_fraction_static=mem)
        launch.validate()
        supervisor = EngineSupervisor(launch=launch, log_dir=config.log_dir, start_timeout_s=config.prm_start_timeout_s,
                                      on_restart=metrics.prm_restarts.inc, **names)
    backend = SglangBackend(config.prm_model, config.prm_type, supervisor, options=config.options)
    return backend


class Overloaded(Exception):
    """Every call slot is busy and the queue is full (RESOURCE_EXHAUSTED)."""


class RewardService(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, config: RewardServerConfig, backend: PrmBackend, embedder: Any,
                 metrics: RewardMetrics) -> None:
        self.config = config
        self.backend = backend
        self.embedder = embedder
        self.metrics = metrics
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self.queued_items = 0

    @asynccontextmanager
    async def _turn(self, items: int) -> AsyncIterator[None]:
        """Hold one of ``max_concurrent`` call slots; wait in a queue bounded by items (not calls:
        a 256-trajectory batch weighs 256 times a single one)."""
        if self._slots.locked():
            if self.queued_items + items > self.config.max_queued_items:
                raise Overloaded(f"reward server at capacity: {self.config.max_concurrent} calls running, "
                                 f"{self.queued_items} items queued (ETS_REWARD_MAX_CONCURRENT, "
                                 f"ETS_REWARD_MAX_QUEUED_ITEMS); retry later")
            self.queued_items += items
            try:
                await self._slots.acquire()
            finally:
                self.queued_items -= items
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

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
            async with self._turn(len(request.trajectories)):
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
            async with self._turn(n):
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
        if self._backend_task is not None and not self._backend_task.done():
            self._backend_task.cancel()
            # Its outcome (cancelled, or an error already reported) is not this caller's.
            await asyncio.gather(self._backend_task, return_exceptions=True)
        if self.backend is not None:
            await self.backend.close()
        if self.embedder is not None:
            await self.embedder.close()
        self.metrics.shutdown()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ets reward-serve", description="Run the reward server (PRM + embedder, gRPC). "
                                "Flags override the environment variables named in their help.")
    settings.add_flags(p, RewardServerConfig)
    p.add_argument("--ready-file", help="write 'PORT METRICS_PORT' here once serving (tests, scripts)")
    return p


def config_from_args(argv: Sequence[str],
                     env: Mapping[str, str] | None = None) -> tuple[RewardServerConfig, str | None]:
    args = _parser().parse_args(list(argv))
    env = os.environ if env is None else env
    config = settings.from_args(RewardServerConfig, args, env=env,
                                base=RewardServerConfig(options=PrmOptions.from_env(env)), error=ConfigError)
    return config, args.ready_file


async def _serve(config: RewardServerConfig, ready_file: str | None) -> int:
    server = RewardServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start(wait_backend=False)
        if ready_file:
            Path(ready_file).write_text(f"{server.port} {server.metrics_port}\n")
        backend_task = server._backend_task
        assert backend_task is not None
        stop_wait = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({backend_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if backend_task in done and backend_task.exception() is not None:
            exc = backend_task.exception()
            log.error("PRM backend failed to start: %s", exc)
            stop_wait.cancel()
            return 1
        await stop_wait
        log.info("signal received: draining for up to %.0fs", config.grace_s)
        return 0
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    try:
        config, ready_file = config_from_args(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config.validate()
        code = asyncio.run(_serve(config, ready_file))
    except (ConfigError, AdapterError) as exc:
        print(f"ets reward-serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
