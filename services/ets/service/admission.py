"""The search service's admission policy over the shared mechanism (``ets.admission.Admission``,
which owns the queueing): its limits' names and defaults, and its refusal.

A bounded number of searches run at once, weighted by width (the running ones' widths sum to at
most ``ETS_MAX_CONCURRENT_WIDTH``, so a width-256 search takes as much of the budget as 32
width-8 ones), and a bounded FIFO queue waits. Beyond ``max_concurrent`` running plus
``max_queued`` waiting a new search is refused at once with ``QueueFull`` (RESOURCE_EXHAUSTED)
rather than piling up work the policy server cannot serve before clients give up. The mechanism
is the one the reward server uses too: ``ets.admission.Admission``.
"""
from __future__ import annotations

from typing import Callable

from ets.admission import Admission

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


def search_admission(max_concurrent: int, max_queued: int, on_change: Callable[[int, int], None] | None = None,
                     max_weight: int | None = None) -> Admission:
    """Admission of searches (``slot(width)``): ``max_queued`` searches wait, ``QueueFull`` beyond."""
    if max_concurrent < 1:
        raise ValueError(f"{MAX_CONCURRENT_ENV}: must be at least 1, got {max_concurrent}")
    if max_queued < 0:
        raise ValueError(f"{MAX_QUEUED_ENV}: must be at least 0, got {max_queued}")
    return Admission(max_concurrent, max_queued, on_change, max_weight, refuse=QueueFull)
