"""The retry rules of upstream calls (ets.retry, the policy and reward clients, the runner):

- deadline-bounded: inside a search's ``RetryWindow`` a call retries for as long as a try still
  fits before the search's deadline (or the operator's ``ETS_UPSTREAM_RETRY_S``), not a fixed
  count, and gives up UNAVAILABLE before the deadline passes, saying which bound stopped it;
- only retryable statuses: connection failures, HTTP 502/503/504 and gRPC UNAVAILABLE; a 500, a
  4xx, INVALID_ARGUMENT, RESOURCE_EXHAUSTED are answered at once;
- only idempotent calls: a call that may have acted (``flush_cache``) is not retried once its
  connection was lost mid-call; a connection never made is retried for any call.

Real sockets on loopback: an aiohttp server that refuses the first tries, a port where nothing
listens until a real reward server (rules backend) starts on it, and a gRPC servicer that answers
a chosen status."""
from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from typing import AsyncIterator, Callable

import grpc
import pytest
from aiohttp import web

from ets.api.v1 import reward_pb2, reward_pb2_grpc
from ets.engine.process import free_port
from ets.policy.client import PolicyClient, PolicyServerError, PolicyUnavailable
from ets.retry import MIN_TRY_S, Retries, RetryPolicy, RetryWindow, current_window, retry_window
from ets.reward.client import RewardClient, RewardError, RewardUnavailable
from ets.search.interfaces import ScoredTrajectory

from reward_fixtures import ThreadedRewardServer, reward_config

# The clients' schedule made quick (and exact) for the tests: 50 ms doubling to 200 ms.
QUICK = RetryPolicy(max_retries=2, initial_backoff_s=0.05, max_backoff_s=0.2, jitter=False)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- the rule itself (ets.retry.Retries) --------------------------------------------------------

def test_within_a_window_retries_are_bounded_by_the_deadline_not_a_count() -> None:
    clock = Clock()
    state = Retries(QUICK, RetryWindow(deadline=110.0), clock=clock)
    waits = []
    while (wait := state.next_wait()) is not None:
        waits.append(wait)
        clock.now += wait + 0.01  # the failed try itself takes 10 ms
    assert len(waits) > QUICK.max_retries * 10  # far more than the count outside a window
    assert waits[:3] == [0.05, 0.1, 0.2] and max(waits) == 0.2
    # It stops only when the next wait and a try would no longer fit before the deadline.
    assert clock.now + 0.2 + MIN_TRY_S > 110.0 and clock.now < 110.0
    assert "the search's deadline would pass" in state.gave_up()


def test_the_operators_limit_bounds_retries_before_the_deadline() -> None:
    clock = Clock()
    state = Retries(QUICK, RetryWindow(deadline=200.0, max_retry_s=2.0), clock=clock)
    while (wait := state.next_wait()) is not None:
        clock.now += wait
    assert 100.0 + 2.0 - 0.2 - MIN_TRY_S <= clock.now <= 102.0
    assert "retry limit (2s)" in state.gave_up()


def test_a_zero_limit_means_no_retry_and_no_window_means_the_count() -> None:
    assert Retries(QUICK, RetryWindow(deadline=math.inf, max_retry_s=0.0), clock=Clock()).next_wait() is None
    state = Retries(QUICK, None, clock=Clock())
    assert [state.next_wait() for _ in range(4)] == [0.05, 0.1, None, None]
    assert state.gave_up() == "after 3 attempts"


async def test_the_window_follows_the_search_into_its_tasks() -> None:
    assert current_window() is None
    with retry_window(123.0, 7.0):
        seen = await asyncio.gather(*(asyncio.ensure_future(_window()) for _ in range(3)))
    assert seen == [RetryWindow(123.0, 7.0)] * 3
    assert current_window() is None


async def _window() -> RetryWindow | None:
    await asyncio.sleep(0)
    return current_window()


# ---- the policy client over real HTTP ---------------------------------------------------------

@pytest.fixture
async def refusing() -> AsyncIterator[Callable[[int, int], str]]:
    """``start(refusals, status) -> url``: a server whose /generate and /flush_cache answer
    ``status`` ``refusals`` times, then 200; ``/drop`` closes the connection mid-call."""
    runners: list[web.AppRunner] = []
    calls: dict[str, int] = {}

    async def start(refusals: int, status: int) -> str:
        async def handle(request: web.Request) -> web.StreamResponse:
            calls[request.path] = calls.get(request.path, 0) + 1
            if request.path == "/drop":
                assert request.transport is not None
                request.transport.close()  # the answer is lost: the server may have acted
                await asyncio.sleep(1)
            if calls[request.path] <= refusals:
                return web.json_response({"error": "refused"}, status=status)
            return web.json_response({"ok": True, "tries": calls[request.path]})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    start.calls = calls  # type: ignore[attr-defined]
    yield start  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


async def test_policy_refusals_are_retried_past_the_count_within_the_window(refusing: Callable) -> None:
    url = await refusing(8, 503)  # 8 refusals: more than QUICK's 2 retries
    retried: list[str] = []
    async with PolicyClient(url, retry=QUICK, on_retry=retried.append) as client:
        with pytest.raises(PolicyUnavailable, match="after 3 attempts"):
            await client._json("POST", "/generate", {})  # no window: the count
        with retry_window(time.monotonic() + 30):
            assert (await client._json("POST", "/generate", {}))["tries"] == 9
    assert retried.count("http_503") == 2 + 5  # tries 4-8 refused, the 9th served


async def test_policy_gives_up_unavailable_before_the_deadline(refusing: Callable) -> None:
    url = await refusing(10_000, 502)
    async with PolicyClient(url, retry=QUICK) as client:
        start = time.monotonic()
        with retry_window(start + 2.0):
            with pytest.raises(PolicyUnavailable, match="the search's deadline would pass"):
                await client._json("POST", "/generate", {})
        assert time.monotonic() < start + 2.0


@pytest.mark.parametrize("status", [500, 400, 404])
async def test_policy_statuses_that_are_not_refusals_are_not_retried(refusing: Callable, status: int) -> None:
    url = await refusing(10_000, status)
    retried: list[str] = []
    async with PolicyClient(url, retry=QUICK, on_retry=retried.append) as client:
        with retry_window(time.monotonic() + 30):
            with pytest.raises((PolicyServerError, Exception)) as err:
                await client._json("POST", "/generate", {})
    assert not isinstance(err.value, PolicyUnavailable)
    assert retried == [] and refusing.calls["/generate"] == 1  # type: ignore[attr-defined]


async def test_policy_retries_a_lost_connection_only_for_idempotent_calls(refusing: Callable) -> None:
    url = await refusing(0, 200)
    async with PolicyClient(url, retry=QUICK) as client:
        with retry_window(time.monotonic() + 2.0):
            with pytest.raises(PolicyUnavailable, match="lost mid-call \\(not retried\\)"):
                await client._request("POST", "/drop", {}, idempotent=False)
            assert refusing.calls["/drop"] == 1  # type: ignore[attr-defined]
            with pytest.raises(PolicyUnavailable, match="deadline would pass"):
                await client._request("POST", "/drop", {})  # idempotent: retried until the window closes
        assert refusing.calls["/drop"] > 3  # type: ignore[attr-defined]


async def _flush_server_after(delay_s: float, port: int) -> web.AppRunner:
    """A server answering ``/flush_cache`` on ``port``, started after ``delay_s``."""
    await asyncio.sleep(delay_s)
    app = web.Application()

    async def flushed(_: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_post("/flush_cache", flushed)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_policy_waits_for_a_server_that_comes_back_within_the_window(refusing: Callable) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    # Nothing listens for 1.5 s: connection refused.
    late = asyncio.ensure_future(_flush_server_after(1.5, port))
    try:
        async with PolicyClient(url, retry=QUICK) as client:
            with retry_window(time.monotonic() + 30):
                # Never connected: safe to retry even for a call that is not idempotent.
                await client.flush_cache()
    finally:
        await (await late).cleanup()


async def test_policy_retries_a_connection_that_times_out_before_it_is_made() -> None:
    """An engine whose accept queue is full (restarting, or swamped by every search retrying at
    once) drops new connections: the connect timeout passes with nothing sent. That is retried
    (it once cost a search of tests/stack/test_fault_load.py: aiohttp's ConnectionTimeoutError is
    a TimeoutError, and a request timeout is not retried)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue: later SYNs are dropped, connects hang
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    retried: list[str] = []

    async def accepting_again() -> web.AppRunner:
        await asyncio.sleep(1.5)
        for sock in (listener, *fillers):
            sock.close()
        return await _flush_server_after(0.0, port)

    url = f"http://127.0.0.1:{port}"
    try:
        async with PolicyClient(url, retry=QUICK, connect_timeout_s=0.2, on_retry=retried.append) as client:
            with retry_window(time.monotonic() + 0.8):
                with pytest.raises(PolicyUnavailable, match="deadline would pass.*ConnectionTimeoutError"):
                    await client._json("POST", "/generate", {})
            assert retried and set(retried) == {"connect_timeout"}
            later = asyncio.ensure_future(accepting_again())
            try:
                with retry_window(time.monotonic() + 30):
                    await client.flush_cache()  # never connected: retried even though not idempotent
            finally:
                await (await later).cleanup()
    finally:
        for sock in (listener, *fillers):
            sock.close()


async def test_policy_retries_an_answer_cut_off_mid_body_only_for_idempotent_calls() -> None:
    """A server killed while it writes an answer leaves the body short (aiohttp's
    ClientPayloadError, not a ClientConnectionError): for an idempotent call that is a connection
    lost mid-call, retried; it once cost a search of tests/stack/test_fault_load.py."""
    tries = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal tries
        tries += 1
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"ok": true}'
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n"
        if tries > 2:
            head = head.replace(str(len(body) + 100), str(len(body)))
        writer.write(head.encode() + body)  # the first two answers end 100 bytes short
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    retried: list[str] = []
    try:
        async with PolicyClient(f"http://127.0.0.1:{port}", retry=QUICK, on_retry=retried.append) as client:
            with retry_window(time.monotonic() + 30):
                with pytest.raises(PolicyUnavailable, match="lost mid-call \\(not retried\\).*ClientPayloadError"):
                    await client._request("POST", "/flush_cache", {}, idempotent=False)
                assert tries == 1
                assert await client._json("POST", "/generate", {}) == {"ok": True}
        assert tries == 3 and retried == ["disconnect"]
    finally:
        server.close()
        await server.wait_closed()


# ---- the reward client over real gRPC ---------------------------------------------------------

class StatusReward(reward_pb2_grpc.RewardServiceServicer):
    """A reward servicer that answers ``code`` to the first ``failures`` Embed calls."""

    def __init__(self, code: grpc.StatusCode, failures: int) -> None:
        self.code, self.failures, self.calls = code, failures, 0

    async def Embed(self, request: reward_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> reward_pb2.EmbedResponse:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(self.code, f"scripted {self.code.name}")
        return reward_pb2.EmbedResponse(embeddings=[reward_pb2.Embedding(values=[1.0, 0.0]) for _ in request.texts])


async def _serve(servicer: StatusReward) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_reward_unavailable_is_retried_past_the_count_within_the_window() -> None:
    servicer = StatusReward(grpc.StatusCode.UNAVAILABLE, failures=6)
    server, address = await _serve(servicer)
    retried: list[str] = []
    try:
        async with RewardClient(address, retry=QUICK, max_batch_size=8, on_retry=retried.append) as client:
            with pytest.raises(RewardUnavailable, match="after 3 attempts"):
                await client.embed(["a"])
            with retry_window(time.monotonic() + 30):
                assert (await client.embed(["a"])).shape == (1, 2)
    finally:
        await server.stop(0)
    assert servicer.calls == 7 and retried == ["unavailable"] * (2 + 3)  # calls 4-6 refused, the 7th served


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.FAILED_PRECONDITION])
async def test_reward_statuses_other_than_unavailable_are_not_retried(code: grpc.StatusCode) -> None:
    servicer = StatusReward(code, failures=1)
    server, address = await _serve(servicer)
    try:
        async with RewardClient(address, retry=QUICK, max_batch_size=8) as client:
            with retry_window(time.monotonic() + 30):
                with pytest.raises(RewardError) as err:
                    await client.embed(["a"])
    finally:
        await server.stop(0)
    assert err.value.code == code and not isinstance(err.value, RewardUnavailable)
    assert servicer.calls == 1


async def test_reward_gives_up_before_the_deadline_naming_it() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens
    async with RewardClient(address, retry=QUICK, max_batch_size=8) as client:
        start = time.monotonic()
        with retry_window(start + 2.0):
            with pytest.raises(RewardUnavailable, match="the search's deadline would pass"):
                await client.embed(["a"])
        assert time.monotonic() < start + 2.0


async def test_reward_waits_for_a_real_reward_server_that_starts_within_the_window() -> None:
    port = free_port()
    config = reward_config("", "arithmetic", "rules", port=port)  # type: ignore[arg-type]
    server = ThreadedRewardServer(config)
    starter = asyncio.ensure_future(asyncio.sleep(1.5))
    starter.add_done_callback(lambda _: server.start())
    try:
        async with RewardClient(f"127.0.0.1:{port}", retry=QUICK) as client:
            with retry_window(time.monotonic() + 60):
                scores = await client.score_last_steps([ScoredTrajectory("What is 2 + 3?", ["2 + 3 = 5"])])
        assert len(scores) == 1
    finally:
        await starter
        await asyncio.to_thread(server.stop)


# ---- the runner opens the window for each search ------------------------------------------------

async def test_each_search_runs_in_a_window_of_its_deadline_and_the_operators_limit() -> None:
    from ets.api.v1 import search_pb2
    from ets.testing.inprocess import PROBLEM, harness

    async with harness(upstream_retry_s=42.0) as s:
        seen: list[RetryWindow | None] = []
        scorer = s.upstreams.scorer_
        inner = scorer.score_last_steps

        async def spy(trajectories):  # type: ignore[no-untyped-def]
            seen.append(current_window())
            return await inner(trajectories)

        scorer.score_last_steps = spy  # type: ignore[method-assign]
        start = time.monotonic()
        reply = await s.stub.Search(search_pb2.SearchRequest(problem=PROBLEM, config=search_pb2.SearchConfig(
            method="rebase", width=2)), timeout=20)
        assert reply.answer == "3"
    assert seen and all(w is not None and w.max_retry_s == 42.0 for w in seen)
    deadline = seen[0].deadline  # type: ignore[union-attr]
    assert start + 15 < deadline <= start + 21  # the client's 20 s deadline, as the server saw it


def test_a_retried_calls_error_reaches_the_client_without_addresses() -> None:
    # What gave-up policy calls say (aiohttp's connect error carries a Python socket address).
    from ets.service.status import scrub

    text = ("POST http://10.0.0.5:30000/generate failed after 17 attempts over 28.0s: ClientConnectorError: "
            "Cannot connect to host 10.0.0.5:30000 ssl:default [Connect call failed ('10.0.0.5', 30000)] "
            "('fd00::5', 30000, 0, 0)")
    assert "10.0.0.5" not in scrub(text) and "fd00" not in scrub(text) and "30000" not in scrub(text)
