"""REBASE allocation (Wu et al. 2024), exactly as the ETS spec states it.

Sort candidates by score (highest first; ties keep frontier order), weight w_i = exp(s_i / T),
walk the sorted list with W = remaining width: n_i = ceil(W * w_i / (w_i + sum of later w_j)),
W -= n_i. Candidates left with n_i = 0 are dropped. Also the basis of ETS (run over its kept set).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ets.search.base import Selection

# ceil() of a ratio that is an integer in exact arithmetic can land a hair above it in floating
# point (e.g. 8 * w / (4 * w)); without this slack equal scores would get 3,3,2,0 instead of 2,2,2,2.
_CEIL_SLACK = 1e-9


def rebase_allocation(
    scores: Sequence[float] | np.ndarray,
    width: int,
    softmax_temperature: float,
    keep: Sequence[bool] | np.ndarray | None = None,
) -> np.ndarray:
    """Child counts per candidate (frontier order); pruned candidates (``keep`` False) get 0."""
    s = np.asarray(scores, dtype=float)
    n = s.shape[0]
    counts = np.zeros(n, dtype=np.int64)
    if n == 0 or width <= 0:
        return counts
    mask = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return counts
    # Stable sort on -score: ties keep frontier order, so the allocation is deterministic.
    order = idx[np.argsort(-s[idx], kind="stable")]
    # Shifting by the max leaves every ratio unchanged and keeps exp() finite for any T.
    w = np.exp((s[order] - s[order[0]]) / softmax_temperature)
    suffix = np.cumsum(w[::-1])[::-1].tolist()
    weights = w.tolist()  # plain floats: the sequential walk is a Python loop
    remaining = int(width)
    for pos, i in enumerate(order.tolist()):
        if remaining <= 0:
            break
        share = remaining * weights[pos] / suffix[pos]
        k = min(remaining, max(0, math.ceil(share - _CEIL_SLACK)))
        counts[i] = k
        remaining -= k
    return counts


def outcome_values(scores: Sequence[float] | np.ndarray, width: int, softmax_temperature: float) -> np.ndarray:
    """ETS outcome values O_i: the full REBASE allocation over all candidates, normalised."""
    counts = rebase_allocation(scores, width, softmax_temperature).astype(float)
    total = counts.sum()
    return counts / total if total > 0 else counts


def select_rebase(scores: Sequence[float] | np.ndarray, width: int, softmax_temperature: float) -> Selection:
    return Selection(counts=tuple(int(c) for c in rebase_allocation(scores, width, softmax_temperature)))
