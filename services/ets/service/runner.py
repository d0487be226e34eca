"""Run one search against the live policy and reward servers (the service's engine).

Owns: building the root (format per policy model type, tokenize on the policy server so the ids
are exactly the engine's), plugging the policy generator and the reward client into the pure
search loop, timing and classifying every upstream call (Prometheus latency/error metrics;
failures become ``UpstreamUnavailable`` naming the policy or the reward server), choosing the
answer (``ets.search.answers``), and readiness probes of both upstreams.

Many searches share one policy HTTP session and one reward gRPC channel; all expansions of a
depth go out as one batched call (the loop batches through the interfaces).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import aiohttp
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ets.config import ConfigError, SearchConfig
from ets.search.interfaces import (
    ExpandRequest,
    SampledStep,
    ScoredTrajectory,
    StepGenerator,
    StepParams,
    StepScorer,
)
from ets.service.metrics import SearchMetrics

PROBE_TIMEOUT_S = 10.0


class UpstreamUnavailable(Exception):
    """The policy or the reward server could not serve a call (maps to UNAVAILABLE)."""

    def __init__(self, upstream: str, address: str, detail: str) -> None:
        super().__init__(f"{upstream} server unavailable at {address}: {detail}")
        self.upstream = upstream
        self.address = address
        self.detail = detail


class UpstreamRejected(Exception):
    """An upstream refused the request itself (e.g. a PRM type the reward server does not serve)."""

    def __init__(self, upstream: str, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(f"{upstream} server rejected the request: {detail}")
        self.upstream = upstream
        self.code = code
        self.detail = detail


# ---- upstream call instrumentation ------------------------------------------------------------

_REASONS = {"PolicyUnavailable": "unavailable", "PolicyRequestError": "rejected", "PolicyServerError": "server_error"}


def _reason(err: BaseException) -> str:
    """A short, bounded label for the error metrics."""
    if type(err).__name__ in _REASONS:
        return _REASONS[type(err).__name__]
    code = _grpc_code(err)
    if code is not None:
        return code.name.lower()
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(err, aiohttp.ClientResponseError):
        return f"http_{err.status}"
    if isinstance(err, (aiohttp.ClientConnectionError, ConnectionError, OSError)):
        return "unavailable"
    if isinstance(err, ValueError):
        return "bad_response"
    return "error"


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text


def policy_failure(address: str, err: BaseException) -> Exception:
    """The service-level error for a failed policy call: the policy refusing the request itself
    (HTTP 4xx, e.g. a prompt beyond its context length) is the request's fault; anything else
    (unreachable, timeout, 5xx, a malformed answer) means the policy is not serving."""
    try:
        from ets.policy.client import PolicyRequestError
    except ImportError:  # pragma: no cover - the search image always ships the client
        PolicyRequestError = ()  # type: ignore[assignment,misc]
    if PolicyRequestError and isinstance(err, PolicyRequestError):
        return UpstreamRejected("policy", grpc.StatusCode.INVALID_ARGUMENT, str(err))
    return UpstreamUnavailable("policy", address, _describe(err))


class TimedGenerator:
    """A ``StepGenerator`` that times each batched call and turns failures into UNAVAILABLE."""

    def __init__(self, inner: StepGenerator, address: str, metrics: SearchMetrics) -> None:
        self._inner = inner
        self._address = address
        self._metrics = metrics
        self.seconds = 0.0

    async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
        start = time.perf_counter()
        try:
            return await self._inner.expand(requests, params)
        except (asyncio.CancelledError, ConfigError, UpstreamUnavailable, UpstreamRejected):
            raise
        except Exception as err:  # noqa: BLE001 - every other failure is the policy's
            self._metrics.policy_call_errors.labels(reason=_reason(err)).inc()
            raise policy_failure(self._address, err) from err
        finally:
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self._metrics.policy_call_duration.labels(call="generate").observe(elapsed)


class TimedScorer:
    """A ``StepScorer`` that times each call; reward failures become UNAVAILABLE (or the
    reward server's INVALID_ARGUMENT, e.g. a prm_type it does not serve)."""

    def __init__(self, inner: StepScorer, address: str, metrics: SearchMetrics) -> None:
        self._inner = inner
        self._address = address
        self._metrics = metrics
        self.seconds = 0.0

    async def _call(self, call: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return await fn()
        except (asyncio.CancelledError, ConfigError, UpstreamUnavailable, UpstreamRejected):
            raise
        except Exception as err:  # noqa: BLE001
            self._metrics.reward_call_errors.labels(call=call, reason=_reason(err)).inc()
            code = _grpc_code(err)
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise UpstreamRejected("reward", grpc.StatusCode.INVALID_ARGUMENT, _describe(err)) from err
            raise UpstreamUnavailable("reward", self._address, _describe(err)) from err
        finally:
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self._metrics.reward_call_duration.labels(call=call).observe(elapsed)

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
        return await self._call("score", lambda: self._inner.score_last_steps(trajectories))

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await self._call("embed", lambda: self._inner.embed(texts))


def _grpc_code(err: BaseException) -> grpc.StatusCode | None:
    """The gRPC status behind ``err`` (directly or as its cause), if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, grpc.aio.AioRpcError):
            return seen.code()
        code = getattr(seen, "code", None)
        if isinstance(code, grpc.StatusCode):
            return code
        seen = seen.__cause__
    return None


# ---- the served result ----------------------------------------------------------------------

@dataclass
class ServedCandidate:
    text: str
    answer: str
    step_scores: list[float]
    aggregate_score: float
    finish_reason: str
    depth: int
    tokens: int


@dataclass
class ServedSearch:
    """A finished search as the service returns it (``convert.response_to_proto`` builds the proto)."""

    config: SearchConfig
    result: Any  # ets.search.loop.SearchResult
    answer: str
    candidates: list[ServedCandidate]
    best_index: int | None
    wall_seconds: float
    policy_seconds: float = 0.0
    reward_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def to_proto(self, request_id: str = "") -> Any:
        from ets.service.convert import response_to_proto

        return response_to_proto(self, request_id)


# ---- upstreams ----------------------------------------------------------------------------------

class Upstreams(Protocol):
    """What a search needs from the outside world."""

    async def root(self, question: str, config: SearchConfig) -> Any: ...
    def generator(self, config: SearchConfig) -> StepGenerator: ...
    def scorer(self, config: SearchConfig, expect_prm_type: str = "") -> StepScorer: ...
    async def probe(self) -> dict[str, str | None]: ...
    async def close(self) -> None: ...

    policy_address: str
    reward_address: str


class RewardScorer:
    """``StepScorer`` over the shared ``RewardClient``; when the request named a PRM type, the
    reward server checks it against the PRM it serves (INVALID_ARGUMENT on a mismatch)."""

    def __init__(self, client: Any, prm_type: str = "") -> None:
        self._client = client
        self._prm_type = prm_type

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
        # Steps that are empty (the policy stopped at its delimiter) go as they are: the reward
        # server scores them at their boundary.
        scores = await self._client.score(trajectories, last_step_only=True, prm_type=self._prm_type)
        return [s[-1] for s in scores]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await self._client.embed(texts)


class LiveUpstreams:
    """The SGLang policy server (HTTP) and the reward server (gRPC), shared by all searches.

    ``policy_engine_url``: set when ``policy_url`` is an sglang-router (k8s scale-out overlay); one
    engine reached directly for tokenization, and generation goes out one prompt per request so
    the router's cache-aware policy can route each by its prefix (``ets.policy.client``)."""

    def __init__(self, policy_url: str, reward_addr: str, *, metrics: SearchMetrics,
                 policy_engine_url: str | None = None) -> None:
        self.policy_address = policy_url.rstrip("/")
        self.policy_engine_url = policy_engine_url or None
        self.reward_address = reward_addr
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._reward_channel: grpc.aio.Channel | None = None
        self._policy_client: Any = None
        self._reward_client: Any = None

    # -- shared connections (created lazily inside the server's event loop) ---------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Many searches x width concurrent step requests share this pool.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            )
        return self._session

    def _channel(self) -> grpc.aio.Channel:
        if self._reward_channel is None:
            self._reward_channel = grpc.aio.insecure_channel(
                self.reward_address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        return self._reward_channel

    def policy_client(self) -> Any:
        """The shared ``ets.policy.client.PolicyClient`` (one connection pool for all searches)."""
        if self._policy_client is None:
            from ets.policy.client import PolicyClient

            self._policy_client = PolicyClient(self.policy_address, session=self._http(),
                                               engine_url=self.policy_engine_url)
        return self._policy_client

    # -- root -------------------------------------------------------------------------------------
    async def root(self, question: str, config: SearchConfig) -> Any:
        """Format the root for the policy model type and tokenize it on the policy server (its
        own tokenizer and chat template, so the ids are what the engine caches)."""
        from ets.policy.generator import tokenize_root

        start = time.perf_counter()
        try:
            return await tokenize_root(self.policy_client(), question, config.model_type)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            self._metrics.policy_call_errors.labels(reason=_reason(err)).inc()
            raise policy_failure(self.policy_address, err) from err
        finally:
            self._metrics.policy_call_duration.labels(call="tokenize").observe(time.perf_counter() - start)

    # -- generator and scorer -----------------------------------------------------------------------
    def generator(self, config: SearchConfig) -> StepGenerator:
        from ets.policy.generator import SGLangStepGenerator

        return SGLangStepGenerator(self.policy_client(), config.model_type)

    def scorer(self, config: SearchConfig, expect_prm_type: str = "") -> StepScorer:
        if self._reward_client is None:
            from ets.reward.client import RewardClient

            self._reward_client = RewardClient(self.reward_address, channel=self._channel())
        return RewardScorer(self._reward_client, expect_prm_type)

    # -- readiness ---------------------------------------------------------------------------------
    async def _probe_policy(self) -> str | None:
        # SGLang's /health runs a one-token generation: it fails while the engine cannot serve.
        try:
            healthy = await self.policy_client().health(timeout=PROBE_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            return _describe(err)
        return None if healthy else f"GET {self.policy_address}/health failed"

    async def _probe_reward(self) -> str | None:
        stub = health_pb2_grpc.HealthStub(self._channel())
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {err.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None

    async def probe(self) -> dict[str, str | None]:
        policy, reward = await asyncio.gather(self._probe_policy(), self._probe_reward())
        return {"policy": policy, "reward": reward}

    async def close(self) -> None:
        if self._policy_client is not None:
            await self._policy_client.close()
        if self._reward_channel is not None:
            await self._reward_channel.close()
        if self._session is not None:
            await self._session.close()


# ---- the runner -----------------------------------------------------------------------------------

class SearchRunner:
    """Runs searches over shared ``Upstreams``; pure selection logic stays in ``ets.search``."""

    def __init__(self, upstreams: Upstreams, metrics: SearchMetrics | None = None) -> None:
        self.upstreams = upstreams
        self._metrics = metrics or getattr(upstreams, "_metrics", None) or SearchMetrics(process_metrics=False)

    async def probe(self) -> dict[str, str | None]:
        return await self.upstreams.probe()

    async def close(self) -> None:
        await self.upstreams.close()

    async def run(self, problem: str, config: SearchConfig, on_depth: Callable[[Any], None] | None = None,
                  *, expect_prm_type: str = "") -> ServedSearch:
        """One search. ``expect_prm_type`` (the request's explicit ``prm_type``, if any) is checked
        by the reward server against the PRM it serves; unset, whatever it serves is used."""
        from ets.search.loop import run_search

        start = time.perf_counter()
        root = await self.upstreams.root(problem, config)
        generator = TimedGenerator(self.upstreams.generator(config), self.upstreams.policy_address, self._metrics)
        scorer = TimedScorer(self.upstreams.scorer(config, expect_prm_type), self.upstreams.reward_address,
                             self._metrics)
        result = await run_search(root, config, generator, scorer, on_depth=on_depth)
        # Equivalence checks may run sympy: keep them off the event loop other searches share.
        served = await asyncio.to_thread(choose_answer, config, result)
        served.wall_seconds = time.perf_counter() - start
        served.policy_seconds, served.reward_seconds = generator.seconds, scorer.seconds
        return served


def choose_answer(config: SearchConfig, result: Any) -> ServedSearch:
    """Extract each trajectory's answer, aggregate its step scores, vote (ets.search.answers)."""
    from ets.search.answers import select_answer

    choice = select_answer(result.trajectories, voting=config.voting, aggregation=config.aggregation)
    candidates = [
        ServedCandidate(
            text=t.text, answer=choice.answers[i], step_scores=[float(x) for x in t.step_scores],
            aggregate_score=float(choice.aggregate_scores[i]), finish_reason=str(t.finish_reason),
            depth=int(t.depth), tokens=int(t.tokens),
        )
        for i, t in enumerate(result.trajectories)
    ]
    return ServedSearch(config=result.config or config, result=result, answer=choice.answer,
                        candidates=candidates, best_index=choice.best_index, wall_seconds=0.0)
