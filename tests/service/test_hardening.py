"""Hardening of the search service, in-process (real grpc.aio server on loopback, scripted upstreams):
bounded metric labels, request_id and operator caps, selection off the event loop, admission by
width, result size, error classes, fail-fast on a known-down upstream, grouping fallback flagged.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2

from ets.api.v1 import search_pb2
from ets.search.config import SearchConfig
from ets.policy.client import PolicyServerError, PolicyUnavailable
from ets.reward.client import RewardClient, RewardError, RewardUnavailable
from ets.reward.server import Overloaded, RewardService
from ets.reward.settings import RewardServerConfig
from ets.search import selection
from ets.search.answers import group_answers
from ets.search.base import Selection
from ets.service.grouping import EquivalenceWorker
from ets.service.status import Status, UpstreamFailed, UpstreamRejected, UpstreamUnavailable, status_for
from ets.service.upstreams import policy_failure, reward_failure
from ets.testing.inprocess import PROBLEM, Harness, harness

from reward_fixtures import ThreadedRewardServer, reward_config


def request(request_id: str = "r1", **config: Any) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(problem=PROBLEM, config=search_pb2.SearchConfig(**config), request_id=request_id)


async def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


# ---- metric labels, request_id, caps -------------------------------------------------------------

async def test_made_up_methods_add_no_series(svc: Harness) -> None:
    before = svc.series("ets_search_searches_total")
    for i in range(1000):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await svc.stub.Search(request(method=f"made-up-{i}"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert svc.series("ets_search_searches_total") == before + 1  # one series: method="invalid"
    assert svc.sample("ets_search_searches_total", method="invalid", outcome="invalid_argument",
                      api="grpc") == 1000


@pytest.mark.parametrize("request_id", ["x" * 129, "two words", "new\nline", "ünïcode", "tab\there", "nul\x00"])
async def test_request_id_is_capped_in_length_and_charset(svc: Harness, request_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.stub.Search(request(request_id), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value.details()).startswith("request_id: "), info.value.details()


async def test_a_well_formed_request_id_is_echoed(svc: Harness) -> None:
    rid = "eval-ets[cluster_distance=0.3]-w4-s1/" + "x" * 91  # 128 characters, as ets eval names them
    assert (await svc.stub.Search(request(rid), timeout=10)).request_id == rid


@pytest.mark.parametrize(("config", "field", "env"), [
    ({"width": 257}, "config.width", "ETS_LIMIT_WIDTH"),
    ({"max_tokens": 8193}, "config.max_tokens", "ETS_LIMIT_MAX_TOKENS"),
    ({"max_depth": 101}, "config.max_depth", "ETS_LIMIT_MAX_DEPTH"),
    ({"solver_time_limit_s": 2.5}, "config.solver_time_limit_s", "ETS_MAX_SOLVER_TIME_LIMIT_S"),
    ({"solver_time_limit_s": 600}, "config.solver_time_limit_s", "ETS_MAX_SOLVER_TIME_LIMIT_S"),
])
async def test_operator_caps_refuse_larger_requests(svc: Harness, config: dict[str, Any], field: str, env: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.stub.Search(request(**config), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value.details()).startswith(f"{field}: must be at most") and env in str(info.value.details())
    assert svc.upstreams.expansions == 0


async def test_caps_are_settings() -> None:
    async with harness(limit_width=4, max_solver_time_limit_s=0.25) as s:
        assert (await _code(s.stub.Search(request(width=5), timeout=10))) == grpc.StatusCode.INVALID_ARGUMENT
        assert (await _code(s.stub.Search(request(solver_time_limit_s=0.3), timeout=10))) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert (await s.stub.Search(request(width=4, solver_time_limit_s=0.25), timeout=10)).answer == "3"


async def test_generated_token_budget_stops_the_search_with_a_result() -> None:
    # Each depth of a width-2 search generates 2 x 5 tokens: a budget of 10 stops after the first.
    async with harness(limit_generated_tokens=10) as s:
        response = await s.stub.Search(request(), timeout=10)
        assert response.stats.depth_reached == 1 and response.stats.generated_tokens == 10
        assert {c.finish_reason for c in response.candidates} == {"max_tokens"}
        assert s.sample("ets_search_token_budget_hits_total") == 1
        # A gRPC client can tell that the operator's budget cut its search (as an OpenAI client can).
        assert response.stats.token_budget_hit is True


async def test_search_duration_is_capped_whatever_the_client_deadline() -> None:
    async with harness(limit_search_s=0.3) as s:
        s.upstreams.hold()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Search(request(), timeout=30)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        assert "ETS_LIMIT_SEARCH_S=0.3s" in str(info.value.details())


# ---- selection off the event loop ----------------------------------------------------------------

async def test_a_long_selection_does_not_block_health_or_other_searches(
        svc: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A selection holds its thread (as a long clustering + HiGHS run does) until the test lets it
    go: health answers and another whole search finishes first. Were selection on the event loop,
    nothing else could run until it gave up, and the order would show it."""
    gate = threading.Event()
    order: list[str] = []

    def held_select(frontier: Any, width: int, config: SearchConfig, subtrees: Any) -> Selection:
        order.append("selecting")
        if not gate.wait(timeout=30):
            order.append("selection gave up")
        return selection.METHODS["rebase"].select(frontier, width, config, subtrees)

    monkeypatch.setitem(selection.METHODS, "held", selection.SelectionMethod("held", held_select))
    selecting = asyncio.ensure_future(svc.stub.Search(request(method="held"), timeout=60))
    while "selecting" not in order:  # the held search sits in its first real selection
        await asyncio.sleep(0.005)
    for _ in range(5):
        reply = await svc.health.Check(health_pb2.HealthCheckRequest(), timeout=40)
        assert reply.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    order.append("health answered")
    events = [event async for event in svc.stub.SearchStream(request("other"), timeout=40)]
    assert events[-1].result.answer == "3"
    order.append("other search answered")
    assert not selecting.done()
    gate.set()
    assert (await selecting).answer == "3"
    assert order[:3] == ["selecting", "health answered", "other search answered"], order
    assert "selection gave up" not in order


# ---- admission weighted by width ------------------------------------------------------------------

async def test_admission_is_weighted_by_width() -> None:
    async with harness(max_concurrent=8, max_queued=4, max_concurrent_width=6, limit_width=6) as s:
        s.upstreams.hold()
        wide = asyncio.ensure_future(s.stub.Search(request(width=4), timeout=10))
        while s.upstreams.waiting < 1:
            await asyncio.sleep(0.01)
        narrow = asyncio.ensure_future(s.stub.Search(request(width=2), timeout=10))
        too_wide = asyncio.ensure_future(s.stub.Search(request(width=3), timeout=10))
        while s.server.admission.running + s.server.admission.queued < 3:
            await asyncio.sleep(0.01)
        # width 4 + 2 fit the budget of 6; the width-3 search waits although 6 slots are free.
        assert (s.server.admission.running, s.server.admission.weight, s.server.admission.queued) == (2, 6, 1)
        s.upstreams.release()
        assert [r.answer for r in await asyncio.gather(wide, narrow, too_wide)] == ["3", "3", "3"]


# ---- result size ----------------------------------------------------------------------------------

BIG = "x" * 20_000
BIG_SCRIPT: dict[tuple[str, ...], Any] = {(): [(f"{BIG}{i} ки", 5, "step") for i in range(8)],
              **{(f"{BIG}{i} ки",): [("The answer is 3 ки", 5, "step")] for i in range(8)}}


async def test_summary_only_returns_answer_best_and_stats(svc: Harness) -> None:
    response = await svc.stub.Search(search_pb2.SearchRequest(problem=PROBLEM, summary_only=True), timeout=10)
    assert response.answer == "3" and response.best.text.endswith("The answer is 3 ки")
    assert response.candidates_omitted and len(response.candidates) == 0 and response.stats.selections == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_a_result_too_large_to_send_still_returns_the_answer(stream: bool) -> None:
    async with harness(BIG_SCRIPT, max_send_bytes=64 * 1024) as s:
        req = request(width=8)
        if stream:
            response = [e async for e in s.stub.SearchStream(req, timeout=10)][-1].result
        else:
            response = await s.stub.Search(req, timeout=10)
        assert response.answer == "3" and response.candidates_omitted and not response.candidates
        assert response.best.text.endswith("The answer is 3 ки") and response.stats.generated_tokens > 0
        assert s.sample("ets_search_results_truncated_total") == 1


# ---- error classes, fail fast, grouping fallback -------------------------------------------------

@pytest.mark.parametrize(("err", "status"), [
    (RewardError(grpc.StatusCode.INTERNAL, "boom"), Status.INTERNAL),
    (RewardError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), Status.RESOURCE_EXHAUSTED),
    (RewardError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"), Status.DEADLINE_EXCEEDED),
    (RewardError(grpc.StatusCode.UNAUTHENTICATED, "token"), Status.INTERNAL),
    (ValueError("scores of the wrong shape"), Status.INTERNAL),
    (RewardUnavailable(grpc.StatusCode.UNAVAILABLE, "after 5 attempts"), Status.UNAVAILABLE),
    (ConnectionRefusedError(), Status.UNAVAILABLE),
    (RewardError(grpc.StatusCode.INVALID_ARGUMENT, "prm_type"), Status.INVALID_ARGUMENT),
])
def test_reward_errors_keep_their_class(err: BaseException, status: Status) -> None:
    failure = status_for(reward_failure("10.0.0.7:50052", err))
    assert failure.status is status, failure
    assert failure.message.startswith("reward server") and "10.0.0.7" not in failure.message


@pytest.mark.parametrize(("err", "status"), [
    (PolicyServerError("engine crashed", 500), Status.INTERNAL),
    (ValueError("not json"), Status.INTERNAL),
    (PolicyUnavailable("GET http://policy:30000/generate failed after 3 attempts"), Status.UNAVAILABLE),
])
def test_policy_errors_keep_their_class_and_hide_addresses(err: BaseException, status: Status) -> None:
    failure = status_for(policy_failure("http://policy:30000", err))
    assert failure.status is status and "policy:30000" not in failure.message, failure


@pytest.mark.parametrize(("error", "code"), [
    (UpstreamFailed("reward", "RESOURCE_EXHAUSTED: queue full", Status.RESOURCE_EXHAUSTED),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UpstreamFailed("reward", "INTERNAL: boom"), grpc.StatusCode.INTERNAL),
    (ValueError("scorer returned 1.5"), grpc.StatusCode.INTERNAL),
])
async def test_upstream_failures_reach_the_client_with_their_class(svc: Harness, error: Exception,
                                                                   code: grpc.StatusCode) -> None:
    svc.upstreams.reward_error = error
    assert (await _code(svc.stub.Search(request(), timeout=10))) == code


async def test_fail_fast_while_an_upstream_is_known_down() -> None:
    async with harness(fail_fast=True) as svc:
        await _fail_fast_refuses(svc)


async def _fail_fast_refuses(svc: Harness) -> None:
    assert await svc.server.wait_ready(5)
    svc.upstreams.probe_result = {"policy": None, "reward": "UNAVAILABLE: connection refused"}
    svc.server.readiness.reprobe()
    while svc.server.readiness.ready:
        await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.stub.Search(request(), timeout=10)
    assert time.perf_counter() - t0 < 1.0
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert str(info.value.details()).startswith("reward server unavailable: down at its last health probe")
    assert svc.upstreams.expansions == 0  # no policy work spent on a search that cannot be scored
    svc.upstreams.probe_result = {"policy": None, "reward": None}
    assert await svc.server.wait_ready(5)
    assert (await svc.stub.Search(request(), timeout=10)).answer == "3"


async def test_grouping_fallback_is_flagged_and_counted() -> None:
    two_answers: dict[tuple[str, ...], Any] = {
        (): [("The answer is 3 ки", 5, "step"), ("The answer is 4 ки", 5, "step")]}
    worker = EquivalenceWorker(timeout_s=0.001)  # the real worker, given no time: it falls back
    try:
        async with harness(two_answers, grouping=worker.group) as s:
            response = await s.stub.Search(request(), timeout=30)
            assert response.grouping_fallback and response.answer in ("3", "4")
            assert s.sample("ets_search_grouping_fallbacks_total") == 1
            s.server.runner.grouping = group_answers
            assert not (await s.stub.Search(request(), timeout=30)).grouping_fallback
    finally:
        await asyncio.to_thread(worker.close)


def test_status_for_upstream_failed() -> None:
    failure = status_for(UpstreamFailed("reward", "DEADLINE_EXCEEDED at ipv4:10.1.2.3:50052", Status.DEADLINE_EXCEEDED))
    assert failure.status is Status.DEADLINE_EXCEEDED and "10.1.2.3" not in failure.message
    assert status_for(UpstreamRejected("policy", "prompt too long")).status is Status.INVALID_ARGUMENT
    assert status_for(UpstreamUnavailable("policy", "http://10.0.0.1:30000", "down")).message == \
        "policy server unavailable: down"


# ---- connection age -------------------------------------------------------------------------------

async def test_max_connection_age_does_not_cut_a_running_search() -> None:
    async with harness(max_connection_age_s=0.2) as s:
        s.upstreams.hold()
        call = asyncio.ensure_future(s.stub.Search(request(), timeout=10))
        while s.upstreams.waiting < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.6)  # past the connection's age: the server sends GOAWAY
        s.upstreams.release()
        assert (await call).answer == "3"
        assert (await s.stub.Search(request(), timeout=10)).answer == "3"  # the client reconnected


# ---- reward server capacity -----------------------------------------------------------------------

async def test_reward_server_queue_is_bounded_by_items() -> None:
    config = RewardServerConfig(prm_backend="rules", prm_type="arithmetic", max_concurrent=1, max_queued_items=3)
    service = RewardService(config, backend=None, embedder=None, metrics=None)  # type: ignore[arg-type]
    release = asyncio.Event()

    async def hold(items: int) -> None:
        async with service.admission.slot(cost=items):
            await release.wait()

    running = asyncio.ensure_future(hold(8))
    await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(hold(2))
    await asyncio.sleep(0.01)
    assert service.admission.queued_cost == 2
    with pytest.raises(Overloaded, match="ETS_REWARD_MAX_QUEUED_ITEMS"):
        async with service.admission.slot(cost=2):
            pass
    release.set()
    await asyncio.gather(running, queued)
    assert service.admission.queued_cost == 0


async def test_fail_fast_is_off_by_default() -> None:
    # Off by default: a search waits for an upstream within its deadline (ets.retry) instead.
    async with harness() as s:
        s.upstreams.probe_result = {"policy": None, "reward": "UNAVAILABLE: probe timed out"}
        await s.server.readiness.probe_once()
        assert not s.server.readiness.ready
        # The probe failed but the scorer answers: with fail-fast off (the default) the search runs.
        assert (await s.stub.Search(request(), timeout=10)).answer == "3"


async def test_reward_server_refuses_beyond_its_queue_over_grpc(
        reward_servers: Callable[..., ThreadedRewardServer]) -> None:
    """One call slot, no queue: of many concurrent Embed calls some are served, the others get
    RESOURCE_EXHAUSTED at once (not UNAVAILABLE), and the client does not retry them."""
    server = reward_servers(reward_config("", "arithmetic", "rules",  # type: ignore[arg-type]
                                          max_concurrent=1, max_queued_items=0))
    async with RewardClient(server.address, max_batch_size=16) as client:
        texts = [f"step {i}: 2 + {i} = {2 + i}" for i in range(16)]
        outcomes = await asyncio.gather(*(client.embed(texts) for _ in range(12)), return_exceptions=True)
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, RewardError)]
    assert served and refused and len(served) + len(refused) == len(outcomes), outcomes
    assert {e.code for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("ETS_REWARD_MAX_QUEUED_ITEMS" in e.details for e in refused)
