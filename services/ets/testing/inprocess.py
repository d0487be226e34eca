"""The search service in-process over scripted upstreams: one real ``SearchServer`` (gRPC on a
free loopback port, the OpenAI port only when asked) for the fast test tier.

``serving(upstreams, **settings)`` starts it with small defaults and its own metrics registry,
yields the running server, and on exit releases any held expansion and stops it without grace.
``harness(**settings)`` adds what the service tests read around it: the scripted problem
(``PROBLEM``, ``SCRIPT``: three depths to "The answer is 3"), a gRPC channel with the search and
health stubs, metric samples, outcome counts, and waits for idle or for held expansions. So every
in-process test module builds and reads its server the same way.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator, Mapping, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from ets.api.v1 import search_pb2_grpc
from ets.search.config import SearchConfig
from ets.search.answers import Grouping, group_answers
from ets.service.metrics import SearchMetrics
from ets.service.server import SearchServer
from ets.service.settings import ServiceSettings
from ets.service.status import Status
from ets.testing.upstreams import ScriptedPolicy, ScriptedUpstreams, Spec, TableScorer

# Small searches over the scripted three-depth trees the tests write.
DEFAULTS = SearchConfig(method="rebase", width=2, max_step_tokens=5, max_tokens=200, max_depth=5, seed=1)
SETTINGS = ServiceSettings(host="127.0.0.1", port=0, metrics_port=None, openai_port=None, grace_s=1)

PROBLEM = "What is 1 + 2?"
# Three depths: s1 -> s2 -> the answer.
SCRIPT: dict[tuple[str, ...], Sequence[Spec]] = {
    (): [("s1 ки", 5, "step")],
    ("s1 ки",): [("s2 ки", 5, "step")],
    ("s1 ки", "s2 ки"): [("The answer is 3 ки", 5, "step")],
}
SCORES: dict[str, float] = {"The answer is 3": 0.9}


@asynccontextmanager
async def serving(upstreams: ScriptedUpstreams, *, defaults: SearchConfig = DEFAULTS,
                  grouping: Grouping = group_answers, **settings: Any) -> AsyncIterator[SearchServer]:
    """A started ``SearchServer`` over ``upstreams``; ``settings`` override ``SETTINGS`` fields."""
    server = SearchServer(replace(SETTINGS, **settings), defaults, upstreams=upstreams,
                          metrics=SearchMetrics(process_metrics=False), grouping=grouping)
    await server.start()
    try:
        yield server
    finally:
        upstreams.release()
        await server.stop(grace=0)


class Harness:
    """A served in-process search service as the tests read it."""

    # Outcomes counted for this transport by default (``outcomes``).
    api = "grpc"

    def __init__(self, server: SearchServer, upstreams: ScriptedUpstreams, channel: grpc.aio.Channel) -> None:
        self.server, self.upstreams, self.channel = server, upstreams, channel
        self.grpc_addr = f"127.0.0.1:{server.port}"
        self.stub = search_pb2_grpc.SearchServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    async def aclose(self) -> None:
        """Release what a subclass opened (clients of another transport)."""

    def sample(self, name: str, **labels: str) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0

    def series(self, name: str) -> int:
        """How many series of ``name`` the registry holds (label cardinality)."""
        return sum(1 for m in self.server.metrics.registry.collect() for s in m.samples if s.name == name)

    def outcomes(self, api: str | None = None, method: str = "rebase") -> dict[str, float]:
        """Searches counted per outcome for ``api`` (default: this harness's transport)."""
        return {s.outcome: self.sample("ets_search_searches_total", method=method, outcome=s.outcome,
                                       api=api or self.api) for s in Status}

    async def idle(self, timeout: float = 5.0) -> None:
        """Wait until no search is running or queued (handler tasks unwind after a status)."""
        deadline = time.monotonic() + timeout
        while self.server.runner.active or self.server.admission.running or self.server.admission.queued:
            assert time.monotonic() < deadline, (self.server.runner.active, self.server.admission.running)
            await asyncio.sleep(0.01)

    async def held(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``n`` expansions sit at the upstreams' gate."""
        deadline = time.monotonic() + timeout
        while self.upstreams.waiting < n:
            assert time.monotonic() < deadline, self.upstreams.waiting
            await asyncio.sleep(0.01)


H = TypeVar("H", bound=Harness)


def harness(script: Mapping[Any, Sequence[Spec]] = SCRIPT, scores: Mapping[str, float] = SCORES, *,
            grouping: Grouping = group_answers, **settings: Any) -> AbstractAsyncContextManager[Harness]:
    """``serving`` over ``script`` and ``scores``, with a channel to it."""
    return harness_of(Harness, script, scores, grouping=grouping, **settings)


@asynccontextmanager
async def harness_of(kind: type[H], script: Mapping[Any, Sequence[Spec]] = SCRIPT,
                     scores: Mapping[str, float] = SCORES, *, grouping: Grouping = group_answers,
                     **settings: Any) -> AsyncIterator[H]:
    """``harness`` as a ``kind`` (a ``Harness`` subclass that adds another transport's clients)."""
    upstreams = ScriptedUpstreams(ScriptedPolicy(script), TableScorer(dict(scores)))
    async with serving(upstreams, grouping=grouping, **settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            h = kind(server, upstreams, channel)
            try:
                yield h
            finally:
                await h.aclose()
