"""Admission control (``ets.admission`` as the search service sets it up): bounded running searches, a
bounded FIFO queue, refusal beyond both."""
from __future__ import annotations

import asyncio

import pytest

from ets.service.admission import QueueFull, search_admission


async def test_runs_up_to_limit_then_queues_then_refuses() -> None:
    changes: list[tuple[int, int]] = []
    adm = search_admission(max_concurrent=2, max_queued=1, on_change=lambda r, q: changes.append((r, q)))
    release = asyncio.Event()
    order: list[int] = []

    async def job(i: int) -> None:
        async with adm.slot():
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(job(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert (adm.running, adm.queued) == (2, 1)
    with pytest.raises(QueueFull) as info:
        async with adm.slot():
            pass
    assert "ETS_MAX_QUEUED_SEARCHES" in str(info.value)
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]  # FIFO
    assert (adm.running, adm.queued) == (0, 0)
    assert changes[-1] == (0, 0)


async def test_cancelled_waiter_leaves_queue_and_slot_is_not_lost() -> None:
    adm = search_admission(max_concurrent=1, max_queued=2)
    release = asyncio.Event()

    async def hold() -> None:
        async with adm.slot():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    assert adm.queued == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert adm.queued == 0
    release.set()
    await holder
    assert adm.running == 0
    # The slot is free again.
    async with adm.slot() as waited:
        assert waited < 0.5
        assert adm.running == 1


async def test_cancel_after_handoff_passes_slot_on() -> None:
    adm = search_admission(max_concurrent=1, max_queued=2)
    first = asyncio.Event()

    async def hold(ev: asyncio.Event) -> None:
        async with adm.slot():
            await ev.wait()

    t1 = asyncio.create_task(hold(first))
    await asyncio.sleep(0.01)
    t2 = asyncio.create_task(hold(asyncio.Event()))
    second_done = asyncio.Event()
    t3 = asyncio.create_task(hold(second_done))
    await asyncio.sleep(0.01)
    first.set()  # hands the slot to t2 ...
    t2.cancel()  # ... which is cancelled before it runs: t3 must get the slot
    await asyncio.gather(t1, t2, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert adm.running == 1 and adm.queued == 0
    second_done.set()
    await t3
    assert adm.running == 0


def test_limits_validated() -> None:
    with pytest.raises(ValueError, match="ETS_MAX_CONCURRENT_SEARCHES"):
        search_admission(0, 1)
    with pytest.raises(ValueError, match="ETS_MAX_QUEUED_SEARCHES"):
        search_admission(1, -1)


@pytest.mark.parametrize(("argv", "env_name"), [
    (["--policy-url", "policy:30000"], "ETS_POLICY_URL"),
    (["--policy-engine-url", "policy-engine:30000"], "ETS_POLICY_ENGINE_URL"),
])
def test_policy_urls_validated_at_startup(argv: list[str], env_name: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from ets.service.main import settings_from_args

    with pytest.raises(SystemExit) as err:
        settings_from_args(argv, env={})
    assert err.value.code == 2
    assert env_name in capsys.readouterr().err
    ok = settings_from_args(["--policy-url", "http://router:30000", "--policy-engine-url", "http://e:30000"], env={})
    assert ok.policy_engine_url == "http://e:30000"
