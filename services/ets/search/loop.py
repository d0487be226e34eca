"""The search loop shared by every method: expand, score, spend width, select, one depth at a time.

Owns ``run_search`` (async; awaits only the ``StepGenerator`` and ``StepScorer`` interfaces, no
other I/O), the result types (``Trajectory``, ``SearchStats``, ``SearchResult``), the per-depth
``DepthReport`` and per-node seed derivation. Each depth issues exactly one ``expand`` call (all
selected candidates, batched), one ``score_last_steps`` call (all new children), and for ETS with
a coverage term one ``embed`` call (the candidates' newest-step texts).

Counting follows the spec: ``remaining_width`` starts at ``width``; every terminal node spends
one unit; the logical KV size of a selection is the tokens of the union of root-to-candidate
paths (root prompt included), summed over selections (``total_kv_tokens``) and maxed
(``peak_kv_tokens``); ``model_calls`` counts sampled steps requested.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import numpy as np

from ets.config import ConfigError, SearchConfig
from ets.search.base import Selection
from ets.search.interfaces import (
    ExpandRequest, Root, SampledStep, ScoredTrajectory, StepGenerator, StepParams, StepScorer,
)
from ets.search.selection import SelectionMethod, Subtrees, method_of
from ets.search.tree import FinishReason, Node, SearchTree

__all__ = [
    "DepthReport", "Offload", "Root", "SearchResult", "SearchStats", "Trajectory", "derive_seed", "run_search",
]

# Runs one selection (clustering + the ETS program: CPU-bound, up to the solver's time limit) and
# awaits its result. The service passes one that runs it in a worker pool so the event loop keeps
# serving other searches and health checks; None runs it inline (benchmarks, tests of the core).
Offload = Callable[[Callable[[], Selection]], Awaitable[Selection]]


@dataclass(frozen=True)
class Trajectory:
    """A finished candidate: its steps (as generated, oldest first) and their PRM scores."""

    steps: tuple[str, ...]
    step_scores: tuple[float, ...]
    tokens: int  # cumulative tokens, root prompt included
    finish_reason: FinishReason
    depth: int
    plain_steps: tuple[str, ...] = ()  # steps without delimiters (what the PRM saw)
    token_ids: tuple[int, ...] = ()  # generated tokens (all steps, root prompt excluded)

    @property
    def text(self) -> str:
        return "".join(self.steps)


@dataclass
class SearchStats:
    total_kv_tokens: int = 0
    peak_kv_tokens: int = 0
    model_calls: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    selection_seconds: float = 0.0
    depth_reached: int = 0
    selections: int = 0
    solver_fallbacks: int = 0
    policy_seconds: float = 0.0
    reward_seconds: float = 0.0
    wall_seconds: float = 0.0
    # ETS selections whose program hit its time limit (the best incumbent was used).
    solver_time_limits: int = 0
    # The search stopped because it spent its generated-token budget (``max_generated_tokens``).
    token_budget_hit: bool = False


@dataclass
class SearchResult:
    trajectories: list[Trajectory]
    stats: SearchStats
    config: SearchConfig | None = None  # the resolved configuration the search ran with


@dataclass(frozen=True)
class DepthReport:
    depth: int
    frontier_size: int  # non-terminal candidates at this depth
    kept_candidates: int  # candidates given at least one child
    kv_tokens: int  # logical KV size of this selection
    remaining_width: int
    finished: int  # finished trajectories so far
    elapsed_seconds: float


def derive_seed(seed: int | None, key: Sequence[int]) -> int | None:
    """A deterministic 31-bit seed for expanding the node at ``key`` (child indices from the root).

    Same config seed and same tree position -> same seed, so a search is reproducible; different
    nodes get unrelated seeds (hashing, not ``seed + index``, so sibling subtrees do not overlap).
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{','.join(map(str, key))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _terminal_reason(node: Node, config: SearchConfig) -> FinishReason | None:
    if config.model_type.has_answer(node.text):
        return "answer"
    if node.step_finish == "eos":
        return "eos"
    if node.cum_tokens >= config.max_tokens:
        return "max_tokens"
    return None


def _trajectory(node: Node, reason: FinishReason) -> Trajectory:
    path = node.path()[1:]
    return Trajectory(
        steps=tuple(n.text for n in path),
        step_scores=tuple(float(n.score) if n.score is not None else 0.0 for n in path),
        tokens=node.cum_tokens,
        finish_reason=reason,
        depth=node.depth,
        plain_steps=tuple(n.plain_text for n in path),
        token_ids=tuple(t for n in path for t in n.token_ids),
    )


async def run_search(
    root: Root,
    config: SearchConfig,
    generator: StepGenerator,
    scorer: StepScorer,
    *,
    on_depth: Callable[[DepthReport], None] | None = None,
    offload: Offload | None = None,
    max_generated_tokens: int | None = None,
) -> SearchResult:
    """Run one tree search and return every finished trajectory with the search's statistics.

    Raises ConfigError for an invalid config (or a prompt that leaves no room under max_tokens),
    ValueError when the generator or scorer breaks its interface (wrong counts, scores outside
    [0, 1]). Cancellation propagates: no expansion or scoring is issued after it.
    ``offload``: how each selection is run (see ``Offload``; None: inline).
    ``max_generated_tokens``: the search's token budget (an operator's cap), checked after each
    depth: once spent, the search stops and its open candidates finish as ``max_tokens``.
    """
    # A ValidConfig (what the service's request checks produce) is returned as is: checked once.
    config = config.validate()
    method = method_of(config)
    model_type = config.model_type
    if len(root.prompt_ids) >= config.max_tokens:
        raise ConfigError(
            "max_tokens",
            f"the prompt has {len(root.prompt_ids)} tokens; max_tokens ({config.max_tokens}) must exceed it",
        )
    started = time.perf_counter()
    tree = SearchTree(root.prompt_ids, root.question)
    stats = SearchStats()
    remaining = config.width
    group_remaining: dict[int, int] = {}
    finished: list[Trajectory] = []
    candidates: list[Node] = [tree.root]
    depth = 0

    while remaining > 0 and candidates and depth < config.max_depth:
        kv = tree.kv_tokens(candidates)
        stats.total_kv_tokens += kv
        stats.peak_kv_tokens = max(stats.peak_kv_tokens, kv)

        selection = await _select(method, candidates, depth, remaining, group_remaining, config, scorer, stats,
                                  offload)
        stats.selections += 1
        if selection.fell_back:
            stats.solver_fallbacks += 1
        if selection.solver_status == "time_limit":
            stats.solver_time_limits += 1
        if on_depth is not None:
            on_depth(DepthReport(
                depth=depth, frontier_size=len(candidates), kept_candidates=selection.kept,
                kv_tokens=kv, remaining_width=remaining, finished=len(finished),
                elapsed_seconds=time.perf_counter() - started,
            ))
        chosen = [(c, k) for c, k in zip(candidates, selection.counts, strict=True) if k > 0]
        if not chosen:
            break

        # One batched expansion for the whole depth.
        requests = [
            ExpandRequest(
                prefix_ids=tree.prefix_ids(c), n=k, seed=derive_seed(config.seed, c.key),
                max_new_tokens=min(config.max_step_tokens, config.max_tokens - c.cum_tokens),
            )
            for c, k in chosen
        ]
        params = StepParams(max_new_tokens=config.max_step_tokens, temperature=config.temperature)
        t0 = time.perf_counter()
        outputs = await generator.expand(requests, params)
        stats.policy_seconds += time.perf_counter() - t0
        stats.model_calls += sum(k for _, k in chosen)
        if len(outputs) != len(requests):
            raise ValueError(f"generator returned {len(outputs)} results for {len(requests)} requests")

        children: list[Node] = []
        for (parent, k), samples in zip(chosen, outputs, strict=True):
            if len(samples) != k:
                raise ValueError(f"generator returned {len(samples)} samples, {k} requested")
            for s in samples:
                children.append(_add_child(tree, parent, s, model_type.plain_step(s.text), stats))
        if method.split is not None and depth == 0:
            for i, child in enumerate(children):
                child.group = method.subtree_of_root_child(i, config.width)
            group_remaining = dict(enumerate(method.split(config.width)))

        # One scoring call for all new children.
        t0 = time.perf_counter()
        scores = await scorer.score_last_steps(
            [ScoredTrajectory(question=root.question, steps=tree.step_texts(c)) for c in children]
        )
        stats.reward_seconds += time.perf_counter() - t0
        if len(scores) != len(children):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(children)} steps")

        depth += 1
        stats.depth_reached = depth
        next_candidates: list[Node] = []
        for child, score in zip(children, scores, strict=True):
            score = float(score)
            if not 0.0 <= score <= 1.0:  # also rejects NaN
                raise ValueError(f"scorer returned {score!r}; PRM scores must lie in [0, 1]")
            child.score = score
            reason = _terminal_reason(child, config)
            if reason is None:
                next_candidates.append(child)
                continue
            child.terminal, child.finish_reason = True, reason
            finished.append(_trajectory(child, reason))
            remaining -= 1
            if child.group is not None and child.group in group_remaining:
                group_remaining[child.group] -= 1
        candidates = next_candidates
        if max_generated_tokens is not None and stats.generated_tokens >= max_generated_tokens:
            stats.token_budget_hit = True
            for c in candidates:
                c.finish_reason = "max_tokens"
                finished.append(_trajectory(c, "max_tokens"))
            candidates = []
            break

    if depth >= config.max_depth:
        for c in candidates:
            if c is not tree.root:
                c.finish_reason = "max_depth"
                finished.append(_trajectory(c, "max_depth"))
    stats.wall_seconds = time.perf_counter() - started
    return SearchResult(trajectories=finished, stats=stats, config=config.resolved())


def _add_child(tree: SearchTree, parent: Node, step: SampledStep, plain: str, stats: SearchStats) -> Node:
    stats.generated_tokens += len(step.token_ids)
    stats.prompt_tokens += int(step.prompt_tokens)
    stats.cached_prompt_tokens += int(step.cached_tokens)
    return tree.add_child(parent, step.token_ids, step.text, plain, step_finish=step.finish)


async def _select(
    method: SelectionMethod, candidates: list[Node], depth: int, remaining: int, group_remaining: dict[int, int],
    config: SearchConfig, scorer: StepScorer, stats: SearchStats, offload: Offload | None = None,
) -> Selection:
    """Child counts for this depth's candidates; times selection (not the embedding call)."""
    if depth == 0:
        # Every method starts the same way: the root gets the whole width.
        return Selection(counts=(remaining,) * len(candidates))
    embeddings: np.ndarray | None = None
    texts = [c.plain_text for c in candidates]
    if method.needs_embeddings(config, texts):
        t0 = time.perf_counter()
        embeddings = np.asarray(await scorer.embed(texts), dtype=float)
        stats.reward_seconds += time.perf_counter() - t0
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(f"scorer returned embeddings of shape {embeddings.shape} for {len(texts)} texts")
    t0 = time.perf_counter()
    frontier = SearchTree.frontier_of(candidates, embeddings)
    subtrees = Subtrees([int(c.group or 0) for c in candidates], dict(group_remaining))

    def run() -> Selection:
        return method.select(frontier, remaining, config, subtrees)

    try:
        return run() if offload is None else await offload(run)
    finally:
        stats.selection_seconds += time.perf_counter() - t0
