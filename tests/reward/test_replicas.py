"""Reward replicas: the search service reaches several reward servers through gRPC's own
client-side load balancing (``ets.reward.client.CHANNEL_OPTIONS``: round_robin with health
checking over every address the target resolves to), and a replica lost mid-search costs no
search.

Real processes: two ``ets reward-serve`` replicas (rules backend, arithmetic PRM, MiniLM
embedder), one search service in this process whose reward address is the gRPC target over both
(``ipv4:127.0.0.1:P1,127.0.0.1:P2``; in Kubernetes ``dns:///`` over a headless Service, the same
balancing). The policy is the scripted one (no SGLang in this tier), held at a depth so that the
replica goes away while the search is in the middle of its calls; one replica is then SIGKILLed
(no goodbye) or SIGTERMed (graceful: NOT_SERVING first, in-flight calls finish)."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.engine.process import ServerProcess, free_port
from ets.search.config import SearchConfig
from ets.search.interfaces import Root, StepGenerator
from ets.service.metrics import SearchMetrics
from ets.service.server import SearchServer
from ets.service.upstreams import LiveUpstreams
from ets.testing.inprocess import SETTINGS
from ets.testing.upstreams import ScriptedPolicy, ScriptedUpstreams

from tools import http_get

# Four depths of two steps each: every depth scores its candidates on the reward replicas.
SCRIPT: dict[tuple[str, ...], Any] = {
    (): [("2 + 3 = 5 ки", 5, "step"), ("2 + 3 = 6 ки", 5, "step")],
    **{prefix: [("5 * 2 = 10 ки", 5, "step"), ("5 * 2 = 12 ки", 5, "step")]
       for prefix in (("2 + 3 = 5 ки",), ("2 + 3 = 6 ки",))},
    **{prefix + ("5 * 2 = 10 ки",): [("The answer is 10 ки", 5, "step")]
       for prefix in (("2 + 3 = 5 ки",), ("2 + 3 = 6 ки",))},
    **{prefix + ("5 * 2 = 12 ки",): [("The answer is 12 ки", 5, "step")]
       for prefix in (("2 + 3 = 5 ки",), ("2 + 3 = 6 ки",))},
}
PROBLEM = "What is (2 + 3) * 2?"


class ScriptedPolicyLiveReward(LiveUpstreams):
    """The live reward side (the balanced channel, the real client) beside the scripted policy."""

    def __init__(self, scripted: ScriptedUpstreams, reward_addr: str, metrics: SearchMetrics) -> None:
        super().__init__("http://127.0.0.1:1", reward_addr, metrics=metrics)
        self.scripted = scripted

    async def root(self, question: str, config: SearchConfig, system_prompt: str | None = None) -> Root:
        return await self.scripted.root(question, config, system_prompt)

    async def model_names(self) -> tuple[str, ...]:
        return await self.scripted.model_names()

    def generator(self, config: SearchConfig) -> StepGenerator:
        return self.scripted.generator(config)

    async def probe(self) -> dict[str, str | None]:
        return {"policy": None, "reward": await self._probe_reward()}


def _replica(tmp_path: Path, name: str) -> tuple[ServerProcess, str]:
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", ETS_DEVICE="cpu", ETS_REWARD_HOST="127.0.0.1",
               ETS_PRM_BACKEND="rules", ETS_PRM_TYPE="arithmetic", ETS_REWARD_PORT=str(port),
               ETS_REWARD_METRICS_PORT=str(metrics_port), ETS_REWARD_GRACE_S="10")
    proc = ServerProcess.start([sys.executable, "-m", "ets.cli", "reward-serve"], env=env,
                               url=f"http://127.0.0.1:{metrics_port}", log_path=tmp_path / f"{name}.log", name=name)
    return proc, f"127.0.0.1:{port}"


def _scores_served(proc: ServerProcess) -> float:
    """Score RPCs this replica answered OK (its own metrics)."""
    text = http_get(f"{proc.url}/metrics")
    found = re.search(r'ets_reward_requests_total\{code="OK",method="Score"\} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[list[tuple[ServerProcess, str]]]:
    started = [_replica(tmp_path, "reward-a"), _replica(tmp_path, "reward-b")]
    try:
        for proc, _ in started:
            await proc.wait_healthy_async(timeout=180)
        yield started
    finally:
        for proc, _ in started:
            await proc.stop_async()


def _request() -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(problem=PROBLEM, config=search_pb2.SearchConfig(
        method="rebase", width=4, max_depth=4, prm_type="arithmetic"))


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "graceful"])
async def test_a_reward_replica_lost_mid_search_fails_no_search(
        replicas: list[tuple[ServerProcess, str]], how: signal.Signals) -> None:
    (victim, victim_addr), (survivor, survivor_addr) = replicas
    target = f"ipv4:{victim_addr},{survivor_addr}"
    scripted = ScriptedUpstreams(ScriptedPolicy(SCRIPT))
    metrics = SearchMetrics(process_metrics=False)
    server = SearchServer(SETTINGS, SearchConfig(), upstreams=ScriptedPolicyLiveReward(scripted, target, metrics),
                          metrics=metrics)
    await server.start()
    try:
        assert await server.wait_ready(30), server.readiness.errors
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            # Warm: round_robin spreads the calls of searches over both replicas.
            for _ in range(3):
                assert (await stub.Search(_request(), timeout=60)).answer
            before = _scores_served(victim), _scores_served(survivor)
            assert all(n > 0 for n in before), f"round_robin reached only some replicas: {before}"

            scripted.hold()
            calls = [asyncio.ensure_future(stub.Search(_request(), timeout=60)) for _ in range(4)]
            deadline = time.monotonic() + 20
            while scripted.waiting < 4:
                assert time.monotonic() < deadline, scripted.waiting
                await asyncio.sleep(0.01)
            # The searches are mid-way (a depth scored, the next one's expansions held): lose a replica.
            os.kill(victim.pid, how)
            if how == signal.SIGKILL:
                await asyncio.to_thread(victim.stop)
            scripted.release()
            answers = await asyncio.gather(*calls)
            assert all(a.answer for a in answers)
            survivor_after = _scores_served(survivor)
            assert survivor_after > before[1]  # the rest of the searches went to the survivor
            # More searches, with one replica left: all OK, none refused (fail-fast is not triggered
            # by a replica lost while another serves: the health probe is balanced too).
            for _ in range(2):
                assert (await stub.Search(_request(), timeout=60)).answer
            assert server.readiness.ready
        failed = metrics.registry.get_sample_value(
            "ets_search_searches_total", {"method": "rebase", "outcome": "unavailable", "api": "grpc"}) or 0
        assert failed == 0
    finally:
        scripted.release()
        await server.stop(grace=0)
