"""The service's bounded answer grouping: math-verify in a spawned worker process with a deadline."""
from __future__ import annotations

import threading

from ets.service.grouping import EquivalenceWorker


def test_grouping_off_the_main_thread_uses_a_worker_process() -> None:
    """A server runs answer choice in a worker thread: math-verify's alarms only work on a main
    thread, so the grouping runs in a spawned worker process (on its main thread)."""
    worker = EquivalenceWorker()
    out: list[list[list[int]]] = []
    t = threading.Thread(target=lambda: out.append(worker.group(["x = 3", "3", "(1, 2]", r"\left(1,2\right]", "7"])))
    t.start()
    t.join(120)
    assert out == [[[0, 1], [2, 3], [4]]]
    process = worker.process
    assert process is not None and process.is_alive()
    assert worker.group(["0.5", r"\frac{1}{2}"]) == [[0, 1]]
    assert worker.equivalent(r"\dfrac12", "0.5") and not worker.equivalent("1", "2")
    assert not worker.equivalent("", "0")
    assert worker.process is process  # reused, not restarted
    worker.close()
    assert worker.process is None and not process.is_alive()


def test_grouping_deadline_kills_the_worker_and_falls_back() -> None:
    worker = EquivalenceWorker(timeout_s=1e-4)  # no worker can even start in time
    out: list[list[list[int]]] = []
    t = threading.Thread(target=lambda: out.append(worker.group(["0.5", r"\frac{1}{2}", "0.5 ", "2"])))
    t.start()
    t.join(60)
    # Fallback: grouping by normalised strings only (\frac{1}{2} is no longer matched with 0.5).
    assert out == [[[0, 2], [1], [3]]]
    assert worker.process is None  # the worker was killed, nothing left running


def test_one_distinct_answer_needs_no_worker() -> None:
    worker = EquivalenceWorker()
    assert worker.group(["4", " 4", "", "4"]) == [[0, 1, 3]]
    assert worker.process is None
