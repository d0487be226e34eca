"""The search runner every transport shares: one admitted, bounded, measured search per call.

Owns the path of one search from a transport-neutral ``SearchCall`` to a ``ServedSearch``:
request checks (``ets.service.request``), admission (``RESOURCE_EXHAUSTED`` beyond the limits),
the deadline (a timeout over queueing and running), the search itself (root, generator and scorer
from ``Upstreams``, the pure ``ets.search.loop``), answer choice off the event loop with the
service's grouping function, the search metrics, and classifying every failure once through
``ets.service.status.status_for`` (raised as ``SearchFailed``). Cancellation (a client that went
away) propagates and is counted. The runner knows no transport: the gRPC servicer and any other
front door only translate requests in and statuses out.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from ets.config import SearchConfig
from ets.search.answers import Grouping, group_answers, select_answer
from ets.search.interfaces import Root, StepGenerator, StepScorer
from ets.search.loop import DepthReport, SearchResult, run_search
from ets.service.admission import Admission
from ets.service.metrics import SearchMetrics
from ets.service.request import resolve_config, validate_problem, with_new_token_budget
from ets.service.status import Failure, Status, UpstreamUnavailable, status_for

log = logging.getLogger("ets.service")

# A client gives up at its own deadline and cancels, which can reach us a little before our copy
# of the deadline passes: a cancel within this much of the deadline counts as expiry.
DEADLINE_SLACK_S = 1.0


class Upstreams(Protocol):
    """What a search needs from the outside world (live: ``ets.service.upstreams``;
    in-process fakes: ``ets.testing.upstreams``)."""

    policy_address: str
    reward_address: str

    async def root(self, question: str, config: SearchConfig, system_prompt: str | None = None) -> Root: ...
    async def model_name(self) -> str: ...
    def generator(self, config: SearchConfig) -> StepGenerator: ...
    def scorer(self, config: SearchConfig, expect_prm_type: str = "") -> StepScorer: ...
    async def probe(self) -> dict[str, str | None]: ...
    async def close(self) -> None: ...


@dataclass
class SearchCall:
    """One search request as every transport hands it to the runner."""

    problem: str
    overrides: Mapping[str, Any]  # SearchConfig fields the request set (the rest: server defaults)
    request_id: str = ""
    # The request's explicit prm_type, checked by the reward server against the PRM it serves.
    expect_prm_type: str = ""
    timeout_s: float | None = None  # seconds left until the client's deadline (None: none)
    on_depth: Callable[[DepthReport], None] | None = None
    # Called once the search holds a running slot (a stream can start: admission has said yes).
    on_start: Callable[[], None] | None = None
    # The transport that took the request: the bounded ``api`` metric label (ets.service.metrics.APIS).
    api: str = "grpc"
    # A system message for the policy's chat template (chat-style policy model types only).
    system_prompt: str | None = None
    # Tokens each trajectory may generate beyond the root prompt (OpenAI's max_tokens); when set,
    # it replaces config.max_tokens (which counts the root prompt too) once the root is tokenized.
    max_new_tokens: int | None = None


class SearchFailed(Exception):
    """A search that ended with a status other than OK; ``failure`` is what clients are told."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


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


class SearchRunner:
    """Runs searches over shared ``Upstreams`` under one admission control and one metrics set.

    ``grouping``: the answer-equivalence function (the server passes a bounded worker process,
    ``ets.service.grouping``); ``on_upstream_failure``: called when a search found an upstream
    down (the readiness monitor re-probes)."""

    def __init__(self, upstreams: Upstreams, defaults: SearchConfig, admission: Admission, metrics: SearchMetrics,
                 *, grouping: Grouping = group_answers,
                 on_upstream_failure: Callable[[], None] | None = None) -> None:
        self.upstreams = upstreams
        self.defaults = defaults
        self.admission = admission
        self.metrics = metrics
        self.grouping = grouping
        self.on_upstream_failure = on_upstream_failure
        # Tasks of searches in progress; shutdown and tests look here.
        self.active: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        await self.upstreams.close()

    async def search(self, call: SearchCall) -> ServedSearch:
        """One search: checked, admitted, run under the deadline, measured. Raises
        ``SearchFailed`` (with its status) or ``CancelledError``."""
        method = str(call.overrides.get("method") or self.defaults.method).strip()[:32]
        started = time.perf_counter()
        deadline = None if call.timeout_s is None else asyncio.get_running_loop().time() + call.timeout_s
        task = asyncio.current_task()
        if task is not None:
            self.active.add(task)
        try:
            try:
                problem = validate_problem(call.problem)
                config = resolve_config(call.overrides, self.defaults)
                method = config.method
                async with asyncio.timeout_at(deadline):
                    served = await self._admitted(problem, config, call)
            except TimeoutError:
                raise TimeoutError(f"search did not finish before the deadline "
                                   f"({time.perf_counter() - started:.1f}s)") from None
        except asyncio.CancelledError:
            expired = deadline is not None and deadline - asyncio.get_running_loop().time() <= DEADLINE_SLACK_S
            self.metrics.observe_failure(method, "deadline_exceeded" if expired else "cancelled", call.api)
            log.info("search %s %s", call.request_id or "-", "deadline passed" if expired else "cancelled")
            raise
        except Exception as err:  # every failure gets exactly one status
            failure = status_for(err)
            if failure.status is Status.INTERNAL:
                log.exception("search %s failed", call.request_id or "-")
            else:
                log.info("search %s failed: %s: %s", call.request_id or "-", failure.status.name, failure.message)
            if isinstance(err, UpstreamUnavailable) and self.on_upstream_failure is not None:
                self.on_upstream_failure()
            self.metrics.observe_failure(method, failure.status.outcome, call.api)
            raise SearchFailed(failure) from err
        finally:
            if task is not None:
                self.active.discard(task)
        self.metrics.observe_result(method, served.result.stats, call.api)
        log.info("search %s ok: method=%s width=%d answer=%r wall=%.2fs", call.request_id or "-", method,
                 config.width, served.answer, served.wall_seconds)
        return served

    async def _admitted(self, problem: str, config: SearchConfig, call: SearchCall) -> ServedSearch:
        async with self.admission.slot() as waited:
            self.metrics.queue_wait.observe(waited)
            if call.on_start is not None:
                call.on_start()

            def report(progress: DepthReport) -> None:
                self.metrics.observe_selection(config.method, progress.kv_tokens)
                if call.on_depth is not None:
                    call.on_depth(progress)

            served = await self.run(problem, config, on_depth=report, expect_prm_type=call.expect_prm_type,
                                    system_prompt=call.system_prompt, max_new_tokens=call.max_new_tokens)
            self.metrics.search_duration.labels(method=config.method, api=call.api).observe(served.wall_seconds)
            return served

    async def run(self, problem: str, config: SearchConfig, on_depth: Callable[[DepthReport], None] | None = None,
                  *, expect_prm_type: str = "", system_prompt: str | None = None,
                  max_new_tokens: int | None = None) -> ServedSearch:
        """The search itself (no admission, deadline or metrics): root, loop, answer choice."""
        start = time.perf_counter()
        root = await self.upstreams.root(problem, config, system_prompt)
        if max_new_tokens is not None:
            # Only now is the root's length known: the budget becomes config.max_tokens.
            config = with_new_token_budget(config, len(root.prompt_ids), max_new_tokens)
        result = await run_search(root, config, self.upstreams.generator(config),
                                  self.upstreams.scorer(config, expect_prm_type), on_depth=on_depth)
        # Equivalence checks may run sympy: keep them off the event loop other searches share.
        served = await asyncio.to_thread(choose_answer, config, result, self.grouping)
        served.wall_seconds = time.perf_counter() - start
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
                        candidates=candidates, best_index=choice.best_index, wall_seconds=0.0)
