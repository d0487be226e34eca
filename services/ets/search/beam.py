"""Beam search allocation: the top ``keep`` candidates by score share the remaining width.

After the root (which the loop gives the whole width), the best ``keep`` candidates (default
ceil(sqrt(width))) each get ceil(remaining / keep) children. The ceil can overshoot the remaining
width (e.g. 15 over 4 beams); children are handed out in score order and capped so the total never
exceeds it (4, 4, 4, 3) - the spec's hard rule is that a depth never spends more than remains.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ets.search.base import Selection


def select_beam(scores: Sequence[float] | np.ndarray, width: int, keep: int) -> Selection:
    s = np.asarray(scores, dtype=float)
    counts = np.zeros(s.shape[0], dtype=np.int64)
    if s.shape[0] == 0 or width <= 0 or keep <= 0:
        return Selection(counts=tuple(int(c) for c in counts))
    per_beam = math.ceil(width / keep)
    left = width
    for i in np.argsort(-s, kind="stable")[:keep]:  # ties keep frontier order
        k = min(per_beam, left)
        counts[i] = k
        left -= k
    return Selection(counts=tuple(int(c) for c in counts))
