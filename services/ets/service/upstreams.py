"""The live upstreams of the search service (``ets.service.runner.Upstreams`` over real servers).

Owns the SGLang policy server (HTTP, ``ets.policy.client``) and the reward server (gRPC client,
``ets.reward.client``) as one shared set of connections for all searches: building the root
(format per policy model type, tokenized on the policy server so the ids are exactly the
engine's), the step generator and scorer the search loop awaits, readiness probes, and
``UpstreamCall``: the one ``with`` block that times every upstream call (Prometheus
latency/error metrics) and turns its failure into ``UpstreamUnavailable`` / ``UpstreamRejected``
/ ``UpstreamFailed`` naming the upstream. Failures are matched by the clients' exception classes.
An expansion is then five of our frames deep: ``InstrumentedGenerator.expand`` (metrics, error
mapping) -> ``SGLangStepGenerator.expand`` (nodes -> engine requests) -> ``PolicyClient.generate``
(checks, parse) -> ``_generate`` (the batch's wire format; the router's differs) -> ``_request``
(HTTP with retries).

Many searches share one policy HTTP session and one reward gRPC channel; all expansions of a
depth go out as one batched call (the loop batches through the interfaces).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

import aiohttp
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ets import security
from ets.search.config import ConfigError, SearchConfig
from ets.policy.client import PolicyClient, PolicyRequestError, PolicyServerError, PolicyUnavailable
from ets.policy.generator import SGLangStepGenerator, tokenize_root
from ets.policy.routed import make_policy_client
from ets.reward.client import CHANNEL_OPTIONS, RewardClient, RewardError, RewardUnavailable
from ets.security import ClientSecurity
from ets.search.interfaces import (
    ExpandRequest,
    Root,
    SampledStep,
    ScoredTrajectory,
    StepGenerator,
    StepParams,
    StepReading,
    StepScorer,
)
from ets.service.metrics import SearchMetrics
from ets.service.status import Status, UpstreamFailed, UpstreamRejected, UpstreamUnavailable

PROBE_TIMEOUT_S = 10.0


# ---- failure classification ----------------------------------------------------------------

# The metric ``reason`` of a failed call, by the clients' exception classes (bounded label set).
_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (PolicyRequestError, "rejected"),
    (PolicyServerError, "server_error"),
    (PolicyUnavailable, "unavailable"),
    (asyncio.TimeoutError, "timeout"),
    (aiohttp.ClientConnectionError, "unavailable"),
    (OSError, "unavailable"),
    (ValueError, "bad_response"),
)


def reason(err: BaseException) -> str:
    """A short, bounded label for the error metrics."""
    if isinstance(err, RewardError):
        return err.code.name.lower()
    if isinstance(err, grpc.aio.AioRpcError):
        return err.code().name.lower()
    if isinstance(err, aiohttp.ClientResponseError):
        return f"http_{err.status}"
    for cls, label in _REASONS:
        if isinstance(err, cls):
            return label
    return "error"


def describe(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text


def policy_failure(address: str, err: BaseException) -> Exception:
    """The policy refusing the request itself (HTTP 4xx, e.g. a prompt beyond its context length)
    is the request's fault; a 5xx it answered after the client's retries or an answer we cannot
    read (ValueError) is INTERNAL (retrying the search fails the same way); only unreachable or
    timed out means the policy is not serving (UNAVAILABLE, worth retrying)."""
    if isinstance(err, PolicyRequestError) and err.status in (401, 403):
        # A missing or wrong API key is this service's configuration, not the request's fault.
        return UpstreamFailed("policy", f"{err} (check ETS_POLICY_API_KEY_FILE)", Status.INTERNAL)
    if isinstance(err, PolicyRequestError):
        return UpstreamRejected("policy", str(err))
    if isinstance(err, (PolicyServerError, ValueError)) and not isinstance(err, OSError):
        return UpstreamFailed("policy", describe(err), Status.INTERNAL)
    return UpstreamUnavailable("policy", address, describe(err))


# The reward server refusing the request (e.g. a prm_type it does not serve).
_REWARD_REJECTIONS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})


# Reward codes that keep their class (the search fails the same way if re-run; RESOURCE_EXHAUSTED
# is the reward server's bounded queue: the client may retry it later).
_REWARD_KEPT = {grpc.StatusCode.RESOURCE_EXHAUSTED: Status.RESOURCE_EXHAUSTED,
                grpc.StatusCode.DEADLINE_EXCEEDED: Status.DEADLINE_EXCEEDED}


def reward_failure(address: str, err: BaseException) -> Exception:
    """Rejections (INVALID_ARGUMENT, FAILED_PRECONDITION) are the request's; UNAVAILABLE after the
    client's retries, or no connection at all, means the reward server is down; every other
    reward status keeps its class (INTERNAL by default), as does a local ValueError (a reply that
    breaks the scorer's interface)."""
    if isinstance(err, RewardError) and not isinstance(err, RewardUnavailable):
        if err.code in _REWARD_REJECTIONS:
            return UpstreamRejected("reward", describe(err))
        if err.code != grpc.StatusCode.UNAVAILABLE:
            return UpstreamFailed("reward", describe(err), _REWARD_KEPT.get(err.code, Status.INTERNAL))
    if isinstance(err, ValueError):
        return UpstreamFailed("reward", describe(err), Status.INTERNAL)
    return UpstreamUnavailable("reward", address, describe(err))


# Errors that already say what they mean (or are the request's own): never re-classified.
_PASS_THROUGH = (ConfigError, UpstreamUnavailable, UpstreamRejected, UpstreamFailed)


class UpstreamCall:
    """One upstream call, timed and classified: ``with upstreams.policy_call("generate"): ...``.

    The latency goes to ``duration`` (a histogram child); a failure is counted by ``reason`` and
    raised as ``failure(err)``; cancellation and errors that already say what they mean pass
    through untouched. A context manager rather than a wrapper of the call: the awaited call
    runs in the caller's frame, no hop of its own on the hot path."""

    __slots__ = ("_count_error", "_duration", "_failure", "_start")

    def __init__(self, duration: Any, count_error: Callable[[str], None],
                 failure: Callable[[BaseException], Exception]) -> None:
        self._duration = duration
        self._count_error = count_error
        self._failure = failure
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: object) -> None:
        self._duration.observe(time.perf_counter() - self._start)
        if isinstance(err, Exception) and not isinstance(err, _PASS_THROUGH):  # every other failure is the upstream's
            self._count_error(reason(err))
            raise self._failure(err) from err


# ---- the live upstreams ----------------------------------------------------------------------

class InstrumentedGenerator:
    """``StepGenerator`` over the policy's generator: every batched expand timed and classified."""

    def __init__(self, inner: StepGenerator, upstreams: "LiveUpstreams") -> None:
        self._inner = inner
        self._up = upstreams

    async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
        with self._up.policy_call("generate"):
            return await self._inner.expand(requests, params)

    def read_step(self, text: str) -> StepReading:
        return self._inner.read_step(text)


class InstrumentedScorer:
    """``StepScorer`` over the shared ``RewardClient``; when the request named a PRM type, the reward
    server checks it against the PRM it serves (INVALID_ARGUMENT on a mismatch)."""

    def __init__(self, client: RewardClient, upstreams: "LiveUpstreams", prm_type: str = "") -> None:
        self._client = client
        self._up = upstreams
        self._prm_type = prm_type

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
        # Empty steps (the policy stopped at its delimiter) go as they are: the reward server
        # scores them at their boundary.
        with self._up.reward_call("score"):
            return await self._client.score_last_steps(trajectories, prm_type=self._prm_type)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._up.reward_call("embed"):
            return await self._client.embed(texts)


class LiveUpstreams:
    """The SGLang policy server (HTTP) and the reward server (gRPC), shared by all searches.

    ``policy_engine_url``: set when ``policy_url`` is an sglang-router (k8s scale-out overlay); one
    engine reached directly for tokenization, and generation goes out one prompt per request so
    the router's cache-aware policy can route each by its prefix (``ets.policy.client``)."""

    def __init__(self, policy_url: str, reward_addr: str, *, metrics: SearchMetrics,
                 policy_engine_url: str | None = None, reward_security: ClientSecurity | None = None,
                 policy_api_key: str | None = None) -> None:
        self.policy_address = policy_url.rstrip("/")
        self.policy_engine_url = policy_engine_url or None
        self.reward_address = reward_addr
        self._metrics = metrics
        self._reward_security = reward_security or ClientSecurity()
        self._policy_api_key = policy_api_key
        self._session: aiohttp.ClientSession | None = None
        self._reward_channel: grpc.aio.Channel | None = None
        self._policy_client: PolicyClient | None = None
        self._reward_client: RewardClient | None = None
        self._model_names: tuple[str, ...] | None = None

    # -- instrumentation ----------------------------------------------------------------------------
    def policy_call(self, call: str) -> UpstreamCall:
        m = self._metrics
        return UpstreamCall(m.policy_call_duration.labels(call=call),
                            lambda r: m.policy_call_errors.labels(reason=r).inc(),
                            lambda err: policy_failure(self.policy_address, err))

    def reward_call(self, call: str) -> UpstreamCall:
        m = self._metrics
        return UpstreamCall(m.reward_call_duration.labels(call=call),
                            lambda r: m.reward_call_errors.labels(call=call, reason=r).inc(),
                            lambda err: reward_failure(self.reward_address, err))

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
            # Every replica the address resolves to, round_robin with health checking (CHANNEL_OPTIONS).
            self._reward_channel = security.channel(self.reward_address, self._reward_security,
                                                    options=CHANNEL_OPTIONS)
        return self._reward_channel

    def policy_client(self) -> PolicyClient:
        """The shared policy client (one connection pool for all searches)."""
        if self._policy_client is None:
            retries = self._metrics.upstream_retries
            self._policy_client = make_policy_client(self.policy_address, session=self._http(),
                                                     engine_url=self.policy_engine_url,
                                                     api_key=self._policy_api_key,
                                                     on_retry=lambda r: retries.labels("policy", r).inc())
        return self._policy_client

    def reward_client(self) -> RewardClient:
        if self._reward_client is None:
            retries = self._metrics.upstream_retries
            self._reward_client = RewardClient(self.reward_address, channel=self._channel(),
                                               on_retry=lambda r: retries.labels("reward", r).inc())
        return self._reward_client

    # -- what a search uses ---------------------------------------------------------------------------
    async def root(self, question: str, config: SearchConfig, system_prompt: str | None = None) -> Root:
        """Format the root for the policy model type and tokenize it on the policy server (its
        own tokenizer and chat template, so the ids are what the engine caches)."""
        with self.policy_call("tokenize"):
            return await tokenize_root(self.policy_client(), question, config.policy_model_type, system_prompt)

    async def model_names(self) -> tuple[str, ...]:
        """Every name a request may give the policy: the served name first, then its model path."""
        if self._model_names is None:
            with self.policy_call("model_info"):
                info = await self.policy_client().model_info()
            names = (str(info.get("served_model_name") or ""), str(info.get("model_path") or ""))
            self._model_names = tuple(dict.fromkeys(n for n in names if n)) or ("policy",)
        return self._model_names

    def generator(self, config: SearchConfig) -> StepGenerator:
        return InstrumentedGenerator(SGLangStepGenerator(self.policy_client(), config.policy_model_type), self)

    def scorer(self, config: SearchConfig, expect_prm_type: str = "") -> StepScorer:
        return InstrumentedScorer(self.reward_client(), self, expect_prm_type)

    # -- readiness ---------------------------------------------------------------------------------
    async def _probe_policy(self) -> str | None:
        # SGLang's /health runs a one-token generation: it fails while the engine cannot serve.
        try:
            healthy = await self.policy_client().health(timeout=PROBE_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - a probe reports, it never raises
            return describe(err)
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
        """Per upstream: None when it answers, else why not."""
        policy, reward = await asyncio.gather(self._probe_policy(), self._probe_reward())
        return {"policy": policy, "reward": reward}

    async def close(self) -> None:
        if self._policy_client is not None:
            await self._policy_client.close()
        if self._reward_channel is not None:
            await self._reward_channel.close()
        if self._session is not None:
            await self._session.close()
