"""bench/prm_store_signal.py's pure parts: rebuilding a store's tree, the re-vote, frontier counts."""
from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path
from typing import Sequence

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import prm_store_signal as sig

sys.path.pop(0)

from ets.evaluation.store import sample_key
from ets.policy.model_types import policy_model_type
from ets.search.answers import select_answer
from ets.search.loop import Trajectory

pytestmark = pytest.mark.pure

MT = policy_model_type("smollm2-instruct")
IDENTITY = "policy|smollm2-instruct"


def key_of(prefix: Sequence[int], budget: int) -> str:
    return sample_key(IDENTITY, prefix, budget, 0.7)


def put(samples: sig.Samples, prefix: tuple[int, ...], budget: int, rows: list[tuple[list[int], str, str]]) -> None:
    key = key_of(prefix, budget)
    for k, (ids, text, finish) in enumerate(rows):
        samples[(key, k)] = {"key": key, "k": k, "ids": ids, "text": text, "finish": finish}


def test_walk_rebuilds_finished_candidates_and_frontier() -> None:
    root = (1, 2, 3)
    samples: sig.Samples = {}
    # Root: a step that goes on, an answer, an eos without answer.
    put(samples, root, 10, [([4], "3 + 5 = 8\n\n", "step"), ([5], "The answer is 8.", "step"),
                            ([6], "I do not know", "eos")])
    # The first child's children, at the budget the loop gives them (max_tokens - prefix = 16 - 4).
    put(samples, (1, 2, 3, 4), 10, [([7, 8], "So he has 8.\n\n", "step")])
    # A grandchild reaches the depth cap (3) without an answer: finished by the cap.
    put(samples, (1, 2, 3, 4, 7, 8), 10, [([9], "Done.\n\n", "step")])
    # A sample under another budget belongs to no node of this walk.
    put(samples, root, 5, [([99], "The answer is 1.", "eos")])
    finished, frontier = sig.walk(samples, key_of, root, MT, max_tokens=16, max_step_tokens=10, max_depth=3)
    assert sorted(finished) == sorted([("The answer is 8.",), ("I do not know",),
                                       ("3 + 5 = 8", "So he has 8.", "Done.")])
    assert {d: len(v) for d, v in frontier.items()} == {1: 3, 2: 1, 3: 1}


def test_walk_finishes_at_the_token_budget_and_skips_pruned_nodes() -> None:
    root = (1,) * 8
    samples: sig.Samples = {}
    # The root's budget is min(4, 10 - 8) = 2; both steps bring the trajectory to 10 tokens: finished.
    put(samples, root, 2, [([2, 2], "a\n\n", "step"), ([3, 3], "b\n\n", "step")])
    finished, _ = sig.walk(samples, key_of, root, MT, max_tokens=10, max_step_tokens=4, max_depth=6)
    assert sorted(finished) == [("a",), ("b",)]
    # A non-terminal node with no stored children was pruned: not a candidate.
    samples2: sig.Samples = {}
    put(samples2, root, 4, [([2], "a\n\n", "step")])
    assert sig.walk(samples2, key_of, root, MT, max_tokens=100, max_step_tokens=4, max_depth=6)[0] == []


def test_read_store_gzip_and_plain(tmp_path: Path) -> None:
    rows = [{"kind": "meta", "format": "ets-sample-store", "version": 1},
            {"kind": "sample", "key": "ab", "k": 0, "ids": [1], "text": "x", "finish": "eos"},
            {"kind": "score", "key": "cd", "score": 0.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "s.jsonl").write_text(text + '{"kind": "sam')  # a line cut off by a live run
    with gzip.open(tmp_path / "s.jsonl.gz", "wt") as f:
        f.write(text)
    for name in ("s.jsonl", "s.jsonl.gz"):
        assert list(sig.read_store(tmp_path / name)) == [("ab", 0)]


def test_vote_matches_select_answer() -> None:
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 9)
        answers = [rng.choice(["", "8", "12", "3"]) for _ in range(n)]
        scores = [rng.choice([0.1, 0.5, 0.9, 0.3]) for _ in range(n)]
        groups = sig.answer_groups(answers)
        trajectories = [Trajectory(steps=(f"The answer is {a}." if a else "no",), step_scores=(s,), tokens=1,
                                   finish_reason="answer", depth=1) for a, s in zip(answers, scores, strict=True)]
        for voting in ("weighted_majority", "majority"):
            chosen = select_answer(trajectories, voting=voting).answer
            won = sig.vote(scores, groups, voting)
            assert (won is None) == (chosen == "")
            if won is not None:
                assert answers[groups.index(won)] == chosen


def test_answer_groups_by_value_then_text() -> None:
    groups = sig.answer_groups(["8", "8.0", "16/2", "", "x + y", "x+y", "9", "8 apples"])
    assert groups[0] == groups[1] == groups[2] == groups[7]  # math-verify reads "8 apples" as 8
    assert groups[3] is None
    assert groups[4] == groups[5] != groups[0]   # not one number: grouped by text
    assert groups[6] not in (groups[0], groups[4])


def test_subset_vote_and_distinct_frontier() -> None:
    scores = [0.9, 0.1, 0.1, 0.1]
    groups: list[int | None] = [0, 1, 1, 1]
    # The whole pool (width >= n): weighted 0.9 against 0.3, the right group 0 wins.
    assert sig.subset_vote(scores, groups, {0}, 8, 10, random.Random(0)) == (1.0, 1.0)
    assert sig.subset_vote(scores, groups, {0}, 8, 10, random.Random(0), voting="majority") == (0.0, 1.0)
    # Subsets of 2: the right candidate is in half of them, and wins whenever it is.
    acc, oracle = sig.subset_vote(scores, groups, {0}, 2, 4000, random.Random(0))
    assert acc == oracle and abs(oracle - 0.5) < 0.05
    frontier: dict[int, list[tuple[str, ...]]] = {1: [("a",), ("b",), ("c",)], 2: [("a", "b")]}
    assert sig.distinct_per_frontier(frontier, lambda steps: float(len(steps[-1]) > 0 and steps[-1] != "c")) \
        == [(1, 3, 2)]


def test_read_problems_slices() -> None:
    ids = list(sig.read_problems("bench/data/arith_easy.jsonl[12:24],bench/data/arith_chain.jsonl[:2]"))
    assert ids == [f"arith-0-{i}" for i in range(12, 24)] + ["chain-1-0", "chain-1-1"]
