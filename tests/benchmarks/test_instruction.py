"""bench/instruction.py's pure parts: how a sampled solution is labelled (answer line, usable
answer, copied placeholder, right), per-problem rates and the paired summary against the
baseline wording. (Sampling needs the real policy: it runs in the benchmark itself.)"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from ets.policy.model_types import policy_model_type

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import instruction as bench

sys.path.pop(0)

SMOLLM2 = policy_model_type("smollm2-instruct")


@pytest.mark.parametrize("text, labels", [
    ("3 + 5 = 8\n\nThe answer is 8.", {"answer_line": True, "usable": True, "placeholder": False, "right": True}),
    ("3 + 5 = 9\n\nThe answer is 9.", {"answer_line": True, "usable": True, "placeholder": False, "right": False}),
    ("So Tom has 8 apples.\n\nThe answer is N.", {"answer_line": True, "usable": False, "placeholder": True,
                                                   "right": False}),
    ("Tom has 8 apples now.", {"answer_line": False, "usable": False, "placeholder": False, "right": False}),
])
def test_classify_labels_each_solution(text: str, labels: dict[str, bool]) -> None:
    assert bench.classify(text, "8", SMOLLM2) == labels


def _rows(wording: str, right: dict[str, list[bool]]) -> list[dict[str, Any]]:
    return [{"wording": wording, "problem": p, "k": k, "tokens": 10, "right": r, "answer_line": True,
             "usable": True, "placeholder": False}
            for p, flags in right.items() for k, r in enumerate(flags)]


def test_per_problem_rates_weight_problems_not_samples() -> None:
    rows = _rows("a", {"p1": [True, True, True, False], "p2": [False, False]})
    assert bench.per_problem_rates(rows, "right") == {"p1": 0.75, "p2": 0.0}


def test_summary_pairs_each_wording_with_the_baseline_by_problem() -> None:
    rows = (_rows("base", {"p1": [False, False], "p2": [True, False], "p3": [False, False]})
            + _rows("new", {"p1": [True, True], "p2": [True, False], "p3": [True, False]}))
    summary = bench.summarise(rows, ["base", "new"])
    assert summary["base"]["right"]["rate"] == pytest.approx(1 / 6)
    assert "minus_base" not in summary["base"]["right"]
    diff = summary["new"]["right"]["minus_base"]
    # Per problem: +1, 0, +0.5 -> mean +0.5; every resample's mean lies within [0, 1].
    assert diff["mean"] == pytest.approx(0.5) and diff["problems"] == 3
    assert 0.0 <= diff["ci95"][0] <= 0.5 <= diff["ci95"][1] <= 1.0
    assert "| new | 6 |" in bench.table(summary, "base")
