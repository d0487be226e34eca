"""What an evaluation runs: a dataset ``Problem`` and a ``RunSpec`` (a method at a width with
``SearchConfig`` overrides). Plain values, shared by ``ets.evaluation.evaluate`` (which reads
datasets and plans runs) and ``ets.evaluation.local`` (which runs one on one problem)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ets.evaluation.report import fmt_value


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class RunSpec:
    """One configuration to evaluate: a method at a width with SearchConfig overrides."""

    method: str
    width: int
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``ets`` or ``ets[cluster_distance=0.3,lambda_c=2]`` (the width is reported apart)."""
        if not self.overrides:
            return self.method
        return f"{self.method}[{','.join(f'{k}={fmt_value(v)}' for k, v in self.overrides)}]"
