"""Best-of-N: ``width`` independent solutions, each continued one step at a time, no pruning.

The root gets ``width`` children (done by the loop); afterwards every unfinished candidate gets
exactly one child. Unfinished candidates never outnumber the remaining width, so no cap binds.
"""
from __future__ import annotations

from ets.search.base import Selection


def select_best_of_n(n_candidates: int, width: int) -> Selection:
    counts = [1 if i < width else 0 for i in range(n_candidates)]
    return Selection(counts=tuple(counts))
