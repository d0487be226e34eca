"""The sample store of ``ets eval --store`` on the real CPU stack (issue 15 deliverables a-c): the
session's SGLang policy (the tiny model) and reward server from the shared stack fixture, the
search core in-process (``ets.evaluation.evaluate_local``), every sample drawn by the engine.

(a) two methods of one paired evaluation see identical root children;
(b) a rerun from the saved store reproduces every tree and statistic exactly (timings aside);
(c) a cut-off run resumes without drawing any sample already in the store (draws counted at the
    store and at the policy client).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import pytest

from ets.search.config import SearchConfig
from ets.evaluation.evaluate import evaluate_local
from ets.evaluation.spec import Problem, RunSpec
from ets.evaluation.local import LocalUpstreams
from ets.evaluation.report import STAT_FIELDS, ProblemResult
from ets.evaluation.store import SampleStore
from ets.policy.client import PolicyClient
from ets.search.interfaces import ExpandRequest, SampledStep, StepParams
from ets.testing.stack import Stack

pytestmark = [pytest.mark.sglang, pytest.mark.stack, pytest.mark.timeout(1200)]

PROBLEMS = [Problem("p0", "What is 12 plus 7?", "19")]
# Small real trees: width 4, depth 3, short steps (the tiny model's steps rarely end on their own).
BASE = SearchConfig(width=4, max_step_tokens=8, max_tokens=48, max_depth=3, temperature=1.0)
RUNS = [RunSpec("ets", 4), RunSpec("rebase", 4)]
# Timings differ run to run; every other statistic must be equal.
TIMINGS = {"selection_seconds", "policy_seconds", "reward_seconds"}


class RecordingStore(SampleStore):
    """The store, recording every ``take``: the requests asked and the samples handed out."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.takes: list[tuple[list[ExpandRequest], list[list[SampledStep]]]] = []

    async def take(self, wants: Sequence[tuple[str, int, int, ExpandRequest]], params: StepParams,
                   inner: Any, counts: Any = None) -> list[list[SampledStep]]:
        out = await super().take(wants, params, inner, counts)
        self.takes.append(([w[3] for w in wants], out))
        return out


class CutOff(Exception):
    """Stands for the process being killed mid-search."""


class CuttingStore(SampleStore):
    """The store of a run that dies after ``after`` takes (the samples drawn so far are on disk)."""

    def __init__(self, *a: Any, after: int, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.left = after

    async def take(self, wants: Sequence[tuple[str, int, int, ExpandRequest]], params: StepParams,
                   inner: Any, counts: Any = None) -> list[list[SampledStep]]:
        if self.left <= 0:
            raise CutOff("killed")
        self.left -= 1
        return await super().take(wants, params, inner, counts)


class CountingPolicy(PolicyClient):
    """The real policy client, counting the samples it asks the engine for (prefill-only
    requests, ``max_new_tokens`` 0, draw nothing and are not counted)."""

    sampled = 0

    async def generate(self, prompts: Sequence[Sequence[int]], params: Any, **kw: Any) -> Any:
        plist = [params] * len(prompts) if not isinstance(params, (list, tuple)) else params
        self.sampled += sum(1 for p in plist if p.max_new_tokens > 0)
        return await super().generate(prompts, params, **kw)


def _upstreams(stack: Stack) -> LocalUpstreams:
    up = LocalUpstreams(stack.policy_url, stack.reward_addr)
    up._policy = CountingPolicy(stack.policy_url, timeout_s=300)
    return up


async def _evaluate(stack: Stack, store: SampleStore, runs: Sequence[RunSpec] = RUNS,
                    up: LocalUpstreams | None = None) -> list[ProblemResult]:
    up = up or _upstreams(stack)
    try:
        return await evaluate_local(up, store, PROBLEMS, runs, BASE, seed=3, concurrency=1, progress=False)
    finally:
        await up.close()


def _by_label(results: Sequence[ProblemResult]) -> dict[str, ProblemResult]:
    assert not [r.error for r in results if r.error]
    return {r.label: r for r in results}


async def test_two_methods_of_one_paired_evaluation_see_identical_root_children(search_stack: Stack,
                                                                         tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "store.jsonl")
    results = _by_label(await _evaluate(search_stack, store))
    store.close()
    # concurrency 1: ets's takes, then rebase's; each search's first take is its root fan-out.
    root_len = min(len(r.prefix_ids) for reqs, _ in store.takes for r in reqs)
    roots = [(reqs, out) for reqs, out in store.takes if any(len(r.prefix_ids) == root_len for r in reqs)]
    assert len(roots) == 2 and all(len(reqs) == 1 and reqs[0].n == BASE.width for reqs, _ in roots)
    (ets_req, ets_out), (rebase_req, rebase_out) = roots
    assert list(ets_req[0].prefix_ids) == list(rebase_req[0].prefix_ids)
    ets_children = [(s.token_ids, s.text, s.finish) for s in ets_out[0]]
    assert ets_children == [(s.token_ids, s.text, s.finish) for s in rebase_out[0]]
    assert len(ets_children) == BASE.width and len(set(ets_children)) > 1  # real, distinct samples
    # The second method drew fewer samples than it used: at least the root's came from the store.
    assert results["ets"].samples_drawn == results["ets"].samples_requested
    assert results["rebase"].samples_drawn <= results["rebase"].samples_requested - BASE.width


async def test_rerun_from_the_saved_store_reproduces_every_tree_and_statistic(search_stack: Stack,
                                                                        tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    with SampleStore(path) as store:
        first = _by_label(await _evaluate(search_stack, store))
    up = _upstreams(search_stack)
    with SampleStore(path) as store:
        again = _by_label(await _evaluate(search_stack, store, up=up))
        assert store.counts.samples_drawn == 0 and store.counts.scores_computed == 0
    assert isinstance(up._policy, CountingPolicy) and up._policy.sampled == 0  # the engine drew nothing
    for label, a in first.items():
        b = again[label]
        assert a.tree and a.tree == b.tree, label
        assert a.samples_requested == b.samples_requested and b.samples_drawn == 0
        for name in sorted(set(STAT_FIELDS) - TIMINGS):
            assert getattr(a, name) == getattr(b, name), (label, name)
        same = {f.name for f in dataclasses.fields(ProblemResult)} - TIMINGS - {"wall_seconds", "samples_drawn"}
        assert {n: getattr(a, n) for n in same} == {n: getattr(b, n) for n in same}, label


async def test_a_cut_off_run_resumes_without_drawing_samples_already_in_the_store(search_stack: Stack,
                                                                           tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    runs = [RunSpec("rebase", 4)]
    cut = CuttingStore(path, after=2)  # the root fan-out and the first depth, then killed
    [dead] = await _evaluate(search_stack, cut, runs)
    cut.close()
    assert "CutOff" in dead.error
    with path.open("ab") as f:  # and the kill landed in the middle of writing a line
        f.write(b'{"kind": "sample", "key": "ab')
    up = _upstreams(search_stack)
    with SampleStore(path) as store:
        kept = dict(store.samples)
        assert len(kept) >= BASE.width
        [done] = _by_label(await _evaluate(search_stack, store, runs, up=up)).values()
        c = store.counts
        # Every stored sample was used once again, none was drawn again: the draws are exactly
        # the samples the store did not have, and the engine was asked for exactly those.
        assert c.samples_drawn == c.samples_requested - len(kept) > 0
        assert isinstance(up._policy, CountingPolicy) and up._policy.sampled == c.samples_drawn
        assert done.samples_drawn == c.samples_drawn
        assert all(store.samples[k] == v for k, v in kept.items())
        assert store.sample_count == len(kept) + c.samples_drawn
