"""Fault and load on the real CPU stack (tiny policy, tiny math-shepherd PRM on its own SGLang
engine under the reward server, MiniLM embedder, ``ets serve`` with 8 slots and a queue of 32):
64 concurrent searches while the reward server is killed (SIGKILL of its process group) and
started again, then 64 more while the policy server is killed and started again, then 8 more
once both are back.

Asserted: every admitted search ends OK (its calls retry the killed server until the restarted one
answers, within the search's deadline: ets.retry), the others RESOURCE_EXHAUSTED naming the queue
setting, and none outlives its deadline; the killed server's processes are all gone (the reward
server's PRM engine and its workers included) before it is started again on the same ports; the
search service is SERVING again after each restart; afterwards nothing is in flight or queued and
its threads, open files and memory are back near their level after the warm-up search; after the
stack stops, none of its processes is left.

Measured before issue 26 (the clients then retried 3-4 times and the service failed fast, so
the killed upstream cost searches; the fault benchmark, bench/faults.py, measures it since):
on the shared 2-core development machine (load average 9-17 from other work), 7 min 47 s
wall (most of it SGLang CPU engines loading: two at the start, one per restart); two runs, the
same counts (the second, with the search service failing fast while an upstream is down, shown):
- reward killed after 8 OK: 8 OK, 24 RESOURCE_EXHAUSTED (64 - 8 slots - 32 queued), 32 UNAVAILABLE
  ("reward server unavailable ..."); all 5 of its processes (reward server, PRM engine leader and
  the engine's workers) gone 0.6 s after the SIGKILL; search service SERVING 1.0 s after the new
  reward server was; slowest search 37.4 s (deadline 300 s; 85.9 s before the fail-fast);
- policy killed after 8 OK: 8 OK, 24 RESOURCE_EXHAUSTED, 32 UNAVAILABLE ("policy server
  unavailable ..."); its 4 processes gone 0.2 s after the SIGKILL; SERVING 0.6 s after the new
  policy was; slowest search 36.4 s;
- then 8/8 OK; nothing in flight or queued; search service threads 13 -> 17 (worker pools grown
  to their size), open files 18 -> 24, resident memory 105.0 -> 108.8 MB (after the warm-up
  search -> after all 137 searches).
After issue 26 (2026-12-07, 7 min 10 s, load average 3-6): for each kill 40 OK and 24
RESOURCE_EXHAUSTED, none lost (slowest 127.0 s / 173.5 s); threads 13 -> 19, open files 19 -> 23,
resident memory 123.5 -> 127.5 MB.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import pytest

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.engine.procfs import ProcInfo, descendants, process_table, still_running
from ets.testing.stack import TINY, Stack, StackConfig, start_stack, wait_grpc_serving
from service_fixtures import SMALL_SEARCH_ENV
from tools import http_get, small

pytestmark = [pytest.mark.sglang, pytest.mark.stack, pytest.mark.timeout(2400)]

SEARCHES = 64
SLOTS, QUEUE = 8, 32
DEADLINE_S = 300.0
# Searches that finish before the kill: the rest are in flight or queued when it happens.
KILL_AFTER_OK = 8
RESTART_TIMEOUT_S = 600.0
PROBLEM = "A box holds 12 pencils. How many pencils are in 4 boxes?"


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float


def _resources(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return {"rss_mb": round(rss_kb / 1024, 1), "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _gauge(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _one(stub: search_pb2_grpc.SearchServiceStub, i: int, done: list[Outcome]) -> Outcome:
    start = time.monotonic()
    try:
        await stub.Search(search_pb2.SearchRequest(problem=f"{PROBLEM} ({i})", config=small("rebase", 4, seed=i),
                                                   request_id=f"f{i}"), timeout=DEADLINE_S)
        out = Outcome(grpc.StatusCode.OK, "", time.monotonic() - start)
    except grpc.aio.AioRpcError as err:
        out = Outcome(err.code(), err.details() or "", time.monotonic() - start)
    done.append(out)
    return out


def _wave_into(address: str, n: int, done: list[Outcome], results: list[Outcome]) -> None:
    results.extend(_wave(address, n, done))


def _wave(address: str, n: int, done: list[Outcome]) -> list[Outcome]:
    async def run() -> list[Outcome]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            return list(await asyncio.gather(*(_one(stub, i, done) for i in range(n))))
    return asyncio.run(run())


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)
    return time.monotonic() - start


def _kill_and_restart(stack: Stack, victim: str, done: list[Outcome], record: dict[str, object]) -> None:
    """Once KILL_AFTER_OK searches succeeded: SIGKILL ``victim``'s process group, check every one of
    its processes is gone, start it again on its ports and wait for it and the search service."""
    _wait(lambda: sum(o.code == grpc.StatusCode.OK for o in done) >= KILL_AFTER_OK, DEADLINE_S, "the first OKs")
    proc = getattr(stack, victim)
    doomed = _tree(proc.pid)
    record["unfinished_at_kill"] = SEARCHES - len(done)
    record["processes_killed"] = len(doomed)
    os.killpg(proc.pgid, signal.SIGKILL)
    record["gone_s"] = round(_wait(lambda: not still_running(doomed), 60, f"every {victim} process gone"), 1)
    new = stack.restart(victim)
    if victim == "policy":
        new.wait_healthy(timeout=RESTART_TIMEOUT_S)
    else:
        wait_grpc_serving(new, stack.reward_addr, RESTART_TIMEOUT_S)
    assert stack.search is not None
    record["serving_after_restart_s"] = round(_wait(
        lambda: _serving(stack.search_addr), 120, "the search service SERVING again"), 1)


def _tree(pid: int) -> list[ProcInfo]:
    """``pid`` and all its descendants (whatever group or session they are in)."""
    table = process_table() or {}
    return ([table[pid]] if pid in table else []) + descendants(pid, table)


def _serving(address: str) -> bool:
    from ets.healthcheck import check

    try:
        return check(address, "", 5.0) == "SERVING"
    except grpc.RpcError:
        return False


def _counts(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.code.name] = counts.get(o.code.name, 0) + 1
    return counts


def _check_clean(outcomes: list[Outcome], victim: str) -> None:
    for o in outcomes:
        assert o.seconds <= DEADLINE_S + 5, f"a search ran {o.seconds:.0f}s, past its {DEADLINE_S:.0f}s deadline"
        if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "ETS_MAX_QUEUED_SEARCHES" in o.details, o.details
        elif o.code == grpc.StatusCode.UNAVAILABLE:
            assert o.details.startswith(f"{victim} server unavailable"), o.details
        else:
            assert o.code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), (o.code, o.details)


def test_sixty_four_searches_while_reward_then_policy_are_killed_and_restarted(
    tmp_path: Path, tiny_model_factory: Callable[[str], Path], record_property: Callable[[str, object], None]
) -> None:
    cfg = StackConfig(work_dir=tmp_path / "stack", policy=TINY, policy_model=tiny_model_factory("policy"),
                      prm_type="math-shepherd", prm_model=tiny_model_factory("math-shepherd"),
                      search_env=dict(SMALL_SEARCH_ENV), max_concurrent=SLOTS, max_queued=QUEUE)
    # Spawned from this (the main) thread: the stack's processes die with the thread that started them.
    stack = start_stack(cfg)
    everything: list[ProcInfo] = []
    record: dict[str, object] = {}
    try:
        assert stack.search is not None
        search_pid = stack.search.pid
        warm = _wave(stack.search_addr, 1, [])
        assert warm[0].code == grpc.StatusCode.OK, warm
        before = _resources(search_pid)

        for victim in ("reward", "policy"):
            done: list[Outcome] = []
            results: list[Outcome] = []
            wave = threading.Thread(target=_wave_into, args=(stack.search_addr, SEARCHES, done, results))
            wave.start()
            step: dict[str, object] = {}
            try:
                _kill_and_restart(stack, victim, done, step)
            finally:
                wave.join(timeout=DEADLINE_S + 30)
            assert not wave.is_alive() and len(results) == SEARCHES
            _check_clean(results, victim)
            counts = _counts(results)
            step["statuses"] = counts
            step["slowest_s"] = round(max(o.seconds for o in results), 1)
            record[f"{victim}_killed"] = step
            # The queue bound held, and every admitted search survived the kill: its calls retried
            # until the restarted server answered, within its deadline (ets.retry). One run of
            # 2026-12-07 lost 1 of 40 with UNAVAILABLE (its details were not kept); the two paths
            # found that could do it, both unretried then: a policy answer cut off mid-body by the
            # kill (aiohttp's ClientPayloadError) and a connect timeout. Both are retried now
            # (tests/service/test_retry_window.py); a loss names its call in the failure.
            assert counts.get("RESOURCE_EXHAUSTED", 0) == SEARCHES - SLOTS - QUEUE, counts
            lost = [f"{o.code.name} after {o.seconds:.1f}s: {o.details}" for o in results
                    if o.code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)]
            step["lost"] = lost
            assert not lost and set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, (counts, lost)

        after_restarts = _wave(stack.search_addr, SLOTS, [])
        assert [o.code for o in after_restarts] == [grpc.StatusCode.OK] * SLOTS, after_restarts
        metrics = http_get(stack.search_metrics_url)
        assert _gauge(metrics, "ets_search_searches_in_flight") == 0
        assert _gauge(metrics, "ets_search_searches_queued") == 0
        after = _resources(search_pid)
        record.update(search_service_before=before, search_service_after=after, after_restarts_ok=SLOTS)
        record_property("fault_load", json.dumps(record))
        print("fault-and-load:", json.dumps(record, indent=1))
        # Flat: the threads of worker pools grown to their size (selection, answer grouping) and a
        # few connections to the new upstreams at most.
        assert after["threads"] <= before["threads"] + 8, (before, after)
        assert after["fds"] <= before["fds"] + 16, (before, after)
        assert after["rss_mb"] <= before["rss_mb"] + 100, (before, after)
        everything = [p for proc in stack.processes() for p in _tree(proc.pid)]
    finally:
        stack.stop()
    left = still_running(everything)
    assert not left, f"processes of the stack left after stop(): {left}"
