"""The search runner every transport shares: one admitted, bounded, measured search per call.

Owns the path of one search from a transport-neutral ``SearchCall`` to a ``ServedSearch``:
request checks and the operator's caps (``ets.service.request``: the request is checked once,
here, and carried on as a ``ValidConfig``), failing fast while an upstream is known down (opt-in),
admission weighted by width (``RESOURCE_EXHAUSTED`` beyond the limits), the deadline (the
client's, capped by the server's; over queueing and running), the search itself (root, generator
and scorer from ``Upstreams``, the pure ``ets.search.loop`` with its selections in a thread pool
and its generated-token budget), answer choice off the event loop with the service's grouping
function (all of which is the one pipeline, ``ets.search.pipeline.run_pipeline``, that the
evaluation runs too), the search metrics, and classifying every failure once through
``ets.service.status.status_for`` (raised as ``SearchFailed``). Cancellation (a client that went
away) propagates and is counted.

Two ways in, and the transports only translate: ``search(call)`` awaits the result (unary calls);
``stream(call)`` is the one streaming primitive, an async iterator of ``Started`` (admitted),
one ``DepthReport`` per depth, then the ``ServedSearch``, whose early exit cancels the search
(``SearchEvents``). Everything a request implies is derived here once (the expected PRM type
from the request's ``prm_type``). The runner knows no transport.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, TypeVar

from ets.admission import Admission
from ets.retry import retry_window
from ets.search.answers import Grouping, group_answers
from ets.search.config import SearchConfig, ValidConfig
from ets.search.interfaces import Root
from ets.search.loop import DepthReport
from ets.search.pipeline import SearchSources, ServedSearch, run_pipeline
from ets.search.selection import METHODS
from ets.service.metrics import SearchMetrics
from ets.service.request import Limits, resolve_config, validate_problem, validate_request_id, with_new_token_budget
from ets.service.status import Failure, Status, UpstreamUnavailable, status_for

log = logging.getLogger("ets.service")

# A client gives up at its own deadline and cancels, which can reach us a little before our copy
# of the deadline passes: a cancel within this much of the deadline counts as expiry.
DEADLINE_SLACK_S = 1.0

_T = TypeVar("_T")


class Upstreams(SearchSources, Protocol):
    """What the service needs from the outside world: a search's sources
    (``ets.search.pipeline.SearchSources``: root, generator, scorer) plus the upstreams' addresses,
    the policy's model names, their health and closing (live: ``ets.service.upstreams``; the tests'
    in-process ones are scripted)."""

    policy_address: str
    reward_address: str

    async def model_names(self) -> tuple[str, ...]: ...
    async def probe(self) -> dict[str, str | None]: ...
    async def close(self) -> None: ...


@dataclass
class SearchCall:
    """One search request as every transport hands it to the runner."""

    problem: str
    overrides: Mapping[str, Any]  # SearchConfig fields the request set (the rest: server defaults)
    request_id: str = ""
    timeout_s: float | None = None  # seconds left until the client's deadline (None: none)
    # The transport that took the request: the bounded ``api`` metric label (ets.service.metrics.APIS).
    api: str = "grpc"
    # A system message for the policy's chat template (chat-style policy model types only).
    system_prompt: str | None = None
    # Tokens each trajectory may generate beyond the root prompt (OpenAI's max_tokens); when set,
    # it replaces config.max_tokens (which counts the root prompt too) once the root is tokenized.
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Started:
    """A stream's first event: the search holds a running slot (admission said yes), so a
    transport may start its response; failures before it (400, 429) keep their own status."""


class SearchFailed(Exception):
    """A search that ended with a status other than OK; ``failure`` is what clients are told."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class SearchRunner:
    """Runs searches over shared ``Upstreams`` under one admission control and one metrics set.

    ``grouping``: the answer-equivalence function (the server passes a bounded worker process,
    ``ets.service.grouping``); ``on_upstream_failure``: called when a search found an upstream
    down (the readiness monitor re-probes); ``upstreams_down`` (fail-fast, off by default): the
    upstreams the readiness monitor knows are down (upstream -> why; down means no replica
    answers), so new searches are refused at once instead of waiting for one within their
    deadline; ``limits``: the operator's caps; ``selection_workers``: threads that run selections
    off the event loop (0: one per core)."""

    def __init__(self, upstreams: Upstreams, defaults: SearchConfig, admission: Admission, metrics: SearchMetrics,
                 *, limits: Limits, grouping: Grouping = group_answers,
                 on_upstream_failure: Callable[[], None] | None = None,
                 upstreams_down: Callable[[], Mapping[str, str]] | None = None,
                 selection_workers: int = 0) -> None:
        self.upstreams = upstreams
        self.defaults = defaults
        self.admission = admission
        self.metrics = metrics
        self.grouping = grouping
        self.on_upstream_failure = on_upstream_failure
        self.upstreams_down = upstreams_down
        self.limits = limits
        # Selection (clustering + HiGHS, up to the solver limit) is CPU work: on the event loop it
        # would stall every other search, stream and health answer of the process.
        self._selection_pool = ThreadPoolExecutor(max_workers=selection_workers or os.cpu_count() or 1,
                                                  thread_name_prefix="ets-select")
        # Tasks of searches in progress; shutdown and tests look here.
        self.active: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        await self.upstreams.close()
        self._selection_pool.shutdown(wait=False, cancel_futures=True)

    async def _offload(self, work: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._selection_pool, work)

    def _fail_fast(self) -> None:
        """UNAVAILABLE at once while the readiness monitor knows an upstream is down."""
        down = self.upstreams_down() if self.upstreams_down is not None else {}
        for upstream, why in down.items():
            address = self.upstreams.policy_address if upstream == "policy" else self.upstreams.reward_address
            raise UpstreamUnavailable(upstream, address, f"down at its last health probe ({why})")

    def stream(self, call: SearchCall) -> "SearchEvents":
        """One search as events: ``Started``, a ``DepthReport`` per depth, then the ``ServedSearch``
        (or ``SearchFailed`` raised); leaving the iteration early cancels the search. The one way a
        streaming transport runs a search (``SearchEvents``)."""
        return SearchEvents(self, call)

    async def search(self, call: SearchCall, *, on_depth: Callable[[DepthReport], None] | None = None,
                     on_start: Callable[[], None] | None = None) -> ServedSearch:
        """One search: checked, admitted, run under the deadline, measured. Raises
        ``SearchFailed`` (with its status) or ``CancelledError``. ``on_start``: called once the
        search holds a running slot; ``on_depth``: after each depth (``stream`` passes both)."""
        # Metric label: a registered method or "invalid", never the client's text (bounded series).
        asked = str(call.overrides.get("method") or self.defaults.method).strip()
        method = asked if asked in METHODS else "invalid"
        started = time.perf_counter()
        # The client's deadline, but never longer than the operator's limit on a search.
        capped = call.timeout_s is None or call.timeout_s > self.limits.search_s
        timeout_s = self.limits.search_s if capped else float(call.timeout_s or 0.0)
        deadline = asyncio.get_running_loop().time() + timeout_s
        task = asyncio.current_task()
        if task is not None:
            self.active.add(task)
        try:
            try:
                validate_request_id(call.request_id)
                problem = validate_problem(call.problem)
                config = resolve_config(call.overrides, self.defaults, self.limits)
                method = config.method
                self._fail_fast()
                # Upstream calls retry a lost replica or a restarting server until the deadline
                # would pass (or the operator's ETS_UPSTREAM_RETRY_S), not a fixed count (ets.retry).
                with retry_window(time.monotonic() + timeout_s, self.limits.retry_s):
                    async with asyncio.timeout_at(deadline):
                        served = await self._admitted(problem, config, call, on_depth, on_start)
            except TimeoutError:
                limit = (f", the server's limit {self.limits.setting('search_s')}={self.limits.search_s:g}s"
                         if capped else "")
                raise TimeoutError(f"search did not finish before the deadline "
                                   f"({time.perf_counter() - started:.1f}s{limit})") from None
        except asyncio.CancelledError:
            expired = deadline - asyncio.get_running_loop().time() <= DEADLINE_SLACK_S
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
        if served.grouping_fallback:
            self.metrics.grouping_fallbacks.inc()
        if served.result.stats.stopped_early:
            self.metrics.observe_early_stop(method, served.result.stats.width_left)
        if served.result.stats.token_budget_hit:
            self.metrics.token_budget_hits.inc()
            log.warning("search %s stopped at the generated-token budget (%d tokens, %s)", call.request_id or "-",
                        served.result.stats.generated_tokens, self.limits.setting("generated_tokens"))
        log.info("search %s ok: method=%s width=%d answer=%r wall=%.2fs", call.request_id or "-", method,
                 config.width, served.answer, served.wall_seconds)
        return served

    async def _admitted(self, problem: str, config: ValidConfig, call: SearchCall,
                        on_depth: Callable[[DepthReport], None] | None,
                        on_start: Callable[[], None] | None) -> ServedSearch:
        async with self.admission.slot(config.width) as waited:
            self.metrics.queue_wait.observe(waited)
            if waited > 0.01:
                self._fail_fast()  # an upstream may have gone down while this search waited
            if on_start is not None:
                on_start()

            def report(progress: DepthReport) -> None:
                self.metrics.observe_selection(config.method, progress.kv_tokens)
                if on_depth is not None:
                    on_depth(progress)

            # The request's explicit prm_type, checked by the reward server against the PRM it serves.
            expect_prm_type = str(call.overrides.get("prm_type") or "").strip()
            served = await self.run(problem, config, on_depth=report, expect_prm_type=expect_prm_type,
                                    system_prompt=call.system_prompt, max_new_tokens=call.max_new_tokens)
            self.metrics.search_duration.labels(method=config.method, api=call.api).observe(served.wall_seconds)
            return served

    async def run(self, problem: str, config: ValidConfig, on_depth: Callable[[DepthReport], None] | None = None,
                  *, expect_prm_type: str = "", system_prompt: str | None = None,
                  max_new_tokens: int | None = None) -> ServedSearch:
        """The search itself (no admission, deadline or metrics): the one pipeline
        (``ets.search.pipeline.run_pipeline``) over the live upstreams."""
        limits = self.limits

        def budget(config: ValidConfig, root: Root) -> ValidConfig:
            # Only once the root is tokenized is its length known: the budget becomes config.max_tokens.
            return with_new_token_budget(config, len(root.prompt_ids), max_new_tokens, limits) \
                if max_new_tokens is not None else config

        return await run_pipeline(problem, config, self.upstreams, grouping=self.grouping, offload=self._offload,
                                  on_depth=on_depth, max_generated_tokens=self.limits.generated_tokens,
                                  expect_prm_type=expect_prm_type, system_prompt=system_prompt, after_root=budget)


SearchEvent = Started | DepthReport | ServedSearch


class SearchEvents:
    """One search running in its own task, as an async iterator of ``SearchEvent``: ``Started``, a
    ``DepthReport`` per depth, then the ``ServedSearch``; a failed search raises ``SearchFailed``
    from the iteration, and one cancelled by ``cancel()`` ends it without a result. Leaving it
    early cancels the search: ``aclose()`` (or ``async with``) cancels and waits for it to unwind;
    ``cancel()`` does not wait (for code that may run under a cancelled scope)."""

    def __init__(self, runner: SearchRunner, call: SearchCall) -> None:
        # None: the search task finished (result, failure or cancel).
        self._queue: asyncio.Queue[Started | DepthReport | None] = asyncio.Queue()
        self.task: asyncio.Task[ServedSearch] = asyncio.ensure_future(
            runner.search(call, on_depth=self._queue.put_nowait, on_start=lambda: self._queue.put_nowait(Started())))
        self.task.add_done_callback(lambda _: self._queue.put_nowait(None))
        self._ended = False

    def __aiter__(self) -> "SearchEvents":
        return self

    async def __anext__(self) -> SearchEvent:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is not None:
            return item
        self._ended = True
        if self.task.cancelled():
            raise StopAsyncIteration
        return self.task.result()  # or raises SearchFailed

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()

    async def aclose(self) -> None:
        self.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def __aenter__(self) -> "SearchEvents":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
