"""Admission control: a bounded number of searches run at once, a bounded queue waits.

Searches are also weighted (by width): the running ones' weights sum to at most ``max_weight``,
so a width-256 search takes as much of the budget as 32 width-8 ones and memory is bounded by
configuration, not by what clients ask for.

Beyond ``max_concurrent`` running plus ``max_queued`` waiting, a new search is refused at once
(the servicer maps ``QueueFull`` to RESOURCE_EXHAUSTED) rather than piling up work the policy
server cannot serve before clients give up. Waiting is fair (FIFO) and cancellable: a client
that disconnects while queued leaves the queue.
"""
from __future__ import annotations

import asyncio
import collections
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

MAX_CONCURRENT_ENV = "ETS_MAX_CONCURRENT_SEARCHES"
MAX_QUEUED_ENV = "ETS_MAX_QUEUED_SEARCHES"
MAX_WEIGHT_ENV = "ETS_MAX_CONCURRENT_WIDTH"
DEFAULT_MAX_CONCURRENT = 8
DEFAULT_MAX_QUEUED = 32


class QueueFull(Exception):
    """Raised when both the running slots and the queue are full."""

    def __init__(self, running: int, queued: int) -> None:
        super().__init__(
            f"search service is at capacity: {running} searches running and {queued} queued "
            f"(limits {MAX_CONCURRENT_ENV}, {MAX_QUEUED_ENV}, {MAX_WEIGHT_ENV}); retry later"
        )
        self.running = running
        self.queued = queued


class Admission:
    """FIFO admission with ``max_concurrent`` slots and ``max_queued`` waiters.

    ``on_change(running, queued)`` is called after every change (the server updates gauges).
    """

    def __init__(self, max_concurrent: int, max_queued: int,
                 on_change: Callable[[int, int], None] | None = None, max_weight: int | None = None) -> None:
        if max_concurrent < 1:
            raise ValueError(f"{MAX_CONCURRENT_ENV}: must be at least 1, got {max_concurrent}")
        if max_queued < 0:
            raise ValueError(f"{MAX_QUEUED_ENV}: must be at least 0, got {max_queued}")
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.max_weight = max_weight
        self._running = 0
        self._weight = 0
        self._waiters: collections.deque[tuple[asyncio.Future[None], int]] = collections.deque()
        self._on_change = on_change

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._running, len(self._waiters))

    @property
    def weight(self) -> int:
        """The running searches' weights summed."""
        return self._weight

    def _fits(self, weight: int) -> bool:
        if self._running >= self.max_concurrent:
            return False
        # Nothing running: admit anything, so a search heavier than the budget cannot wait forever.
        return self.max_weight is None or self._running == 0 or self._weight + weight <= self.max_weight

    @asynccontextmanager
    async def slot(self, weight: int = 1) -> AsyncIterator[float]:
        """Hold one running slot of ``weight`` for the body; yields the seconds spent queued."""
        start = time.perf_counter()
        await self._acquire(weight)
        try:
            yield time.perf_counter() - start
        finally:
            self._release(weight)

    def _take(self, weight: int) -> None:
        self._running += 1
        self._weight += weight

    async def _acquire(self, weight: int) -> None:
        if not self._waiters and self._fits(weight):
            self._take(weight)
            self._changed()
            return
        if len(self._waiters) >= self.max_queued:
            raise QueueFull(self._running, len(self._waiters))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, weight)
        self._waiters.append(entry)
        self._changed()
        try:
            await waiter
        except BaseException:
            # Cancelled while queued. If the slot was already handed to us, pass it on.
            if waiter.done() and not waiter.cancelled():
                self._running -= 1
                self._weight -= weight
                self._wake_next()
            else:
                self._remove(entry)
                self._wake_next()  # a heavy head leaving may let lighter ones in
            self._changed()
            raise
        # _release() handed its slot over (the running count and weight were kept for us).

    def _remove(self, entry: tuple[asyncio.Future[None], int]) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass

    def _release(self, weight: int) -> None:
        self._running -= 1
        self._weight -= weight
        self._wake_next()
        self._changed()

    def _wake_next(self) -> None:
        # FIFO: the head waits for room even if a lighter search behind it would fit (no starvation).
        while self._waiters and self._fits(self._waiters[0][1]):
            waiter, weight = self._waiters.popleft()
            if waiter.done():
                continue
            self._take(weight)
            waiter.set_result(None)

