"""What every selection method shares: the result it returns (child counts per candidate, plus
solver facts), and how the loop spends width for it (``WidthLedger``: one pool by default; DVTS
keeps one per subtree, ``ets.search.dvts.SubtreeWidths``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from ets.search.tree import Node

# How an ETS keep-set was decided: "optimal" (proved), "time_limit" (best incumbent when the limit
# hit), "fallback" (no incumbent or solver error: plain REBASE used), "trivial" (no program needed:
# a single candidate or nothing to trade off), "" (not an ETS selection).
SolverStatus = Literal["optimal", "time_limit", "fallback", "trivial", ""]


@dataclass(frozen=True)
class Selection:
    """Child counts for the frontier's candidates, in frontier order (0 = pruned)."""

    counts: tuple[int, ...]
    solver_status: SolverStatus = ""
    objective: float | None = None  # ETS objective of the kept set (full objective, constants included)
    clusters: int = 0  # semantic clusters K used by the coverage term (0 = no coverage term)
    keep: tuple[bool, ...] | None = None  # ETS: the program's keep-set (before REBASE re-allocation)

    @property
    def kept(self) -> int:
        return sum(1 for n in self.counts if n > 0)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def fell_back(self) -> bool:
        return self.solver_status == "fallback"


@dataclass(frozen=True)
class Subtrees:
    """Where each candidate sits (DVTS): its subtree, and each subtree's remaining width."""

    of_candidate: Sequence[int]
    remaining: Mapping[int, int]


class WidthLedger:
    """A method's own width bookkeeping below the loop's one pool (``remaining_width``, which the loop
    keeps for every method). This default has none: every candidate is in subtree 0 and no subtree
    has width of its own. The loop tells it the root's children once (``place_root_children``)
    and every finished trajectory (``spend``), and hands ``view`` to the method's ``select``."""

    def place_root_children(self, children: Sequence[Node]) -> None:
        """The root's children, in sampling order, right after the first expansion."""

    def spend(self, node: Node) -> None:
        """``node`` finished (a trajectory spent one unit of width)."""

    def view(self, candidates: Sequence[Node]) -> Subtrees:
        return Subtrees([int(c.group or 0) for c in candidates], {})
