"""Failure handling on the real stack: deadlines and cancellation stop the search's work, a policy
server killed mid-search gives a clean UNAVAILABLE with nothing leaked (and the next search
succeeds once it is back), a dead reward server is named, 16 concurrent searches all finish,
and a full queue answers RESOURCE_EXHAUSTED."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.config import search_defaults_from_env
from ets.engine.launcher import LaunchConfig
from ets.engine.process import start_server
from ets.service.server import SearchServer, ServiceSettings
from ets.testing.stack import Stack
from service_fixtures import SMALL_SEARCH_ENV, ServeProcess
from tools import free_port, http_get, metric, small

# The first test of a session also pays for starting the stack (minutes on a loaded CPU).
pytestmark = [pytest.mark.sglang, pytest.mark.stack, pytest.mark.timeout(1200)]

PROBLEM = "A box holds 12 pencils. How many pencils are in 4 boxes?"


def long_config(width: int = 8) -> search_pb2.SearchConfig:
    """A search with many depths, so that it is still running when the test interferes."""
    return search_pb2.SearchConfig(method="ets", width=width, max_step_tokens=16, max_tokens=600, max_depth=30)


def search_metrics(stack: Stack) -> str:
    return http_get(stack.search_metrics_url)


def _runs_search_code(task: asyncio.Task[object]) -> bool:
    """Whether ``task`` runs search work: a coroutine of the ``ets`` package or of aiohttp (policy
    calls), other than the service's long-lived readiness monitor."""
    code = getattr(task.get_coro(), "cr_code", None)
    if code is None:
        return False
    path = code.co_filename.replace(os.sep, "/")
    return ("/ets/" in path or "/aiohttp/" in path) and code.co_name != "_watch_upstreams"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_deadline_exceeded_stops_issuing_work(search_stack: Stack) -> None:
    before = search_metrics(search_stack)
    with grpc.insecure_channel(search_stack.search_addr) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(search_pb2.SearchRequest(problem=PROBLEM, config=long_config()), timeout=1.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: metric(search_metrics(search_stack), "ets_search_searches_in_flight") == 0, 10,
               "the expired search to leave")
    # No more policy calls once the search is gone (nothing else runs on this service now).
    def calls() -> float:
        return metric(search_metrics(search_stack), "ets_search_policy_call_duration_seconds_count", call="generate")
    settled = calls()
    time.sleep(2.0)
    assert calls() == settled
    after = search_metrics(search_stack)
    expired = metric(after, "ets_search_searches_total", method="ets", outcome="deadline_exceeded", api="grpc")
    assert expired == metric(before, "ets_search_searches_total", method="ets", outcome="deadline_exceeded",
                             api="grpc") + 1


def test_cancelled_stream_stops_the_search(search_stack: Stack) -> None:
    with grpc.insecure_channel(search_stack.search_addr) as channel:
        stream = search_pb2_grpc.SearchServiceStub(channel).SearchStream(
            search_pb2.SearchRequest(problem=PROBLEM, config=long_config()), timeout=120)
        first = next(stream)
        assert first.HasField("progress") and first.progress.depth == 0
        stream.cancel()
    wait_until(lambda: metric(search_metrics(search_stack), "ets_search_searches_in_flight") == 0, 10,
               "the cancelled search to leave")
    assert metric(search_metrics(search_stack), "ets_search_searches_total", method="ets", outcome="cancelled",
                  api="grpc") >= 1
    # The service is fine afterwards.
    with grpc.insecure_channel(search_stack.search_addr) as channel:
        ok = search_pb2_grpc.SearchServiceStub(channel).Search(
            search_pb2.SearchRequest(problem=PROBLEM, config=small()), timeout=120)
    assert ok.candidates


async def test_sixteen_concurrent_searches(search_stack: Stack) -> None:
    methods = ["ets", "rebase", "beam", "dvts", "best_of_n"]
    peak = {"searches_in_flight": 0.0, "searches_queued": 0.0}
    done = asyncio.Event()

    async def watch_gauges() -> None:
        while not done.is_set():
            text = await asyncio.to_thread(search_metrics, search_stack)
            for gauge in peak:
                peak[gauge] = max(peak[gauge], metric(text, f"ets_search_{gauge}"))
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch_gauges())
    try:
        async with grpc.aio.insecure_channel(search_stack.search_addr) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            replies = await asyncio.gather(*(
                stub.Search(search_pb2.SearchRequest(problem=f"{PROBLEM} (variant {i})",
                                                     config=small(methods[i % 5], 4, seed=i), request_id=f"c{i}"),
                            timeout=300)
                for i in range(16)))
    finally:
        done.set()
        await watcher
    assert sorted(r.request_id for r in replies) == sorted(f"c{i}" for i in range(16))
    for i, r in enumerate(replies):
        assert r.config.method == methods[i % 5] and r.candidates and r.stats.total_kv_tokens > 0
    # Concurrency, not a queue of one: the stack's limit (ETS_MAX_CONCURRENT_SEARCHES) ran at once
    # while the other searches waited.
    limit = search_stack.config.max_concurrent
    assert peak["searches_in_flight"] == limit and peak["searches_queued"] >= 1, peak


def test_full_queue_is_resource_exhausted(search_stack: Stack, serve_factory: Callable[..., ServeProcess]) -> None:
    serve = serve_factory(policy_url=search_stack.policy_url, reward_addr=search_stack.reward_addr,
                          args=("--max-concurrent", "1", "--max-queued", "1"))
    with grpc.insecure_channel(serve.addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                   == health_pb2.HealthCheckResponse.SERVING, 60, "SERVING")

    async def burst() -> list[object]:
        async with grpc.aio.insecure_channel(serve.addr) as ch:
            stub = search_pb2_grpc.SearchServiceStub(ch)
            return await asyncio.gather(*(
                stub.Search(search_pb2.SearchRequest(problem=PROBLEM, config=small("rebase", 8), request_id=str(i)),
                            timeout=300)
                for i in range(5)), return_exceptions=True)

    results = asyncio.run(burst())
    ok = [r for r in results if isinstance(r, search_pb2.SearchResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) + len(refused) == 5
    assert 2 <= len(ok) < 5, results  # one running + one queued at least
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ETS_MAX_QUEUED_SEARCHES" in (err.details() or "")
    assert metric(serve.metrics(), "ets_search_searches_total", method="rebase",
                  outcome="resource_exhausted", api="grpc") == len(refused)


def test_dead_reward_server_is_unavailable_naming_it(search_stack: Stack,
                                                     serve_factory: Callable[..., ServeProcess]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    serve = serve_factory(policy_url=search_stack.policy_url, reward_addr=dead)
    with grpc.insecure_channel(serve.addr) as channel:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            # The reward calls retry until this deadline would pass (ets.retry), then UNAVAILABLE.
            search_pb2_grpc.SearchServiceStub(channel).Search(
                search_pb2.SearchRequest(problem=PROBLEM, config=small()), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 10
    details = info.value.details() or ""
    assert details.startswith("reward server unavailable:"), details
    assert dead not in details  # internal addresses stay in the logs
    assert metric(serve.metrics(), "ets_search_upstream_up", upstream="reward") == 0
    assert metric(serve.metrics(), "ets_search_upstream_up", upstream="policy") == 1


@pytest.mark.timeout(1800)  # two extra SGLang starts on top of the stack
async def test_policy_killed_mid_search(search_stack: Stack, tiny_model_factory: Callable[[str], Path],
                                        tmp_path: Path) -> None:
    """In-process service (to inspect its tasks) over a policy server of its own that is killed."""
    launch = LaunchConfig(model_path=str(tiny_model_factory("policy")), host="127.0.0.1", port=free_port(),
                          device="cpu", random_seed=0)
    policy = await asyncio.to_thread(start_server, launch, log_path=tmp_path / "victim-1.log", name="victim",
                                     timeout=240)
    defaults = search_defaults_from_env(environ=SMALL_SEARCH_ENV)
    server = SearchServer(ServiceSettings(host="127.0.0.1", port=0, metrics_port=None, openai_port=None,
                                          policy_url=policy.url,
                                          reward_addr=search_stack.reward_addr, grace_s=5), defaults)
    try:
        await server.start()
        assert await server.wait_ready(60), server.readiness.errors
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            await stub.Search(search_pb2.SearchRequest(problem=PROBLEM, config=small()), timeout=120)
            baseline = set(asyncio.all_tasks())

            # A short deadline: the policy calls retry until it would pass (ets.retry), then UNAVAILABLE.
            call = stub.SearchStream(search_pb2.SearchRequest(problem=PROBLEM, config=long_config()), timeout=20)
            first = await call.read()
            assert first.progress.depth == 0
            os.killpg(policy.pgid, signal.SIGKILL)  # no goodbye: connections just drop
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            details = info.value.details() or ""
            assert details.startswith("policy server unavailable:"), details
            await asyncio.to_thread(policy.stop)

            # Nothing leaked: no search task, no slot, and no task left running the project's or
            # aiohttp's code (gRPC's own listener and the readiness monitor's waits come and go).
            deadline = time.monotonic() + 10
            while True:
                stray = {t for t in asyncio.all_tasks() - baseline
                         if not t.done() and t is not asyncio.current_task() and _runs_search_code(t)}
                if not stray and not server.runner.active and server.admission.running == 0:
                    break
                assert time.monotonic() < deadline, f"leaked: {stray} active={server.runner.active}"
                await asyncio.sleep(0.1)
            # The failure triggered a re-probe: the service now reports NOT_SERVING.
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status \
                    != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)

            # The policy comes back on the same address: the next search succeeds.
            policy = await asyncio.to_thread(start_server, launch, log_path=tmp_path / "victim-2.log",
                                             name="victim", timeout=240)
            assert await server.wait_ready(60), server.readiness.errors
            again = await stub.Search(search_pb2.SearchRequest(problem=PROBLEM, config=small()), timeout=120)
            assert again.candidates and again.stats.generated_tokens > 0
    finally:
        await server.stop(grace=0)
        await asyncio.to_thread(policy.stop)
