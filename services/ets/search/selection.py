"""The one registry of selection methods: everything the loop needs to know about each.

Each method's algorithm lives in its own module (``rebase``, ``ets``, ``beam``, ``dvts``,
``best_of_n``); its ``SelectionMethod`` entry here says how to call it and what else the loop must
do for it: whether the candidates' newest steps must be embedded first (ETS with a coverage
term), and how its width is kept below the loop's one pool (``ledger``: DVTS's subtrees, each
with its own width; ``ets.search.base.WidthLedger``).
Adding a method is its module plus one entry in ``METHODS``; the config, the loop, the service and
the benchmarks take the names from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ets.search.base import Selection, Subtrees, WidthLedger
from ets.search.beam import select_beam
from ets.search.best_of_n import select_best_of_n
from ets.search.config import ConfigError, SearchConfig, ValidConfig
from ets.search.dvts import SubtreeWidths, select_dvts
from ets.search.ets import select_ets, uses_coverage
from ets.search.rebase import select_rebase
from ets.search.tree import Frontier


@dataclass(frozen=True)
class SelectionMethod:
    """A selection method as the loop uses it (after the root, which always gets the whole width).

    ``select(frontier, width, config, subtrees)``: child counts for the frontier's candidates.
    ``needs_embeddings(config, newest_step_texts)``: embed the candidates' newest steps first
    (they arrive as ``frontier.embeddings``). ``ledger(width)``: a new search's width bookkeeping
    below the loop's pool (default: none; DVTS: a width per subtree).
    """

    name: str
    select: Callable[[Frontier, int, SearchConfig, Subtrees], Selection]
    needs_embeddings: Callable[[SearchConfig, Sequence[str]], bool] = lambda config, texts: False
    ledger: Callable[[int], WidthLedger] = lambda width: WidthLedger()


def _ets(frontier: Frontier, width: int, c: SearchConfig, _: Subtrees) -> Selection:
    return select_ets(frontier, width, softmax_temperature=c.softmax_temperature, lambda_c=c.lambda_c,
                      lambda_s=c.effective_lambda_s, cluster_distance=c.cluster_distance, node_cost=c.node_cost,
                      time_limit_s=c.solver_time_limit_s)


METHODS: dict[str, SelectionMethod] = {m.name: m for m in (
    SelectionMethod(
        "ets", _ets,
        needs_embeddings=lambda c, texts: uses_coverage(texts, c.lambda_c, c.effective_lambda_s)),
    SelectionMethod(
        "rebase", lambda f, width, c, _: select_rebase(f.scores, width, c.softmax_temperature)),
    SelectionMethod(
        "beam", lambda f, width, c, _: select_beam(f.scores, width, c.effective_beam_keep)),
    SelectionMethod(
        "dvts", lambda f, width, c, s: select_dvts(f.scores, s.of_candidate, s.remaining), ledger=SubtreeWidths),
    SelectionMethod(
        "best_of_n", lambda f, width, c, _: select_best_of_n(f.size, width)),
)}


def method_of(config: SearchConfig) -> SelectionMethod:
    """The registered method ``config.method`` names (ConfigError naming the field if none)."""
    try:
        return METHODS[config.method]
    except KeyError:
        raise ConfigError("method", f"unknown {config.method!r}; expected one of {list(METHODS)}") from None


def validate(config: SearchConfig) -> ValidConfig:
    """``config.validate()`` plus the method name (the names live in this registry)."""
    valid = config.validate()
    method_of(valid)
    return valid

