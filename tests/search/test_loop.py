"""The search loop against a deterministic in-process step source (scripted trees, hand counts).

``ScriptedPolicy`` / ``TableScorer`` (``ets.testing.upstreams``): a tiny scripted policy that reads
a node's path back from its ``prefix_ids``, and a scorer that scores a step by its text.
"""
from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any, Sequence

import numpy as np
import pytest

from ets.search.config import ConfigError, SearchConfig
from ets.search.interfaces import ExpandRequest, SampledStep, ScoredTrajectory, StepParams
from ets.search.loop import DepthReport, Root, derive_seed, run_search
from ets.testing.upstreams import PROMPT, STEP_BASE, ScriptedPolicy, TableScorer


def cfg(**kw: Any) -> SearchConfig:
    base: dict[str, Any] = dict(method="rebase", width=4, max_step_tokens=5, max_tokens=1000, seed=7)
    base.update(kw)
    return SearchConfig(**base)


async def test_rebase_tree_counted_by_hand() -> None:
    """Width 4, 10-token prompt, 5-token steps.
    d0: KV 10; root -> [ans1 (answer), A1 .9, A2 .1, A3 .1]; remaining 4 - 1 = 3.
    d1: KV 10 + 3*5 = 25; REBASE over (.9, .1, .1), W 3: ceil(3 / (1 + 2e^-4)) = 3 -> A1 gets 3:
        [B1 (eos), B2 .6, B3 .6]; remaining 2.
    d2: KV 10 + 5 + 2*5 = 25; ties: [1, 1]: B2 -> ans2 (answer), B3 -> C; remaining 1.
    d3: KV 10 + 5 + 5 + 5 = 25; C -> ans3 (answer); remaining 0: stop.
    Totals: 4 selections, KV 10 + 25 + 25 + 25 = 85, peak 25, 4 + 3 + 2 + 1 = 10 samples, 50 tokens."""
    script = {
        (): [("The answer is 1 ки", 5, "step"), ("A1 ки", 5, "step"), ("A2 ки", 5, "step"), ("A3 ки", 5, "step")],
        ("A1 ки",): [("B1", 5, "eos"), ("B2 ки", 5, "step"), ("B3 ки", 5, "step")],
        ("A1 ки", "B2 ки"): [("The answer is 2 ки", 5, "step")],
        ("A1 ки", "B3 ки"): [("C ки", 5, "step")],
        ("A1 ки", "B3 ки", "C ки"): [("The answer is 2 ки", 5, "step")],
    }
    scores = {"A1": 0.9, "A2": 0.1, "A3": 0.1, "B1": 0.5, "B2": 0.6, "B3": 0.6, "C": 0.7,
              "The answer is 1": 0.8, "The answer is 2": 0.95}
    policy, scorer = ScriptedPolicy(script), TableScorer(scores)
    reports: list[DepthReport] = []
    result = await run_search(Root("q", PROMPT), cfg(), policy, scorer, on_depth=reports.append)
    s = result.stats
    assert (s.selections, s.total_kv_tokens, s.peak_kv_tokens) == (4, 85, 25)
    assert (s.model_calls, s.generated_tokens, s.depth_reached) == (10, 50, 4)
    assert [r.kv_tokens for r in reports] == [10, 25, 25, 25]
    assert [r.remaining_width for r in reports] == [4, 3, 2, 1]
    assert [r.frontier_size for r in reports] == [1, 3, 2, 1]
    assert [r.kept_candidates for r in reports] == [1, 1, 2, 1]
    assert [r.finished for r in reports] == [0, 1, 2, 3]
    assert [(t.finish_reason, t.depth, t.tokens) for t in result.trajectories] == [
        ("answer", 1, 15), ("eos", 2, 20), ("answer", 3, 25), ("answer", 4, 30)]
    assert result.trajectories[3].steps == ("A1 ки", "B3 ки", "C ки", "The answer is 2 ки")
    assert result.trajectories[3].step_scores == (0.9, 0.6, 0.7, 0.95)
    assert result.trajectories[3].plain_steps == ("A1", "B3", "C", "The answer is 2")
    # Exactly one expand call and one scoring call per depth, batched over the depth's nodes.
    assert [[r.n for r in reqs] for reqs, _ in policy.calls] == [[4], [3], [1, 1], [1]]
    assert [len(c) for c in scorer.score_calls] == [4, 3, 2, 1]
    assert scorer.score_calls[1][0].steps == ["A1", "B1"] and scorer.score_calls[1][0].question == "q"
    # Engine accounting summed over samples: prompt 10 at d0 (x4), 15 (x3), 20 (x2), 25 (x1).
    assert s.prompt_tokens == 4 * 10 + 3 * 15 + 2 * 20 + 25
    assert s.cached_prompt_tokens == s.prompt_tokens - 10
    assert scorer.embed_calls == []
    assert s.solver_fallbacks == 0 and s.selection_seconds >= 0 and s.policy_seconds > 0


async def test_prefix_ids_chain_parent_tokens() -> None:
    policy = ScriptedPolicy()
    await run_search(Root("q", PROMPT), cfg(width=2, max_depth=3), policy, TableScorer())
    reqs, params = policy.calls[2]
    # Depth-2 prefixes: the prompt, then each ancestor's full token ids, in order.
    for r in reqs:
        assert tuple(r.prefix_ids[:10]) == PROMPT and len(r.prefix_ids) == 20
        assert [policy.steps[t - STEP_BASE] for t in r.prefix_ids if t >= STEP_BASE][0].startswith("1.")
    assert params.max_new_tokens == 5 and params.temperature == 1.0


async def test_max_tokens_caps_the_last_step_and_ends_the_trajectory() -> None:
    """Prompt 10, max_tokens 22, 5-token steps: cumulative 15, 20, then only 2 new tokens are
    allowed (22 - 20), the step stops on length and the trajectory ends on max_tokens at 22."""
    policy = ScriptedPolicy()
    result = await run_search(Root("q", PROMPT), cfg(width=1, max_tokens=22), policy, TableScorer())
    assert [[r.max_new_tokens for r in reqs] for reqs, _ in policy.calls] == [[5], [5], [2]]
    (t,) = result.trajectories
    assert (t.finish_reason, t.tokens, t.depth) == ("max_tokens", 22, 3)
    assert result.stats.generated_tokens == 12 and result.stats.total_kv_tokens == 10 + 15 + 20


async def test_depth_cap_finishes_the_frontier() -> None:
    """Nothing terminal, max_depth 2, width 3: d0 KV 10 (root -> 3), d1 KV 10 + 15 = 25, REBASE over
    three ties gives 1 each (ceil(3/3)); after depth 2 the 3 open candidates end as max_depth."""
    result = await run_search(Root("q", PROMPT), cfg(width=3, max_depth=2), ScriptedPolicy(), TableScorer())
    s = result.stats
    assert (s.selections, s.depth_reached, s.total_kv_tokens, s.model_calls) == (2, 2, 35, 6)
    assert [(t.finish_reason, t.depth, t.tokens) for t in result.trajectories] == [("max_depth", 2, 20)] * 3


async def test_eos_and_answer_markers_end_trajectories() -> None:
    script = {(): [("so 2", 5, "eos"), ("The final answer is: 4 ки", 5, "step"),
                   ("Therefore, the final answer is $\\boxed{4}$.", 5, "step"), ("go on ки", 5, "step")]}
    result = await run_search(Root("q", PROMPT), cfg(width=4, max_depth=1), ScriptedPolicy(script), TableScorer())
    assert [t.finish_reason for t in result.trajectories] == ["eos", "answer", "answer", "max_depth"]


async def test_width_accounting_on_random_trees() -> None:
    """Random terminal steps: no depth spends more than remains, every finished trajectory spends
    one unit, and finished trajectories never exceed the width (all methods)."""
    for method in ("rebase", "ets", "beam", "dvts", "best_of_n"):
        for seed in range(4):
            rng = np.random.default_rng(seed)

            class RandomPolicy(ScriptedPolicy):
                draw = rng  # bound per iteration (a closure would see the loop's latest rng)

                async def expand(self, requests: Sequence[ExpandRequest],
                                 params: StepParams) -> list[list[SampledStep]]:
                    out = await super().expand(requests, params)
                    return [[SampledStep(s.token_ids, "The answer is 3 ки" if self.draw.random() < 0.2 else s.text,
                                         "eos" if self.draw.random() < 0.05 else s.finish) for s in row]
                            for row in out]

            scorer = TableScorer({f"{d}.{k}": float(rng.random()) for d in range(1, 30) for k in range(64)})
            reports: list[DepthReport] = []
            width = int(rng.choice([5, 9, 16]))
            result = await run_search(Root("q", PROMPT), cfg(method=method, width=width), RandomPolicy(),
                                      scorer, on_depth=reports.append)
            assert len([t for t in result.trajectories if t.finish_reason != "max_depth"]) <= width
            for before, after in itertools.pairwise(reports):
                spent = after.finished - before.finished
                assert after.remaining_width == before.remaining_width - spent
            assert result.stats.selections == len(reports)
            assert result.stats.total_kv_tokens == sum(r.kv_tokens for r in reports)
            assert result.stats.peak_kv_tokens == max(r.kv_tokens for r in reports)


async def test_every_depth_spends_at_most_the_remaining_width() -> None:
    for method in ("rebase", "ets", "beam", "dvts", "best_of_n"):
        policy = ScriptedPolicy({(): [("The answer is 1 ки", 5, "step")] + [(f"x{k} ки", 5, "step") for k in range(8)]})
        reports: list[DepthReport] = []
        await run_search(Root("q", PROMPT), cfg(method=method, width=9, max_depth=4), policy,
                         TableScorer({f"x{k}": 0.1 * k for k in range(8)}), on_depth=reports.append)
        for (reqs, _), rep in zip(policy.calls, reports, strict=False):
            assert sum(r.n for r in reqs) <= rep.remaining_width, method


async def test_beam_keeps_the_top_candidates() -> None:
    """Width 9, keep 3: root -> 9; one is an answer so 8 remain; the top 3 (x7, x6, x5) get
    ceil(8 / 3) = 3, 3 and the capped rest 2."""
    script = {(): [("The answer is 1 ки", 5, "step")] + [(f"x{k} ки", 5, "step") for k in range(8)]}
    policy = ScriptedPolicy(script)
    await run_search(Root("q", PROMPT), cfg(method="beam", width=9, max_depth=2), policy,
                     TableScorer({f"x{k}": 0.1 * k for k in range(8)}))
    reqs, _ = policy.calls[1]
    assert [(policy.path_of(r.prefix_ids)[-1], r.n) for r in reqs] == [("x5 ки", 2), ("x6 ки", 3), ("x7 ки", 3)]


async def test_dvts_subtrees_keep_their_best_child() -> None:
    """Width 9 -> 3 subtrees of 3 root children each ([a0 a1 a2] [a3 a4 a5] [a6 a7 a8]).
    a4 is an answer (subtree 1 spends one). Best per subtree: a2, a3 (a4 gone), a8; they get
    the subtree's remaining width: 3, 2, 3."""
    texts = [f"a{k} ки" for k in range(9)]
    texts[4] = "The answer is 4 ки"
    policy = ScriptedPolicy({(): [(t, 5, "step") for t in texts]})
    scores = {"a0": .1, "a1": .2, "a2": .3, "a3": .9, "a5": .5, "a6": .4, "a7": .2, "a8": .8}
    result = await run_search(Root("q", PROMPT), cfg(method="dvts", width=9, max_depth=2), policy, TableScorer(scores))
    reqs, _ = policy.calls[1]
    assert [(policy.path_of(r.prefix_ids)[-1], r.n) for r in reqs] == [("a2 ки", 3), ("a3 ки", 2), ("a8 ки", 3)]
    assert len(result.trajectories) == 1 + 8


async def test_best_of_n_continues_every_sample_once() -> None:
    """Width 4: root -> 4; each continues with exactly one child per depth; KV is the sum of 4
    disjoint paths plus the prompt: d1 10 + 4*5 = 30, d2 10 + 4*10 = 50."""
    policy = ScriptedPolicy()
    reports: list[DepthReport] = []
    result = await run_search(Root("q", PROMPT), cfg(method="best_of_n", width=4, max_depth=3), policy,
                              TableScorer(), on_depth=reports.append)
    assert [[r.n for r in reqs] for reqs, _ in policy.calls] == [[4], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert [r.kv_tokens for r in reports] == [10, 30, 50]
    assert len(result.trajectories) == 4


async def test_ets_embeds_newest_steps_only_when_needed() -> None:
    script = {(): [(f"s{k} ки", 5, "step") for k in range(4)]}
    scorer = TableScorer({"s0": .9, "s1": .8, "s2": .3, "s3": .2})
    await run_search(Root("q", PROMPT), cfg(method="ets", width=4, max_depth=2), ScriptedPolicy(script), scorer)
    assert scorer.embed_calls == [["s0", "s1", "s2", "s3"]]  # depth 1 only (depth 0 is the root)
    for kw in ({"lambda_s": 0.0}, {"method": "rebase"}, {"lambda_c": 0.0}):
        scorer = TableScorer({"s0": .9})
        await run_search(Root("q", PROMPT), cfg(**{"method": "ets", "width": 4, "max_depth": 2, **kw}),
                         ScriptedPolicy(script), scorer)
        assert scorer.embed_calls == [], kw
    # All step texts equal: coverage is skipped, so no embedding call.
    scorer = TableScorer()
    same = {(): [("same ки", 5, "step")]}
    await run_search(Root("q", PROMPT), cfg(method="ets", width=4, max_depth=2), ScriptedPolicy(same), scorer)
    assert scorer.embed_calls == []


async def test_ets_prunes_redundant_candidates_and_saves_kv() -> None:
    """Two near-identical high scorers and many low ones: ETS at lambda_c 5 keeps fewer
    candidates than REBASE and its next selection holds less KV."""
    script = {(): [("dup ки", 5, "step")] * 2 + [(f"low{k} ки", 5, "step") for k in range(6)]}
    scores = {"dup": 0.9, **{f"low{k}": 0.75 for k in range(6)}}
    kv = {}
    for method in ("rebase", "ets"):
        reports: list[DepthReport] = []
        await run_search(Root("q", PROMPT), cfg(method=method, width=8, max_depth=3, lambda_c=5.0),
                         ScriptedPolicy(script), TableScorer(scores), on_depth=reports.append)
        kv[method] = (reports[1].kept_candidates, reports[2].kv_tokens)
    assert kv["ets"][0] < kv["rebase"][0]
    assert kv["ets"][1] < kv["rebase"][1]  # 55 vs 80 tokens here


async def test_seeds_are_deterministic_per_node() -> None:
    p1, p2, p3 = ScriptedPolicy(), ScriptedPolicy(), ScriptedPolicy()
    await run_search(Root("q", PROMPT), cfg(width=4, max_depth=3, seed=11), p1, TableScorer())
    await run_search(Root("q", PROMPT), cfg(width=4, max_depth=3, seed=11), p2, TableScorer())
    await run_search(Root("q", PROMPT), cfg(width=4, max_depth=3, seed=12), p3, TableScorer())
    seeds = [[r.seed for r in reqs] for reqs, _ in p1.calls]
    assert seeds == [[r.seed for r in reqs] for reqs, _ in p2.calls]
    assert seeds != [[r.seed for r in reqs] for reqs, _ in p3.calls]
    flat = [s for row in seeds for s in row]
    assert len(set(flat)) == len(flat) and all(s is not None and 0 <= s < 2**31 for s in flat)
    assert seeds[0] == [derive_seed(11, ())]
    p4 = ScriptedPolicy()
    await run_search(Root("q", PROMPT), cfg(width=2, max_depth=2, seed=None), p4, TableScorer())
    assert all(r.seed is None for reqs, _ in p4.calls for r in reqs)


async def test_cancellation_propagates_and_issues_nothing_after() -> None:
    started = asyncio.Event()

    class Hanging(ScriptedPolicy):
        async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
            self.calls.append((list(requests), params))
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable: the search is cancelled while waiting")

    policy, scorer = Hanging(), TableScorer()
    task = asyncio.create_task(run_search(Root("q", PROMPT), cfg(), policy, scorer))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert len(policy.calls) == 1 and scorer.score_calls == []


async def test_interface_violations_are_clear_errors() -> None:
    class Short(ScriptedPolicy):
        async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
            out = await super().expand(requests, params)
            return [row[:-1] for row in out]

    with pytest.raises(ValueError, match="samples"):
        await run_search(Root("q", PROMPT), cfg(), Short(), TableScorer())

    class BadScorer(TableScorer):
        async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
            return [math.nan] * len(trajectories)

    with pytest.raises(ValueError, match="PRM scores"):
        await run_search(Root("q", PROMPT), cfg(), ScriptedPolicy(), BadScorer())
    with pytest.raises(ConfigError) as info:
        await run_search(Root("q", tuple(range(30))), cfg(max_tokens=30), ScriptedPolicy(), TableScorer())
    assert info.value.field == "max_tokens"
    with pytest.raises(ConfigError) as info:
        await run_search(Root("q", PROMPT), cfg(width=0), ScriptedPolicy(), TableScorer())
    assert info.value.field == "width"


async def test_result_carries_the_resolved_config() -> None:
    result = await run_search(Root("q", PROMPT), cfg(method="ets", width=64, max_depth=1), ScriptedPolicy(),
                              TableScorer())
    assert result.config is not None and result.config.lambda_s == 1.4 and result.config.beam_keep == 8
