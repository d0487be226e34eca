"""Diverse verifier tree search (DVTS): independent subtrees, greedy within each.

After the root's first expansion (``width`` children) the width is split into
ceil(sqrt(width)) subtrees: child i of the root joins subtree ``subtree_of_root_child``, and each
subtree starts with as many units of width as it has first-level children. Within a subtree only
the best candidate (the best child of its single expanded parent) is kept and it gets the
subtree's whole remaining width; a terminal node spends one unit of its own subtree's width.
``SubtreeWidths`` is that bookkeeping as the loop drives it (``ets.search.base.WidthLedger``).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from ets.search.base import Selection, Subtrees, WidthLedger
from ets.search.tree import Node


def num_subtrees(width: int) -> int:
    return max(1, math.ceil(math.sqrt(width)))


def subtree_widths(width: int) -> list[int]:
    """Width per subtree: as even as possible, summing to ``width``."""
    b = min(num_subtrees(width), width)
    return [width // b + (1 if k < width % b else 0) for k in range(b)]


def subtree_of_root_child(index: int, width: int, widths: list[int] | None = None) -> int:
    """Subtree of the root's ``index``-th child: contiguous blocks of ``widths`` (default
    ``subtree_widths(width)``)."""
    acc = 0
    for k, w in enumerate(subtree_widths(width) if widths is None else widths):
        acc += w
        if index < acc:
            return k
    raise ValueError(f"root child {index} beyond width {width}")


def select_dvts(
    scores: Sequence[float] | np.ndarray, subtrees: Sequence[int], remaining: Mapping[int, int]
) -> Selection:
    """Best candidate of each subtree gets that subtree's remaining width; the rest get 0."""
    s = np.asarray(scores, dtype=float)
    counts = np.zeros(s.shape[0], dtype=np.int64)
    best: dict[int, int] = {}
    for i, g in enumerate(subtrees):
        if g not in best or s[i] > s[best[g]]:  # strict: ties keep the first in frontier order
            best[g] = i
    for g, i in best.items():
        counts[i] = max(0, int(remaining.get(g, 0)))
    return Selection(counts=tuple(int(c) for c in counts))


class SubtreeWidths(WidthLedger):
    """DVTS's width per subtree: the root's children are placed in contiguous blocks of
    ``subtree_widths(width)`` (each node inherits its parent's subtree), and a finished trajectory
    spends one unit of its own subtree's width."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.widths = subtree_widths(width)
        self.remaining: dict[int, int] = {}

    def place_root_children(self, children: Sequence[Node]) -> None:
        for i, child in enumerate(children):
            child.group = subtree_of_root_child(i, self.width, self.widths)
        self.remaining = dict(enumerate(self.widths))

    def spend(self, node: Node) -> None:
        if node.group is not None and node.group in self.remaining:
            self.remaining[node.group] -= 1

    def view(self, candidates: Sequence[Node]) -> Subtrees:
        return Subtrees([int(c.group or 0) for c in candidates], dict(self.remaining))
