"""The one search pipeline: root -> generator and scorer -> loop -> vote, over any ``SearchSources``.

Owns ``run_pipeline`` (what the search service's runner and the evaluation's in-process searches
both call, so the two cannot drift), the ``SearchSources`` seam it is written against (the
root, a step generator and a scorer for one search: the service's live upstreams, the
evaluation's sample store in front of them, the tests' scripted ones), and the served result
(``ServedSearch``, ``ServedCandidate``, ``choose_answer``). The answer vote runs off the event
loop with the caller's grouping (the service and the evaluation pass a bounded worker process,
``ets.service.grouping``: the default grouping's timeouts only work on a main thread); groups
made by a fallback (``ets.search.answers.FallbackGroups``) are flagged in the result. Awaits only
its seams: no I/O of its own.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from ets.search.answers import AnswerVote, FallbackGroups, Grouping, group_answers, select_answer
from ets.search.config import SearchConfig, ValidConfig
from ets.search.interfaces import Root, StepGenerator, StepScorer
from ets.search.loop import DepthReport, Offload, SearchResult, run_search

__all__ = ["SearchSources", "ServedCandidate", "ServedSearch", "choose_answer", "run_pipeline"]


class SearchSources(Protocol):
    """What one search draws on: its root (the question formatted and tokenized for the policy),
    the policy's step generator and the reward side's scorer for its config."""

    async def root(self, question: str, config: SearchConfig, system_prompt: str | None = None) -> Root: ...
    def generator(self, config: SearchConfig) -> StepGenerator: ...
    def scorer(self, config: SearchConfig, expect_prm_type: str = "") -> StepScorer: ...


@dataclass
class ServedCandidate:
    text: str
    answer: str
    step_scores: list[float]
    aggregate_score: float
    finish_reason: str
    depth: int
    tokens: int


@dataclass
class ServedSearch:
    """A finished search as the service returns it (each transport renders it)."""

    config: SearchConfig
    result: SearchResult
    answer: str
    candidates: list[ServedCandidate]
    best_index: int | None
    wall_seconds: float
    # Answer grouping timed out and fell back to string matching (flagged in the response).
    grouping_fallback: bool = False
    # Every answer group of the vote, the chosen one first (ets.search.answers.AnswerChoice.ranking).
    votes: tuple[AnswerVote, ...] = ()


async def run_pipeline(
    problem: str, config: ValidConfig, sources: SearchSources, *,
    grouping: Grouping = group_answers, offload: Offload | None = None,
    on_depth: Callable[[DepthReport], None] | None = None, max_generated_tokens: int | None = None,
    expect_prm_type: str = "", system_prompt: str | None = None,
    after_root: Callable[[ValidConfig, Root], ValidConfig] | None = None,
) -> ServedSearch:
    """One search of ``problem`` under ``config``: the root, the loop over the sources' generator and
    scorer, then the vote (off the event loop, with ``grouping``; the early stop uses the same).

    ``after_root``: the config once the root's length is known (the service turns a request's
    new-token budget into ``max_tokens`` there). ``expect_prm_type``: the PRM type the request
    named, for the scorer to check. Raises what the sources and the loop raise."""
    start = time.perf_counter()
    root = await sources.root(problem, config, system_prompt)
    if after_root is not None:
        config = after_root(config, root)
    fell_back = False

    def group(answers: Sequence[str]) -> list[list[int]]:
        nonlocal fell_back
        groups = grouping(answers)
        fell_back = fell_back or isinstance(groups, FallbackGroups)
        return groups

    result = await run_search(root, config, sources.generator(config), sources.scorer(config, expect_prm_type),
                              on_depth=on_depth, offload=offload, max_generated_tokens=max_generated_tokens,
                              group=group)
    # Equivalence checks may run sympy: keep them off the event loop other searches share.
    served = await asyncio.to_thread(choose_answer, config, result, group)
    served.wall_seconds = time.perf_counter() - start
    served.grouping_fallback = fell_back
    return served


def choose_answer(config: SearchConfig, result: SearchResult, grouping: Grouping = group_answers) -> ServedSearch:
    """Extract each trajectory's answer, aggregate its step scores, vote (ets.search.answers)."""
    choice = select_answer(result.trajectories, voting=config.voting, aggregation=config.aggregation,
                           group=grouping)
    candidates = [
        ServedCandidate(
            text=t.text, answer=choice.answers[i], step_scores=[float(x) for x in t.step_scores],
            aggregate_score=float(choice.aggregate_scores[i]), finish_reason=str(t.finish_reason),
            depth=int(t.depth), tokens=int(t.tokens),
        )
        for i, t in enumerate(result.trajectories)
    ]
    return ServedSearch(config=result.config or config, result=result, answer=choice.answer,
                        candidates=candidates, best_index=choice.best_index, wall_seconds=0.0,
                        votes=choice.ranking)
