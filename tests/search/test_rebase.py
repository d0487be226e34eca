"""REBASE allocation against hand-computed cases (sorted, w = exp(s/T), running ceil)."""
from __future__ import annotations

import numpy as np
import pytest

from ets.search.rebase import outcome_values, rebase_allocation


def test_dominant_candidate_takes_all() -> None:
    # w = e^4.5, e^2.5, e^0.5 = 90.02, 12.18, 1.65; first: ceil(4 * 90.02 / 103.85) = ceil(3.47) = 4.
    assert rebase_allocation([0.9, 0.5, 0.1], 4, 0.2).tolist() == [4, 0, 0]


def test_running_ceil_in_score_order() -> None:
    # Sorted 0.7, 0.65, 0.6, 0.2; w ∝ 1, e^-0.25=0.7788, e^-0.5=0.6065, e^-2.5=0.0821 (sum 2.4674).
    # 0.7: ceil(10 * 1 / 2.4674 = 4.05) = 5, W=5; 0.65: ceil(5 * 0.7788 / 1.4674 = 2.65) = 3, W=2;
    # 0.6: ceil(2 * 0.6065 / 0.6886 = 1.76) = 2, W=0; 0.2: 0.  Frontier order is kept in the result.
    assert rebase_allocation([0.7, 0.6, 0.65, 0.2], 10, 0.2).tolist() == [5, 2, 3, 0]


def test_ties_split_evenly_and_exactly() -> None:
    # Equal weights: 8 * 1/4 = 2 exactly must not round up to 3 through floating point.
    assert rebase_allocation([0.5] * 4, 8, 0.2).tolist() == [2, 2, 2, 2]
    # 8 over 3 ties: ceil(8/3) = 3, ceil(5/2) = 3, 2; ties go in frontier order.
    assert rebase_allocation([0.5] * 3, 8, 0.2).tolist() == [3, 3, 2]


def test_width_smaller_than_candidates() -> None:
    # 3 over 5 ties: ceil(3/5)=1, ceil(2/4)=1, ceil(1/3)=1, then nothing left.
    assert rebase_allocation([0.3] * 5, 3, 0.2).tolist() == [1, 1, 1, 0, 0]
    # Width 1: the best candidate (the first of tied best) gets it.
    assert rebase_allocation([0.2, 0.8, 0.8], 1, 0.2).tolist() == [0, 1, 0]
    # Width 2 over [0.9, 0.1, 0.5]: w ∝ 1, e^-4=0.0183, e^-2=0.1353; ceil(2/1.1536=1.73)=2.
    assert rebase_allocation([0.9, 0.1, 0.5], 2, 0.2).tolist() == [2, 0, 0]


def test_high_temperature_spreads_width() -> None:
    # T=5: w ∝ e^0.18, e^0.1, e^0.02 = 1.1972, 1.1052, 1.0202 (sum 3.3226);
    # ceil(6 * 1.1972 / 3.3226 = 2.16) = 3, W=3; ceil(3 * 1.1052 / 2.1254 = 1.56) = 2; then 1.
    assert rebase_allocation([0.9, 0.5, 0.1], 6, 5.0).tolist() == [3, 2, 1]


def test_keep_mask_prunes_and_reallocates() -> None:
    # Dropping the best candidate: the rest share the width as if it never existed.
    assert rebase_allocation([0.9, 0.5, 0.5], 4, 0.2, keep=[False, True, True]).tolist() == [0, 2, 2]
    assert rebase_allocation([0.9, 0.5], 4, 0.2, keep=[False, False]).tolist() == [0, 0]


@pytest.mark.parametrize("seed", range(20))
def test_sum_never_exceeds_width(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, w = int(rng.integers(1, 40)), int(rng.integers(0, 100))
    scores = rng.random(n)
    counts = rebase_allocation(scores, w, float(rng.choice([0.05, 0.2, 1.0])))
    assert counts.sum() == w and (counts >= 0).all()  # the running ceil always spends it all
    # Never more children to a lower-scored candidate than to a higher-scored one.
    order = np.argsort(-scores, kind="stable")
    assert (np.diff(counts[order]) <= 0).all()


def test_outcome_values_are_the_normalised_allocation() -> None:
    assert outcome_values([0.7, 0.6, 0.65, 0.2], 10, 0.2).tolist() == [0.5, 0.2, 0.3, 0.0]
