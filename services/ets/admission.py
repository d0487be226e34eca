"""The admission mechanism both servers use (owned here, once): a bounded number of calls run at
once, a bounded queue waits, anything beyond both is refused at once. What each server admits,
its limits' names and defaults, and its refusal are the server's own: the search service's in
``ets.service.admission`` (searches weighted by width, ``QueueFull``), the reward server's in
``ets.reward.server`` (calls costed by their items).

Running calls may carry a weight (the search service weighs a search by its width): the running
ones' weights sum to at most ``max_weight``, so memory is bounded by configuration, not by what
clients ask for. The queue is bounded by the sum of the waiting calls' costs: one per call for
searches, the items of a call for the reward server (a 256-trajectory batch waits as 256 single
ones). Waiting is fair (FIFO) and cancellable: a caller that goes away while queued leaves the
queue, and a slot handed to it is passed on. Refusal raises what the owner's ``refuse(running,
queued)`` returns, so each server keeps its own error and message (both map to
RESOURCE_EXHAUSTED). No I/O and no clock but the queue-wait measurement.
"""
from __future__ import annotations

import asyncio
import collections
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable


class Admission:
    """FIFO admission with ``max_concurrent`` slots and a queue of at most ``max_queued`` cost.

    ``on_change(running, queued)`` is called after every change (servers update gauges);
    ``refuse(running, queued_cost)`` builds the exception raised when a call cannot even wait.
    """

    def __init__(self, max_concurrent: int, max_queued: int, on_change: Callable[[int, int], None] | None = None,
                 max_weight: int | None = None, *, refuse: Callable[[int, int], Exception]) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent: must be at least 1, got {max_concurrent}")
        if max_queued < 0:
            raise ValueError(f"max_queued: must be at least 0, got {max_queued}")
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.max_weight = max_weight
        self._running = 0
        self._weight = 0
        self._queued_cost = 0
        # (future, weight, cost) per waiter, oldest first.
        self._waiters: collections.deque[tuple[asyncio.Future[None], int, int]] = collections.deque()
        self._on_change = on_change
        self._refuse = refuse

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        """Calls waiting."""
        return len(self._waiters)

    @property
    def queued_cost(self) -> int:
        """The waiting calls' costs summed (what ``max_queued`` bounds)."""
        return self._queued_cost

    @property
    def weight(self) -> int:
        """The running calls' weights summed."""
        return self._weight

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._running, len(self._waiters))

    def _fits(self, weight: int) -> bool:
        if self._running >= self.max_concurrent:
            return False
        # Nothing running: admit anything, so a call heavier than the budget cannot wait forever.
        return self.max_weight is None or self._running == 0 or self._weight + weight <= self.max_weight

    @asynccontextmanager
    async def slot(self, weight: int = 1, cost: int = 1) -> AsyncIterator[float]:
        """Hold one running slot of ``weight`` for the body, queueing at ``cost`` if it must wait;
        yields the seconds spent queued."""
        start = time.perf_counter()
        await self._acquire(weight, cost)
        try:
            yield time.perf_counter() - start
        finally:
            self._release(weight)

    def _take(self, weight: int) -> None:
        self._running += 1
        self._weight += weight

    async def _acquire(self, weight: int, cost: int) -> None:
        if not self._waiters and self._fits(weight):
            self._take(weight)
            self._changed()
            return
        if self._queued_cost + cost > self.max_queued:
            raise self._refuse(self._running, self._queued_cost)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, weight, cost)
        self._waiters.append(entry)
        self._queued_cost += cost
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
        # _wake_next() handed a slot over (the running count and weight were kept for us).

    def _remove(self, entry: tuple[asyncio.Future[None], int, int]) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            return
        self._queued_cost -= entry[2]

    def _release(self, weight: int) -> None:
        self._running -= 1
        self._weight -= weight
        self._wake_next()
        self._changed()

    def _wake_next(self) -> None:
        # FIFO: the head waits for room even if a lighter call behind it would fit (no starvation).
        while self._waiters and self._fits(self._waiters[0][1]):
            waiter, weight, cost = self._waiters.popleft()
            self._queued_cost -= cost
            if waiter.done():
                continue
            self._take(weight)
            waiter.set_result(None)
