"""The result type every selection method returns (child counts per candidate, plus solver facts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
