"""The search service in-process: a real grpc.aio server on loopback over scripted upstreams
(``ets.testing.upstreams``), so success, stream, deadline, cancel, queue-full and every
error-to-status path run in seconds. What only real model servers can show stays in
test_stack_*.py."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ets.api.v1 import search_pb2
from ets.search.config import ConfigError
from ets.service.admission import QueueFull
from ets.service.request import RequestError
from ets.service.status import Status, UpstreamRejected, UpstreamUnavailable, status_for
from ets.testing.inprocess import PROBLEM, Harness


def request(**config: Any) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(problem=PROBLEM, config=search_pb2.SearchConfig(**config), request_id="r1")


async def test_search_succeeds_and_is_counted(svc: Harness) -> None:
    response = await svc.stub.Search(request(), timeout=10)
    assert response.request_id == "r1" and response.answer == "3"
    assert response.best.text.endswith("The answer is 3 ки") and response.best.depth == 3
    assert response.config.width == 2 and response.config.method == "rebase"
    assert response.stats.model_calls == 2 * 3 and response.stats.selections == 3
    assert svc.sample("ets_search_searches_total", method="rebase", outcome="ok", api="grpc") == 1
    assert svc.sample("ets_search_model_calls_total", method="rebase") == 6
    assert svc.upstreams.prm_types == [""]  # no prm_type in the request: the reward server's own
    await svc.idle()


async def test_stream_reports_each_depth_then_the_result(svc: Harness) -> None:
    events = [e async for e in svc.stub.SearchStream(request(prm_type="math-shepherd"), timeout=10)]
    assert [e.progress.depth for e in events[:-1]] == [0, 1, 2]
    assert events[-1].result.answer == "3"
    assert svc.upstreams.prm_types == ["math-shepherd"]


async def test_health_follows_the_upstreams(svc: Harness) -> None:
    health = health_pb2_grpc.HealthStub(svc.channel)
    assert await svc.server.wait_ready(5)
    assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
        health_pb2.HealthCheckResponse.SERVING
    svc.upstreams.probe_result = {"policy": None, "reward": "UNAVAILABLE: gone"}
    svc.upstreams.reward_error = UpstreamUnavailable("reward", "scripted-reward", "gone")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.stub.Search(request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "reward server unavailable: gone"  # the address stays in the logs
    # The failure re-probes at once (not after the 5 s interval): NOT_SERVING, gauge down.
    deadline = time.monotonic() + 3
    while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != \
            health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert svc.sample("ets_search_upstream_up", upstream="reward") == 0
    assert svc.sample("ets_search_searches_total", method="rebase", outcome="unavailable", api="grpc") == 1


@pytest.mark.parametrize(("config", "field"), [
    ({"width": 0}, "config.width:"),
    ({"method": "mcts"}, "config.method:"),
    ({"max_tokens": 8}, "config.max_tokens:"),  # refused by the search core: the prompt has 10 tokens
])
async def test_bad_input_is_invalid_argument_naming_the_field(svc: Harness, config: dict[str, object],
                                                              field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.stub.Search(request(**config), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(field), info.value.details()


@pytest.mark.parametrize(("side", "error", "code", "details"), [
    ("policy", UpstreamUnavailable("policy", "http://p:1", "refused"), grpc.StatusCode.UNAVAILABLE,
     "policy server unavailable: refused"),
    ("reward", UpstreamRejected("reward", "INVALID_ARGUMENT: prm_type: serving math-shepherd"),
     grpc.StatusCode.INVALID_ARGUMENT, "reward server rejected the request: INVALID_ARGUMENT: prm_type"),
    ("policy", RuntimeError("kaboom"), grpc.StatusCode.INTERNAL, "search failed: RuntimeError: kaboom"),
])
async def test_upstream_failures_map_to_one_status_each(svc: Harness, side: str, error: Exception,
                                                        code: grpc.StatusCode, details: str) -> None:
    setattr(svc.upstreams, f"{side}_error", error)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.stub.Search(request(), timeout=10)
    assert info.value.code() == code
    assert (info.value.details() or "").startswith(details), info.value.details()
    outcome = {grpc.StatusCode.INTERNAL: "error"}.get(code, code.name.lower())
    assert svc.sample("ets_search_searches_total", method="rebase", outcome=outcome, api="grpc") == 1
    await svc.idle()


async def test_queue_full_is_resource_exhausted(tight: Harness) -> None:
    tight.upstreams.hold()
    running = asyncio.ensure_future(tight.stub.Search(request(), timeout=10))
    while tight.upstreams.waiting < 1:
        await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(tight.stub.Search(request(), timeout=10))
    while tight.server.admission.queued < 1:
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tight.stub.Search(request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ETS_MAX_QUEUED_SEARCHES" in (info.value.details() or "")
    tight.upstreams.release()
    assert [r.answer for r in await asyncio.gather(running, queued)] == ["3", "3"]
    assert tight.outcomes()["resource_exhausted"] == 1 and tight.outcomes()["ok"] == 2
    await tight.idle()


async def test_deadline_is_deadline_exceeded_and_frees_the_slot(svc: Harness) -> None:
    svc.upstreams.hold()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.stub.Search(request(), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await svc.idle()
    assert svc.outcomes()["deadline_exceeded"] == 1
    assert svc.upstreams.waiting == 0  # the held expansion was cancelled with its search


async def test_client_cancel_stops_the_search(svc: Harness) -> None:
    svc.upstreams.hold()
    call = svc.stub.SearchStream(request(), timeout=30)
    first = await call.read()
    assert first.progress.depth == 0
    while svc.upstreams.waiting < 1:
        await asyncio.sleep(0.01)
    call.cancel()
    await svc.idle()
    assert svc.outcomes()["cancelled"] == 1
    assert svc.upstreams.expansions == 1  # nothing issued after the cancel
    svc.upstreams.release()


def test_status_for_is_one_table() -> None:
    cases = [
        (RequestError("config.width", "must be between 1 and 4096, got 0"), Status.INVALID_ARGUMENT,
         "config.width: must be"),
        (ConfigError("max_tokens", "too small"), Status.INVALID_ARGUMENT, "config.max_tokens: too small"),
        (QueueFull(8, 32), Status.RESOURCE_EXHAUSTED, "search service is at capacity"),
        (UpstreamUnavailable("policy", "http://p", "down"), Status.UNAVAILABLE, "policy server unavailable"),
        (UpstreamRejected("policy", "context length"), Status.INVALID_ARGUMENT, "policy server rejected"),
        (TimeoutError("search did not finish before the deadline (2.0s)"), Status.DEADLINE_EXCEEDED,
         "search did not finish before the deadline (2.0s)"),
        (KeyError("x"), Status.INTERNAL, "search failed: KeyError"),
    ]
    for exc, status, start in cases:
        failure = status_for(exc)
        assert failure.status is status and failure.message.startswith(start), (exc, failure)
