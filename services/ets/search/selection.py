"""One entry point over the selection methods: frontier + remaining width + config -> child counts.

Each method lives in its own module (``rebase``, ``ets``, ``beam``, ``dvts``, ``best_of_n``);
``select`` dispatches on ``config.method`` so callers (the loop, benchmarks) need not know their
signatures. DVTS additionally needs each candidate's subtree and each subtree's remaining width.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from ets.config import ConfigError, SearchConfig
from ets.search.base import Selection
from ets.search.beam import select_beam
from ets.search.best_of_n import select_best_of_n
from ets.search.dvts import select_dvts
from ets.search.ets import select_ets
from ets.search.rebase import select_rebase
from ets.search.tree import Frontier


def select(
    frontier: Frontier,
    width: int,
    config: SearchConfig,
    *,
    subtrees: Sequence[int] | None = None,
    subtree_remaining: Mapping[int, int] | None = None,
) -> Selection:
    """Child counts for ``frontier``'s candidates with ``width`` units of width left."""
    method = config.method
    if method == "ets":
        return select_ets(
            frontier, width, softmax_temperature=config.softmax_temperature, lambda_c=config.lambda_c,
            lambda_s=config.effective_lambda_s, cluster_distance=config.cluster_distance,
            node_cost=config.node_cost, time_limit_s=config.solver_time_limit_s,
        )
    if method == "rebase":
        return select_rebase(frontier.scores, width, config.softmax_temperature)
    if method == "beam":
        return select_beam(frontier.scores, width, config.effective_beam_keep)
    if method == "dvts":
        if subtrees is None or subtree_remaining is None:
            raise ValueError("dvts: needs each candidate's subtree and the subtrees' remaining width")
        return select_dvts(frontier.scores, subtrees, subtree_remaining)
    if method == "best_of_n":
        return select_best_of_n(frontier.size, width)
    raise ConfigError("method", f"unknown {method!r}")
