"""The search core run in-process against the live policy and reward servers, through a sample store.

Owns ``LocalUpstreams`` (one policy HTTP client and one reward gRPC client shared by every search
of an evaluation, the identities that key the store, roots cached per question) and ``run_local``
(one configuration on one problem: ``ets.search.loop.run_search`` over ``StoreGenerator`` /
``StoreScorer``, the answer vote, scoring against the reference). This is how ``ets eval --store``
pairs configurations without giving the search service any per-request state: the service keeps
serving one search at a time from its clients; the evaluation owns the store.

In paired mode every configuration of a problem draws from the same sample streams; in unpaired
mode (the control) the store key also names the configuration, so each draws its own samples
(still persisted and resumable).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TypeVar

from ets.search.config import SearchConfig
from ets.evaluation.report import ProblemResult, grade
from ets.evaluation.store import Counts, SampleStore, StoreGenerator, StoreScorer, tree_digest
from ets.policy.client import PolicyClient
from ets.policy.generator import SGLangStepGenerator, tokenize_root
from ets.policy.model_types import policy_model_type
from ets.policy.routed import make_policy_client
from ets.reward.client import RewardClient
from ets.search.answers import select_answer
from ets.search.interfaces import Root
from ets.search.loop import DepthReport, SearchResult, run_search

if TYPE_CHECKING:  # evaluate.py imports this module
    from ets.evaluation.evaluate import Problem, RunSpec


@dataclass
class LocalUpstreams:
    """The live servers an in-process evaluation searches against (clients made on first use)."""

    policy_url: str
    reward_addr: str
    _policy: PolicyClient | None = None
    _reward: RewardClient | None = None
    _roots: dict[tuple[str, str], Root] = field(default_factory=dict)
    _identity: dict[str, str] = field(default_factory=dict)

    def policy(self) -> PolicyClient:
        if self._policy is None:
            self._policy = make_policy_client(self.policy_url)
        return self._policy

    def reward(self) -> RewardClient:
        if self._reward is None:
            self._reward = RewardClient(self.reward_addr, timeout_s=600.0)
        return self._reward

    async def identities(self, config: SearchConfig) -> dict[str, str]:
        """What keys the store: the policy model and how steps are cut; the PRM; the embedder."""
        if not self._identity:
            info = await self.policy().model_info()
            reward = await self.reward().info()
            self._identity = {
                "policy": str(info.get("model_path") or self.policy_url),
                "prm": f"{reward.prm_type}|{reward.prm_backend}|{reward.prm_model}",
                "embedder": str(reward.embedder_model),
            }
        mt = policy_model_type(config.policy_model_type)
        return {**self._identity,
                "policy": f"{self._identity['policy']}|{mt.name}|stop={list(mt.stop)}|trim={mt.no_stop_trim}"}

    async def root(self, question: str, config: SearchConfig) -> Root:
        key = (question, config.policy_model_type)
        if key not in self._roots:
            self._roots[key] = await tokenize_root(self.policy(), question, config.policy_model_type)
        return self._roots[key]

    async def close(self) -> None:
        if self._policy is not None:
            await self._policy.close()
        if self._reward is not None:
            await self._reward.close()


_T = TypeVar("_T")


async def _offload(work: Callable[[], _T]) -> _T:
    # Selections (clustering + HiGHS) off the event loop: concurrent searches keep drawing.
    return await asyncio.to_thread(work)


@dataclass
class LocalSearch:
    """One in-process search: its result (every trajectory), what it asked of the store, and timing."""

    result: SearchResult
    counts: Counts
    frontier: int
    kept: int
    wall_seconds: float


async def search_local(question: str, config: SearchConfig, upstreams: LocalUpstreams, store: SampleStore,
                       *, scope: str = "") -> LocalSearch:
    """One search of ``question`` under ``config`` over ``store`` (``scope``: set in unpaired mode,
    so that this configuration's samples are its own)."""
    started = time.perf_counter()
    ids = await upstreams.identities(config)
    root = await upstreams.root(question, config)
    identity = ids["policy"] + (f"|unpaired={scope}" if scope else "")
    generator = StoreGenerator(store, SGLangStepGenerator(upstreams.policy(), config.policy_model_type), identity)
    scorer = StoreScorer(store, upstreams.reward(), ids["prm"], ids["embedder"])
    frontier = kept = 0

    def on_depth(report: DepthReport) -> None:
        nonlocal frontier, kept
        frontier += report.frontier_size
        kept += report.kept_candidates

    result = await run_search(root, config, generator, scorer, on_depth=on_depth, offload=_offload)
    counts = Counts()
    counts.add(generator.counts)
    counts.add(scorer.counts)
    return LocalSearch(result, counts, frontier, kept, time.perf_counter() - started)


async def run_local(problem: "Problem", spec: "RunSpec", base: SearchConfig, seed: int, upstreams: LocalUpstreams,
                    store: SampleStore, *, paired: bool = True) -> ProblemResult:
    """One configuration on one problem, as a ``ProblemResult`` with the store's requested/drawn
    counts and the tree's digest."""
    result = ProblemResult(id=problem.id, label=spec.label, method=spec.method, width=spec.width,
                           reference=problem.answer, seed=seed, overrides=dict(spec.overrides))
    try:
        config = base.replace(method=spec.method, width=spec.width, seed=seed, **dict(spec.overrides)).validate()
        done = await search_local(problem.problem, config, upstreams, store,
                                  scope="" if paired else f"{spec.label}/w{spec.width}")
    except Exception as err:  # noqa: BLE001 - one failed search is reported, the evaluation goes on
        result.error = f"{type(err).__name__}: {err}"
        return result
    trajectories = done.result.trajectories
    choice = await asyncio.to_thread(select_answer, trajectories, config.voting, config.aggregation)
    await asyncio.to_thread(grade, result, choice.answer, choice.answers, done.result.stats)
    result.solver_time_limits = done.result.stats.solver_time_limits
    result.wall_seconds = done.wall_seconds
    result.frontier, result.kept = done.frontier, done.kept
    result.samples_requested = done.counts.samples_requested
    result.samples_drawn = done.counts.samples_drawn
    result.tree = tree_digest(trajectories)
    result.literal_n = sum(1 for a in choice.answers if a.strip().upper() == "N")
    result.resolved_config = dataclasses.asdict(done.result.config or config)
    return result
