"""The sample store and the paired statistics of ``ets eval --store`` (pure tier: an in-process
deterministic source stands behind the store's seams, as the search core's tests do). The
real-stack tests (identical root children, exact rerun, resume) are in tests/evaluation/test_store_stack.py."""
from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from ets.evaluation import stats
from ets.evaluation.report import ProblemResult
from ets.evaluation.store import SampleStore, StoreGenerator, StoreScorer
from ets.search.interfaces import ExpandRequest, SampledStep, ScoredTrajectory, StepParams, StepReading


class Counter:
    """A source whose every draw is new (a counter), so a replayed sample is recognisable."""

    def __init__(self) -> None:
        self.drawn = 0

    async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
        out = []
        for r in requests:
            got = []
            for _ in range(r.n):
                self.drawn += 1
                got.append(SampledStep((self.drawn,), f"s{self.drawn}", "step"))
            out.append(got)
        return out

    def read_step(self, text: str) -> StepReading:
        return StepReading(text, ends_solution=False)

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
        self.drawn += len(trajectories)
        return [0.5 for _ in trajectories]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.ones((len(texts), 3), dtype=np.float32) / math.sqrt(3)


PARAMS = StepParams(max_new_tokens=8, temperature=0.7)


def test_kth_sample_is_shared_across_searches_and_distinct_within_one(tmp_path: Path) -> None:
    source = Counter()
    store = SampleStore(tmp_path / "s.jsonl", {})

    async def go() -> tuple[list[list[SampledStep]], list[list[SampledStep]]]:
        a = StoreGenerator(store, source, "policy")
        b = StoreGenerator(store, source, "policy")
        first = await a.expand([ExpandRequest((1, 2), 2), ExpandRequest((1, 2), 1)], PARAMS)
        second = await b.expand([ExpandRequest((1, 2), 4)], PARAMS)
        return first, second

    first, second = asyncio.run(go())
    # Within a search the same prefix takes the next samples; another search sees them in order.
    assert [s.token_ids for s in first[0] + first[1]] == [(1,), (2,), (3,)]
    assert [s.token_ids for s in second[0]] == [(1,), (2,), (3,), (4,)]
    assert (store.counts.samples_requested, store.counts.samples_drawn) == (7, 4)
    store.close()
    # Reopened (a cut line dropped): nothing is drawn again.
    with open(tmp_path / "s.jsonl", "a") as f:
        f.write('{"kind": "sample", "key": "ab')
    again = SampleStore(tmp_path / "s.jsonl")
    replay = asyncio.run(StoreGenerator(again, source, "policy").expand([ExpandRequest((1, 2), 4)], PARAMS))
    assert [s.token_ids for s in replay[0]] == [(1,), (2,), (3,), (4,)] and again.counts.samples_drawn == 0
    # Another budget, temperature or identity is another sample stream.
    other = asyncio.run(StoreGenerator(again, source, "policy|unpaired=x").expand([ExpandRequest((1, 2), 1)], PARAMS))
    assert other[0][0].token_ids == (5,)
    again.close()


def test_concurrent_searches_share_one_draw_and_a_failed_draw_is_not_stored(tmp_path: Path) -> None:
    class Slow(Counter):
        calls = 0

        async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
            self.calls += 1
            await asyncio.sleep(0.01)  # the second search asks while this draw is in flight
            return await super().expand(requests, params)

    source = Slow()
    store = SampleStore(tmp_path / "s.jsonl", {})

    async def go() -> list[list[list[SampledStep]]]:
        return list(await asyncio.gather(*(StoreGenerator(store, source, "policy").expand(
            [ExpandRequest((7,), 3)], PARAMS) for _ in range(2))))

    a, b = asyncio.run(go())
    assert a == b and [s.token_ids for s in a[0]] == [(1,), (2,), (3,)]
    assert source.calls == 1 and store.counts.samples_drawn == 3 and store.counts.samples_requested == 6

    class Broken(Counter):
        async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
            raise ConnectionError("policy down")

    with pytest.raises(ConnectionError):
        asyncio.run(StoreGenerator(store, Broken(), "policy").expand([ExpandRequest((8,), 2)], PARAMS))
    # Nothing half-drawn is kept: the next search draws those samples afresh.
    got = asyncio.run(StoreGenerator(store, source, "policy").expand([ExpandRequest((8,), 2)], PARAMS))
    assert [s.token_ids for s in got[0]] == [(4,), (5,)]
    store.close()


def test_a_waiter_sees_the_error_of_a_failed_draw_it_waited_for(tmp_path: Path) -> None:
    """Three configurations of one problem: X draws A, Y draws B, W waits for both; B fails, then
    A succeeds (ordered by events, not sleeps). W gets Y's error, not a KeyError once B's pending
    draw is gone (seen in the issue-28 evaluation: 'KeyError: (key, 0)' for REBASE when ETS's draw
    timed out)."""
    store = SampleStore(tmp_path / "s.jsonl", {})

    async def go() -> None:
        fail_b, release_a = asyncio.Event(), asyncio.Event()

        async def draw_a(todo: list[str]) -> list[float]:
            await release_a.wait()
            return [1.0] * len(todo)

        async def draw_b(todo: list[str]) -> list[float]:
            await fail_b.wait()
            raise ConnectionError("policy down")

        async def nothing(todo: list[str]) -> list[float]:
            raise AssertionError(f"the waiter computes nothing, asked {todo}")

        table: dict[str, float] = {}
        pending: dict[str, asyncio.Future[float]] = {}
        x = asyncio.ensure_future(store.cached(["a"], table, pending, draw_a, ["a"]))
        y = asyncio.ensure_future(store.cached(["b"], table, pending, draw_b, ["b"]))
        await asyncio.sleep(0)  # both draws in flight
        w = asyncio.ensure_future(store.cached(["a", "b"], table, pending, nothing, ["a", "b"]))
        await asyncio.sleep(0)  # the waiter waits on A, then B
        fail_b.set()
        with pytest.raises(ConnectionError):
            await y
        assert "b" not in pending  # B is drawn afresh by the next caller
        release_a.set()
        assert await x == ([1.0], 1)
        with pytest.raises(ConnectionError, match="policy down"):
            await w
        assert table == {"a": 1.0} and not pending

    asyncio.run(go())
    store.close()


def test_scores_and_embeddings_cached_by_input(tmp_path: Path) -> None:
    source = Counter()
    store = SampleStore(tmp_path / "s.jsonl", {})
    scorer = StoreScorer(store, source, "prm", "emb")
    t = ScoredTrajectory("q", ("a", "b"))
    assert asyncio.run(scorer.score_last_steps([t, t])) == [0.5, 0.5]
    assert asyncio.run(scorer.score_last_steps([t])) == [0.5]
    assert source.drawn == 1 and store.counts.scores_computed == 1
    e = asyncio.run(scorer.embed(["x", "y", "x"]))
    assert e.shape == (3, 3) and store.counts.embeds_computed == 2
    store.close()
    back = SampleStore(tmp_path / "s.jsonl")
    assert len(back.scores) == 1 and len(back.embeddings) == 2
    back.close()


def test_mcnemar_and_intervals() -> None:
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(3, 7) == pytest.approx(0.34375)
    gm, lo, hi = stats.geometric_mean_ci([2.0, 2.0, 2.0])
    assert (gm, lo, hi) == pytest.approx((2.0, 2.0, 2.0))
    gm, lo, hi = stats.geometric_mean_ci([1.0, 4.0])
    assert gm == pytest.approx(2.0) and lo <= gm <= hi
    d, dlo, dhi = stats.paired_difference_ci([True, False, True], [True, True, True])
    assert d == pytest.approx(-1 / 3) and dlo <= d <= dhi


def _r(label: str, pid: str, correct: bool, kv: int) -> ProblemResult:
    return ProblemResult(id=pid, label=label, method=label.split("[")[0], width=16, reference="1", correct=correct,
                         total_kv_tokens=kv, peak_kv_tokens=kv // 2)


def test_paired_comparison_goal_line() -> None:
    rs = [_r("rebase", str(i), i < 5, 2000) for i in range(10)]
    rs += [_r("ets", str(i), i < 5, 1000) for i in range(10)]          # 2x, same accuracy: met
    rs += [_r("ets[lambda_c=5]", str(i), i < 1, 400) for i in range(10)]  # 5x, -40 points: not met
    by = {c["label"]: c for c in stats.paired_comparisons(rs)}
    assert by["ets"]["kv_ratio_total"] == pytest.approx(2.0) and by["ets"]["goal_ours"]
    assert by["ets"]["discordant"] == {"only_this": 0, "only_reference": 0}
    assert not by["ets[lambda_c=5]"]["accuracy_holds"] and not by["ets[lambda_c=5]"]["goal_paper"]
    assert "accuracy -40.0 points" in by["ets[lambda_c=5]"]["verdict"]
    goal = stats.goal_line(list(by.values()))
    assert goal["ours_met"] and goal["ours"] == [(16, "ets")]


def test_no_right_answer_on_either_side_meets_no_goal() -> None:
    """0% against 0% is not "REBASE's accuracy reached": accuracy was not measured, whatever the KV."""
    rs = [_r("rebase", str(i), False, 3000) for i in range(4)]
    rs += [_r("ets[lambda_c=5]", str(i), False, 1000) for i in range(4)]   # 3x less KV, nobody right
    rs += [_r("ets", str(i), i == 0, 1000) for i in range(4)]               # one right answer: measured
    by = {c["label"]: c for c in stats.paired_comparisons(rs)}
    none_right = by["ets[lambda_c=5]"]
    assert not none_right["accuracy_measured"] and not none_right["accuracy_holds"]
    assert not none_right["goal_paper"] and not none_right["goal_ours"]
    assert "accuracy not measured (no right answer on either side in 4 problems)" in none_right["verdict"]
    assert by["ets"]["accuracy_measured"] and by["ets"]["accuracy_holds"] and by["ets"]["goal_ours"]
    assert stats.goal_line([none_right])["paper_met"] is False


def _es(label: str, pid: str, answer: str, tokens: int, *, stopped: bool = False, drawn: int = 0) -> ProblemResult:
    method, _, rest = label.partition("[")
    overrides: dict[str, object] = {}
    for part in rest.rstrip("]").split(",") if rest else []:
        k, v = part.split("=")
        overrides[k] = v == "True" if v in ("True", "False") else float(v)
    return ProblemResult(id=pid, label=label, method=method, width=16, reference="1", answer=answer,
                         correct=answer == "1", total_kv_tokens=tokens * 2, peak_kv_tokens=tokens,
                         generated_tokens=tokens, samples_requested=tokens // 10, samples_drawn=drawn,
                         overrides=overrides, stopped_early=stopped, width_left=4 if stopped else 0)


def test_early_stop_comparison_pairs_each_setting_with_its_full_search() -> None:
    rs = [_es("ets[lambda_c=5]", "a", "1", 100), _es("ets[lambda_c=5]", "b", "2", 100),
          _es("ets[early_stop=True,lambda_c=5]", "a", "1", 60, stopped=True),
          _es("ets[early_stop=True,lambda_c=5]", "b", "3", 50, stopped=True, drawn=2),
          _es("ets[lambda_c=5]", "c", "4", 100), _es("ets[early_stop=True,lambda_c=5]", "c", "4.0", 100, stopped=True),
          _es("rebase", "a", "1", 200), _es("rebase[early_stop=True]", "a", "1", 200)]
    rows = {r["label"]: r for r in stats.early_stop_comparisons(rs)}
    assert set(rows) == {"ets[early_stop=True,lambda_c=5]", "rebase[early_stop=True]"}
    ets = rows["ets[early_stop=True,lambda_c=5]"]
    assert ets["full_label"] == "ets[lambda_c=5]" and ets["problems"] == 3 and ets["stopped"] == 3
    # The guarantee is checked per problem: b's answer differs, so it is listed; c's "4.0" is "4".
    assert ets["same_answer_where_stopped"] == 2 and ets["mismatches"] == [{"id": "b", "early": "3", "full": "2"}]
    assert ets["generated_tokens"] == {"early": 210, "full": 300, "saved": 90, "saved_share": 0.3}
    assert ets["drawn_by_early"] == 2 and ets["width_left_mean"] == 4.0
    assert rows["rebase[early_stop=True]"]["stopped"] == 0
    assert rows["rebase[early_stop=True]"]["generated_tokens"]["saved"] == 0
    # The paired KV table compares an early-stopped ETS with the early-stopped REBASE.
    by = {c["label"]: c for c in stats.paired_comparisons(rs)}
    assert by["ets[lambda_c=5]"]["reference"] == "rebase"
    assert by["ets[early_stop=True,lambda_c=5]"]["problems"] == 1  # the early-stopped REBASE ran "a" only
    rs.append(_es("rebase[early_stop=True]", "b", "2", 200))
    by = {c["label"]: c for c in stats.paired_comparisons(rs)}
    assert by["ets[early_stop=True,lambda_c=5]"]["reference"] == "rebase[early_stop=True]"
    assert by["ets[early_stop=True,lambda_c=5]"]["problems"] == 2


def test_an_explicit_early_stop_off_is_the_full_search() -> None:
    # Through the service (no base configuration to drop defaults against) the sweep keeps
    # early_stop=False in the label: it is still the full run the early-stopped one pairs with.
    rs = [_es("ets[early_stop=False]", "a", "1", 100), _es("ets[early_stop=True]", "a", "1", 60, stopped=True),
          _es("rebase[early_stop=False]", "a", "1", 200)]
    [row] = stats.early_stop_comparisons(rs)
    assert row["full_label"] == "ets[early_stop=False]" and row["generated_tokens"]["saved"] == 40
    by = {c["label"]: c for c in stats.paired_comparisons(rs)}
    assert by["ets[early_stop=False]"]["reference"] == "rebase[early_stop=False]"
    assert "ets[early_stop=True]" not in by  # no early-stopped REBASE to pair it with
