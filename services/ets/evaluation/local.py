"""The search pipeline run in-process against the live policy and reward servers, through a sample store.

Owns ``LocalUpstreams`` (one policy HTTP client and one reward gRPC client shared by every search
of an evaluation, the identities that key the store, roots cached per question, the bounded
answer-equivalence worker), ``StoreSources`` (one search's ``ets.search.pipeline.SearchSources``:
``StoreGenerator`` / ``StoreScorer`` in front of those clients) and ``run_local`` (one
configuration on one problem: the service's own pipeline, ``ets.search.pipeline.run_pipeline``,
over the store, checked at the same edge (``ets.config.validate``: the method registry, the policy
model type and the PRM type) and voting with the same bounded grouping
(``ets.service.grouping.EquivalenceWorker``), then scored against the reference). This is how
``ets eval --store`` pairs configurations without giving the search service any per-request
state: the service keeps serving one search at a time from its clients; the evaluation owns the
store.

In paired mode every configuration of a problem draws from the same sample streams; in unpaired
mode (the control) the store key also names the configuration, so each draws its own samples
(still persisted and resumable).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from ets.config import validate
from ets.evaluation.report import ProblemResult, grade
from ets.evaluation.spec import Problem, RunSpec
from ets.evaluation.store import Counts, SampleStore, StoreGenerator, StoreScorer, tree_digest
from ets.policy.client import PolicyClient
from ets.policy.generator import SGLangStepGenerator, tokenize_root
from ets.policy.model_types import policy_model_type
from ets.policy.routed import make_policy_client
from ets.reward.client import RewardClient
from ets.search.config import SearchConfig, ValidConfig
from ets.search.interfaces import Root
from ets.search.loop import DepthReport
from ets.search.pipeline import ServedSearch, run_pipeline
from ets.service.grouping import EquivalenceWorker


@dataclass
class LocalUpstreams:
    """The live servers an in-process evaluation searches against (clients made on first use)."""

    policy_url: str
    reward_addr: str
    _policy: PolicyClient | None = None
    _reward: RewardClient | None = None
    _roots: dict[tuple[str, str], Root] = field(default_factory=dict)
    _identity: dict[str, str] = field(default_factory=dict)
    _equivalence: EquivalenceWorker | None = None

    def grouping(self) -> EquivalenceWorker:
        """The bounded answer-equivalence worker the votes use (the service's own kind)."""
        if self._equivalence is None:
            self._equivalence = EquivalenceWorker()
        return self._equivalence

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
        if self._equivalence is not None:
            self._equivalence.close()


_T = TypeVar("_T")


async def _offload(work: Callable[[], _T]) -> _T:
    # Selections (clustering + HiGHS) off the event loop: concurrent searches keep drawing.
    return await asyncio.to_thread(work)


@dataclass
class StoreSources:
    """One search's sources over the store (``SearchSources``): the root from ``LocalUpstreams``, a
    ``StoreGenerator`` / ``StoreScorer`` in front of its clients (kept for their counts)."""

    upstreams: LocalUpstreams
    store: SampleStore
    identities: dict[str, str]
    scope: str = ""  # set in unpaired mode: this configuration's samples are its own
    generator_: StoreGenerator | None = None
    scorer_: StoreScorer | None = None

    async def root(self, question: str, config: SearchConfig, system_prompt: str | None = None) -> Root:
        return await self.upstreams.root(question, config)

    def generator(self, config: SearchConfig) -> StoreGenerator:
        identity = self.identities["policy"] + (f"|unpaired={self.scope}" if self.scope else "")
        self.generator_ = StoreGenerator(
            self.store, SGLangStepGenerator(self.upstreams.policy(), config.policy_model_type), identity)
        return self.generator_

    def scorer(self, config: SearchConfig, expect_prm_type: str = "") -> StoreScorer:
        self.scorer_ = StoreScorer(self.store, self.upstreams.reward(), self.identities["prm"],
                                   self.identities["embedder"])
        return self.scorer_

    def counts(self) -> Counts:
        counts = Counts()
        for part in (self.generator_, self.scorer_):
            if part is not None:
                counts.add(part.counts)
        return counts


@dataclass
class LocalSearch:
    """One in-process search: what it served (every trajectory, the vote), what it asked of the
    store, and timing."""

    served: ServedSearch
    counts: Counts
    frontier: int
    kept: int
    wall_seconds: float


async def search_local(question: str, config: ValidConfig, upstreams: LocalUpstreams, store: SampleStore,
                       *, scope: str = "") -> LocalSearch:
    """One search of ``question`` under ``config`` over ``store``: the service's pipeline
    (``scope``: set in unpaired mode, so that this configuration's samples are its own)."""
    started = time.perf_counter()
    sources = StoreSources(upstreams, store, await upstreams.identities(config), scope)
    frontier = kept = 0

    def on_depth(report: DepthReport) -> None:
        nonlocal frontier, kept
        frontier += report.frontier_size
        kept += report.kept_candidates

    served = await run_pipeline(question, config, sources, grouping=upstreams.grouping().group, offload=_offload,
                                on_depth=on_depth)
    return LocalSearch(served, sources.counts(), frontier, kept, time.perf_counter() - started)


async def run_local(problem: Problem, spec: RunSpec, base: SearchConfig, seed: int, upstreams: LocalUpstreams,
                    store: SampleStore, *, paired: bool = True) -> ProblemResult:
    """One configuration on one problem, as a ``ProblemResult`` with the store's requested/drawn
    counts and the tree's digest."""
    result = ProblemResult(id=problem.id, label=spec.label, method=spec.method, width=spec.width,
                           reference=problem.answer, seed=seed, overrides=dict(spec.overrides))
    try:
        config = validate(base.replace(method=spec.method, width=spec.width, seed=seed, **dict(spec.overrides)))
        done = await search_local(problem.problem, config, upstreams, store,
                                  scope="" if paired else f"{spec.label}/w{spec.width}")
    except Exception as err:  # noqa: BLE001 - one failed search is reported, the evaluation goes on
        result.error = f"{type(err).__name__}: {err}"
        return result
    served = done.served
    trajectories = served.result.trajectories
    answers = [c.answer for c in served.candidates]
    # Strict and flexible extraction (numeric problems) read the candidates' texts with their scores.
    await asyncio.to_thread(grade, result, served.answer, answers, served.result.stats,
                            [(c.text, c.aggregate_score) for c in served.candidates], config.voting)
    result.solver_time_limits = served.result.stats.solver_time_limits
    result.wall_seconds = done.wall_seconds
    result.frontier, result.kept = done.frontier, done.kept
    result.samples_requested = done.counts.samples_requested
    result.samples_drawn = done.counts.samples_drawn
    result.tree = tree_digest(trajectories)
    result.literal_n = sum(1 for a in answers if a.strip().upper() == "N")
    result.resolved_config = dataclasses.asdict(served.result.config or config)
    return result
