"""Capped exponential backoff, and how long an upstream call may keep retrying.

``Backoff``: attempt ``k`` waits ``min(max_backoff_s, initial_backoff_s * multiplier**k)``, scaled
by a uniform factor in [0.5, 1) when ``jitter`` is on (so many searches hitting the same restarting
upstream do not retry in lockstep). ``RetryPolicy`` adds the bound: ``max_retries`` after the
first try. Users: the policy client (connection errors, HTTP 502-504), the reward client (gRPC
UNAVAILABLE) and the engine supervisor (respawns after a crash, unbounded, without jitter).

Inside a search the bound is not a count but time: the search service sets a ``RetryWindow`` (the
search's own deadline and the operator's ``ETS_UPSTREAM_RETRY_S``) for the search's task with
``retry_window``, and every upstream call the search makes retries (``Retries``) for as long as a
try still fits before the window closes, so a replica lost or an engine restarting costs a search
nothing when it is back (or another replica answers) in time. Outside a window (the CLI, the
evaluation's local runs, readiness probes) the count of ``RetryPolicy`` applies. Which failures
are retried is each client's: only transport failures and refusals (the call was not served), and
only calls that are idempotent (a step sample, a PRM score, an embedding, a tokenization: asking
again, of the same server or another replica, is as good as the first answer).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator


@dataclass(frozen=True)
class Backoff:
    """The wait before attempt ``attempt + 1`` (0-based ``attempt``: the first retry waits ``initial``)."""

    initial_backoff_s: float = 0.2
    max_backoff_s: float = 3.0
    multiplier: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("backoff: need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("backoff: multiplier must be >= 1")

    def backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** attempt)
        return base * (0.5 + random.random() / 2) if self.jitter else base


@dataclass(frozen=True)
class RetryPolicy(Backoff):
    """Bounded retries: the first try plus ``max_retries``, waiting ``backoff(k)`` before retry ``k + 1``."""

    max_retries: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_retries < 0:
            raise ValueError("max_retries: must be >= 0")

    @property
    def attempts(self) -> int:
        return self.max_retries + 1


# A retry is only worth waiting for when the call itself still has this long before the window closes.
MIN_TRY_S = 0.5


@dataclass(frozen=True)
class RetryWindow:
    """Until when the calls of one search may be retried: ``deadline`` (``time.monotonic()``) is the
    search's own, ``max_retry_s`` the operator's limit on how long one call keeps retrying."""

    deadline: float
    max_retry_s: float = math.inf


_WINDOW: contextvars.ContextVar[RetryWindow | None] = contextvars.ContextVar("ets_retry_window", default=None)


@contextlib.contextmanager
def retry_window(deadline: float, max_retry_s: float = math.inf) -> Iterator[RetryWindow]:
    """Calls made in this context (and in tasks it starts) retry until ``deadline`` (monotonic)."""
    window = RetryWindow(deadline, max_retry_s)
    token = _WINDOW.set(window)
    try:
        yield window
    finally:
        _WINDOW.reset(token)


def current_window() -> RetryWindow | None:
    return _WINDOW.get()


@dataclass
class Retries:
    """The retries of one call: ``next_wait()`` is the wait before the next try, or None (give up).

    Within a ``RetryWindow`` there is no count: a retry is allowed while its wait plus ``MIN_TRY_S``
    ends before the window closes (the search's deadline, or ``max_retry_s`` after the first try);
    without one, ``policy.max_retries`` bounds them. ``clock`` is ``time.monotonic``."""

    policy: RetryPolicy
    window: RetryWindow | None = field(default_factory=current_window)
    clock: Callable[[], float] = time.monotonic
    retries: int = 0
    started: float = -1.0

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def closes_at(self) -> float:
        """When retrying stops (monotonic); ``inf`` without a window."""
        if self.window is None:
            return math.inf
        return min(self.window.deadline, self.started + self.window.max_retry_s)

    def next_wait(self) -> float | None:
        if self.window is None:
            if self.retries >= self.policy.max_retries:
                return None
            wait = self.policy.backoff(self.retries)
        else:
            wait = self.policy.backoff(self.retries)
            if self.clock() + wait + MIN_TRY_S > self.closes_at():
                return None
        self.retries += 1
        return wait

    def gave_up(self) -> str:
        """Why retrying stopped, for the error message."""
        spent = self.clock() - self.started
        if self.window is None:
            return f"after {self.attempts} attempts"
        if self.started + self.window.max_retry_s <= self.window.deadline:
            why = f"the operator's retry limit ({self.window.max_retry_s:g}s) would pass"
        else:
            why = "the search's deadline would pass"
        return f"after {self.attempts} attempts over {spent:.1f}s ({why})"
