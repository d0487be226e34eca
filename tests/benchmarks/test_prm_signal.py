"""bench/prm_signal.py's pure parts: AUROC (ties, degenerate labels), the problem-level bootstrap
interval, the three AUROC views and the step split. (Sampling and scoring need the real policy
and PRMs: they run in the benchmark itself.)"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import prm_signal as sig

sys.path.pop(0)


def test_auroc_counts_pairs_and_ties_half() -> None:
    assert sig.auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert sig.auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert sig.auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5
    # Pairs (pos, neg): (0.7, 0.4) win, (0.7, 0.7) tie, (0.3, 0.4) loss, (0.3, 0.7) loss -> 1.5 / 4.
    assert sig.auroc([0.7, 0.3, 0.4, 0.7], [True, True, False, False]) == pytest.approx(0.375)
    assert sig.auroc([0.1, 0.2], [True, True]) is None and sig.auroc([], []) is None


def test_bootstrap_interval_brackets_the_estimate() -> None:
    groups = [[(0.9, True), (0.2, False)], [(0.6, True), (0.7, False)], [(0.8, True), (0.1, False)],
              [(0.4, False), (0.5, True)]]
    interval = sig.bootstrap_interval(groups, rounds=400, seed=1)
    pooled = sig.auroc([s for g in groups for s, _ in g], [y for g in groups for _, y in g])
    assert interval is not None and pooled is not None
    low, high = interval
    assert low <= pooled <= high and 0.0 <= low < high <= 1.0
    assert sig.bootstrap_interval([[(0.5, False)]], rounds=50) is None  # never both classes


def test_summary_views() -> None:
    samples = [
        {"problem": "a", "answer": "8", "right": True, "scores": {"p": [0.2, 0.9]}},
        {"problem": "a", "answer": "9", "right": False, "scores": {"p": [0.9, 0.1]}},
        {"problem": "b", "answer": "", "right": False, "scores": {"p": [0.5, 0.5]}},
        {"problem": "b", "answer": "3", "right": True, "scores": {"p": [0.6, 0.7]}},
    ]
    last = sig.summarise(samples, "p", "last")
    assert last["pooled"] == 1.0 and last["within_problem"] == 1.0 and last["within_problems"] == 2
    assert last["answered_only"] == 1.0
    first_is_min = sig.summarise(samples, "p", "min")
    # min: right 0.2 and 0.6 against wrong 0.1 and 0.5 -> 3 of 4 pairs.
    assert first_is_min["pooled"] == pytest.approx(0.75)


def test_split_steps_cuts_at_the_delimiter() -> None:
    from ets.policy.model_types import policy_model_type

    mt = policy_model_type("llama-instruct")
    text = "First 3 + 5 = 8.\n\n\n\nThe answer is 8.\n\n"
    assert sig.split_steps(text, mt) == ["First 3 + 5 = 8.", "The answer is 8."]
    assert sig.split_steps("  ", mt) == [""]


def test_reference_controls() -> None:
    steps = sig.reference_steps("Leila gave 100/2 = $<<100/2=50>>50 to Ali.\nAli now has $21+ $50 = $<<21+50=71>>71.")
    assert steps == ["Leila gave 100/2 = $50 to Ali.", "Ali now has $21+ $50 = $71."]
    assert sig.corrupt(steps, "71") == [steps[0], "Ali now has $21+ $50 = $72."]
    # Only the answer as a whole number is changed, and only in the last step.
    assert sig.corrupt(["5 + 5 = 10", "10 * 1.5 = 15, so 150 / 10 = 15"], "15") == [
        "5 + 5 = 10", "10 * 1.5 = 15, so 150 / 10 = 16"]
    assert sig.corrupt(["3 + 4 = 7"], "8") is None


def test_views_compare_the_kinds_they_name() -> None:
    samples = [
        {"problem": "a", "kind": "sampled", "answer": "", "right": False, "scores": {"p": [0.3]}},
        {"problem": "a", "kind": "reference", "answer": "8", "right": True, "scores": {"p": [0.2]}},
        {"problem": "a", "kind": "corrupted", "answer": "9", "right": False, "scores": {"p": [0.1]}},
    ]
    assert sig.summarise(samples, "p", "last", ("sampled",))["pooled"] is None  # no right one
    assert sig.summarise(samples, "p", "last", sig.VIEWS["reference_vs_sampled"])["pooled"] == 0.0
    assert sig.summarise(samples, "p", "last", sig.VIEWS["reference_vs_corrupted"])["pooled"] == 1.0
