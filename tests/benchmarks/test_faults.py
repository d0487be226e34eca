"""The fault benchmark's pure part (bench/faults.py): a search's prefix reuse before and after the
fault, from its streamed token counts."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import faults

pytestmark = pytest.mark.pure


def test_reuse_is_split_at_the_last_report_before_the_fault() -> None:
    # Depth reports at t=1, 2 (before the fault at 2.5), 4 and the result at 6.
    out = faults.Outcome("OK", 6.0, [(1.0, 100, 50), (2.0, 300, 200), (4.0, 500, 220), (6.0, 700, 380)])
    before, after = out.reuse_split(2.5)
    assert before == pytest.approx(200 / 300)
    assert after == pytest.approx((380 - 200) / (700 - 300))


def test_a_search_with_no_report_before_the_fault_has_no_before_and_a_failed_one_neither() -> None:
    out = faults.Outcome("OK", 3.0, [(3.0, 400, 100)])
    assert out.reuse_split(2.0) == (None, pytest.approx(0.25))
    assert faults.Outcome("UNAVAILABLE", 3.0, [(1.0, 10, 5)]).reuse_split(2.0) == (None, None)


def test_quantiles() -> None:
    q = faults._quantiles([0.9, 0.1, 0.5, 0.7, 0.3])
    assert q == {"n": 5, "p10": 0.1, "median": 0.5, "mean": 0.5}
    assert faults._quantiles([]) is None
