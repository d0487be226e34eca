"""Bounded answer equivalence for the service: math-verify in one spawned worker process.

The search core's grouping (``ets.search.answers.group_answers``) relies on math-verify's
``signal.alarm`` timeouts, which only work on a main thread; the service chooses answers in
worker threads. So the grouping runs in a worker process (on its main thread, with the alarms),
under an overall deadline (``timeout_s``); past it, or if the worker dies, the worker is killed
and the answers are grouped by their normalised strings instead. Nothing can hang a search.
The worker is a plain ``multiprocessing`` process this class owns (so it can kill it), started on
first use and reused; requests are serialised (one worker, one request at a time).
"""
from __future__ import annotations

import logging
import multiprocessing
import threading
from multiprocessing.connection import Connection
from typing import Any, Sequence

from ets.search.answers import FallbackGroups, group_answers, group_by_string, normalise

log = logging.getLogger("ets.service")

GROUPING_TIMEOUT_S = 30.0


def _worker_main(conn: Connection) -> None:
    """The worker's loop: answers in, groups out, until the pipe closes."""
    while True:
        try:
            answers = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(group_answers(answers))



class EquivalenceWorker:
    """``group(answers)``: ``ets.search.answers.Grouping`` bounded by ``timeout_s``;
    ``equivalent(a, b)`` likewise."""

    def __init__(self, timeout_s: float = GROUPING_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._process: Any = None  # multiprocessing SpawnProcess
        self._conn: Connection | None = None

    @property
    def process(self) -> Any:
        """The live worker process, if one is running (tests look at it)."""
        return self._process

    def _ensure(self) -> Connection:
        if self._process is None or not self._process.is_alive() or self._conn is None:
            self._kill()
            # spawn, not fork: the caller is a threaded server.
            ctx = multiprocessing.get_context("spawn")
            ours, theirs = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(theirs,), name="ets-equivalence", daemon=True)
            process.start()
            theirs.close()
            self._process, self._conn = process, ours
        return self._conn

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=5)
            self._process = None

    def group(self, answers: Sequence[str]) -> list[list[int]]:
        answers = list(answers)
        if len({normalise(a) for a in answers if a}) <= 1:
            return group_by_string(answers)  # nothing to decide: no worker needed
        with self._lock:
            try:
                conn = self._ensure()
                conn.send(answers)
                if conn.poll(self.timeout_s):
                    return list(conn.recv())
                log.warning("answer grouping took over %.0fs: worker killed, grouping by string", self.timeout_s)
            except (EOFError, OSError) as err:
                log.warning("answer grouping worker failed (%s): grouping by string", err)
            self._kill()
            return FallbackGroups(group_by_string(answers))

    def equivalent(self, a: str, b: str) -> bool:
        """``ets.search.answers.equivalent`` under the same deadline (for callers off the main
        thread, e.g. ``ets eval`` grading answers in worker threads)."""
        return bool(a) and bool(b) and self.group([a, b]) == [[0, 1]]

    def close(self) -> None:
        """Stop the worker (a later ``group`` starts a fresh one)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()  # the worker sees EOF and exits
                self._conn = None
            if self._process is not None:
                self._process.join(timeout=5)
            self._kill()
