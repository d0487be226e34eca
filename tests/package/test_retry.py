"""The one backoff schedule (ets.retry) that the policy client, reward client and engine supervisor wait by."""
from __future__ import annotations

import pytest

from ets.retry import Backoff, RetryPolicy


def test_backoff_is_capped_and_grows() -> None:
    r = RetryPolicy(max_retries=5, initial_backoff_s=0.1, max_backoff_s=1.0)
    assert all(0.05 <= r.backoff(0) <= 0.1 for _ in range(50))
    assert all(0.5 <= r.backoff(10) <= 1.0 for _ in range(50))
    assert r.attempts == 6


def test_backoff_without_jitter_is_the_exact_schedule() -> None:
    # The supervisor's respawn pace: 1, 2, 4, ... capped at 60 s.
    b = Backoff(initial_backoff_s=1.0, max_backoff_s=60.0, jitter=False)
    assert [b.backoff(k) for k in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


@pytest.mark.parametrize("kwargs, message", [
    ({"initial_backoff_s": -1.0}, "initial_backoff_s"),
    ({"initial_backoff_s": 5.0, "max_backoff_s": 1.0}, "max_backoff_s"),
    ({"multiplier": 0.5}, "multiplier"),
    ({"max_retries": -1}, "max_retries"),
])
def test_bad_schedules_are_refused_naming_the_field(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
