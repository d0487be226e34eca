"""Capped exponential backoff: the one schedule every retry and respawn of the product waits by.

``Backoff``: attempt ``k`` waits ``min(max_backoff_s, initial_backoff_s * multiplier**k)``, scaled
by a uniform factor in [0.5, 1) when ``jitter`` is on (so many searches hitting the same restarting
upstream do not retry in lockstep). ``RetryPolicy`` adds the bound: ``max_retries`` after the
first try. Users: the policy client (connection errors, HTTP 502-504), the reward client (gRPC
UNAVAILABLE) and the engine supervisor (respawns after a crash, unbounded, without jitter).
"""
from __future__ import annotations

import random
from dataclasses import dataclass


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
