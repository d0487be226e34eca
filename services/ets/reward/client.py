"""``RewardClient``: the async gRPC client of the reward server, and the search's ``StepScorer``.

Owns deadlines, retries (``ets.retry``: within a search until its deadline would pass, else a
bounded count) on UNAVAILABLE (the PRM restarting, a replica lost or draining), splitting large
batches into the server's ``max_batch_size``, and the typed ``RewardUnavailable`` raised when
retries run out. Other gRPC errors surface as ``RewardError`` with the server's message
(INVALID_ARGUMENT names the field). No torch here: the search image imports this module.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from ets.api.v1 import reward_pb2, reward_pb2_grpc
from ets.retry import Retries, RetryPolicy
from ets.search.interfaces import ScoredTrajectory
from ets.security import ClientSecurity
from ets.security import channel as secure_channel


class RewardError(RuntimeError):
    """The reward server rejected or failed a call; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class RewardUnavailable(RewardError):
    """The reward server (or its PRM) stayed unavailable through every retry."""


# Codes worth retrying: the server or its PRM is (re)starting. A deadline hit on a busy server, a
# full queue (RESOURCE_EXHAUSTED) or INTERNAL would fail the same way again at once: not retried
# here, passed on with their class (the search service keeps it).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# Five tries, waiting up to 0.25, 0.5, 1 and 2 s between them (jittered down to half).
DEFAULT_RETRY = RetryPolicy(max_retries=4, initial_backoff_s=0.25, max_backoff_s=4.0)

# Several reward replicas through gRPC's own client-side load balancing, not a balancer of ours:
# the target resolves to every replica (``dns:///reward-headless:50052``: a headless Service's pod
# addresses; ``ipv4:10.0.0.5:50052,10.0.0.6:50052``: a fixed list), ``round_robin`` spreads calls
# over the connected ones, and client-side health checking (the standard health service, which a
# reward server sets NOT_SERVING while its PRM is down and at the start of a graceful shutdown)
# takes a replica out before its connections drop. A single ``host:port`` is one replica, as before.
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
})
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Re-resolve DNS soon after a replica goes away (gRPC's default waits 30 s between resolutions),
    # so replacement pods are found while searches still retry.
    ("grpc.dns_min_time_between_resolutions_ms", 2000),
)


class RewardClient:
    """Async client; use as ``async with RewardClient(addr) as c`` or call ``close()``."""

    def __init__(self, address: str, *, timeout_s: float = 60.0, retry: RetryPolicy = DEFAULT_RETRY,
                 max_batch_size: int | None = None, channel: grpc.aio.Channel | None = None,
                 security: ClientSecurity | None = None, on_retry: Callable[[str], None] | None = None) -> None:
        self.address = address
        # Called with the status code's name ("unavailable") before each retry.
        self.on_retry = on_retry
        self.timeout_s = timeout_s
        self.retry = retry
        self._max_batch_size = max_batch_size
        self._dim: int | None = None
        # ``security``: TLS / client certificate / bearer token (``ets.security``; default plaintext).
        self._channel = channel or secure_channel(address, security, options=CHANNEL_OPTIONS)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    async def __aenter__(self) -> "RewardClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: Any) -> Any:
        """One RPC (every reward RPC is idempotent: Score, Embed, Info) with retries of the
        retryable codes (``ets.retry``: within a search until its deadline would pass, else the
        client's ``RetryPolicy``). Over a round_robin channel each retry goes to the next ready
        replica."""
        rpc = getattr(self._stub, method)
        state = Retries(self.retry)
        while True:
            try:
                timeout = self.timeout_s
                if state.window is not None:  # never past the search's own deadline
                    timeout = max(0.1, min(timeout, state.window.deadline - time.monotonic()))
                return await rpc(request, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRYABLE:
                    raise RewardError(err.code(), err.details() or "") from None
                last = err
            wait = state.next_wait()
            if wait is None:
                raise RewardUnavailable(last.code(), f"{self.address} {method} {state.gave_up()}: "
                                        f"{last.details()}") from None
            if self.on_retry is not None:
                self.on_retry(last.code().name.lower())
            await asyncio.sleep(wait)

    async def info(self) -> reward_pb2.InfoResponse:
        return await self._call("Info", reward_pb2.InfoRequest())

    async def _batch_size(self) -> int:
        if self._max_batch_size is None:
            info = await self.info()
            self._max_batch_size = max(1, int(info.max_batch_size) or 1)
            self._dim = int(info.embedding_dim)
        return self._max_batch_size

    async def score(self, trajectories: Sequence[ScoredTrajectory | tuple[str, Sequence[str]]], *,
                    last_step_only: bool = False, prm_type: str = "") -> list[list[float]]:
        """Per-step PRM scores of each trajectory (only the newest step's when ``last_step_only``).
        ``prm_type``, when given, is checked by the server against the PRM it serves."""
        if not trajectories:
            return []
        trajs = [t if isinstance(t, ScoredTrajectory) else ScoredTrajectory(t[0], t[1]) for t in trajectories]
        size = await self._batch_size()
        chunks = [trajs[i: i + size] for i in range(0, len(trajs), size)]
        replies = await asyncio.gather(*(
            self._call("Score", reward_pb2.ScoreRequest(
                trajectories=[reward_pb2.Trajectory(question=t.question, steps=list(t.steps)) for t in chunk],
                last_step_only=last_step_only, prm_type=prm_type,
            )) for chunk in chunks
        ))
        return [list(r.scores) for reply in replies for r in reply.results]

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory], *, prm_type: str = "") -> list[float]:
        """``StepScorer``: the newest step's score of each trajectory (``prm_type``: see ``score``)."""
        scores = await self.score(trajectories, last_step_only=True, prm_type=prm_type)
        return [s[-1] for s in scores]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``StepScorer``: (len(texts), dim) float32 L2-normalised embeddings."""
        size = await self._batch_size()
        if not texts:
            if self._dim is None:
                self._dim = int((await self.info()).embedding_dim)
            return np.zeros((0, self._dim), dtype=np.float32)
        chunks = [list(texts[i: i + size]) for i in range(0, len(texts), size)]
        replies = await asyncio.gather(*(self._call("Embed", reward_pb2.EmbedRequest(texts=c)) for c in chunks))
        rows = [np.asarray(e.values, dtype=np.float32) for reply in replies for e in reply.embeddings]
        return np.stack(rows)
