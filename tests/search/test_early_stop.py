"""The exact early stop: ``vote_decided`` against every continuation of small votes (ties
included), and the loop with ``early_stop`` on scripted trees: where it stops, the answer is the
full search's.

A continuation is what the full search could still add: at most ``remaining`` trajectories, each
with any answer (seen or new, or none) and an aggregated score in [0, 1]. The adversary's best
move is all of them at 1.0 on one challenger, so scores {0, 0.5, 1} reach every outcome.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
from typing import Callable, Sequence, TypeVar

import numpy as np
import pytest

from ets.search.config import SearchConfig
from ets.search.answers import group_by_string, select_answer, vote_decided
from ets.policy.model_types import policy_model_type
from ets.search.interfaces import ExpandRequest, SampledStep, ScoredTrajectory, StepParams, StepReading
from ets.search.loop import Root, Trajectory, run_search
from ets.testing.upstreams import EARLY_STOP_SCRIPT, PROMPT, ScriptedPolicy, TableScorer

VOTINGS = ("weighted_majority", "majority", "best")
_T = TypeVar("_T")


def _trajectory(answer: str, score: float) -> Trajectory:
    text = f"The answer is {answer}" if answer else "no answer here"
    return Trajectory(steps=(text,), step_scores=(score,), tokens=1, finish_reason="answer", depth=1)


def winner(answers: Sequence[str], scores: Sequence[float], voting: str) -> str | None:
    """The winning group's representative (None: no answer), as the final vote picks it."""
    choice = select_answer([_trajectory(a, s) for a, s in zip(answers, scores, strict=True)], voting=voting,
                           group=group_by_string)
    return choice.ranking[0].answer if choice.ranking else None


def continuations(pool: Sequence[str], remaining: int) -> list[list[tuple[str, float]]]:
    steps = [(a, s) for a in pool for s in (0.0, 0.5, 1.0)]
    out: list[list[tuple[str, float]]] = [[]]
    for n in range(1, remaining + 1):
        out += [list(c) for c in itertools.product(steps, repeat=n)]
    return out


def check_exact(answers: list[str], scores: list[float], remaining: int, voting: str) -> bool:
    """``vote_decided`` is sound (decided -> no continuation changes the winner) and exact
    (undecided -> some continuation does). Returns the decision."""
    decided = vote_decided(scores, answers, remaining, voting, group_by_string)
    now = winner(answers, scores, voting)
    pool = sorted({a for a in answers if a}) + ["new", ""]
    changed = [c for c in continuations(pool, remaining)
               if winner(answers + [a for a, _ in c], scores + [s for _, s in c], voting) != now]
    if decided:
        assert not changed, (answers, scores, remaining, voting, changed[:3])
    else:
        assert changed, (answers, scores, remaining, voting)
    return decided


@pytest.mark.parametrize("voting", VOTINGS)
def test_decided_exactly_when_no_continuation_changes_the_winner(voting: str) -> None:
    rng = random.Random(f"early-{voting}")
    decisions = []
    for _ in range(150):
        n = rng.randint(0, 6)
        answers = [rng.choice(["1", "2", "3", ""]) for _ in range(n)]
        scores = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
        decisions.append(check_exact(answers, scores, rng.randint(1, 2), voting))
    # Both outcomes occur, so neither branch of the check is vacuous.
    assert any(decisions) and not all(decisions)


@pytest.mark.parametrize("answers, scores, remaining, voting, decided", [
    # weighted: leader 3.0 vs runner-up 1.0 + 2 left: a tie at 3.0 is possible; the challenger
    # then needs the better best score: its new trajectory can reach 1.0, the leader's best is 1.0
    # and it was seen first, so the tie goes to the leader.
    (["7", "7", "7", "5"], [1.0, 1.0, 1.0, 1.0], 2, "weighted_majority", True),
    # the same tie, but the leader's best is 0.75 < a new 1.0: the challenger can win the tie.
    (["7", "7", "7", "7", "5"], [0.75, 0.75, 0.75, 0.75, 1.0], 2, "weighted_majority", False),
    # leader seen after the challenger: a tie in vote and best score goes to the one seen first.
    (["5", "7", "7", "7"], [1.0, 1.0, 1.0, 1.0], 2, "weighted_majority", False),
    # strictly more than the runner-up plus the width left.
    (["7", "7", "7", "5"], [1.0, 1.0, 0.75, 0.5], 2, "weighted_majority", True),
    # a new answer alone could reach the leader: 2.0 vs 2 left, leader's best 1.0, seen first.
    (["7", "7"], [1.0, 1.0], 2, "weighted_majority", True),
    (["7", "7"], [1.0, 0.75], 2, "weighted_majority", False),
    # majority: counts, same tie rule (3 vs 1 + 2, best 1.0 first: decided; best 0.5: not).
    (["7", "7", "7", "5"], [1.0, 0.5, 0.5, 0.5], 2, "majority", True),
    (["7", "7", "7", "5"], [0.5, 0.5, 0.5, 0.5], 2, "majority", False),
    # best: a max; one more trajectory at 1.0 ties any leader: only a 1.0 seen first holds.
    (["7", "5"], [1.0, 0.9], 3, "best", True),
    (["5", "7"], [0.9, 1.0], 3, "best", False),
    (["7"], [0.99], 1, "best", False),
    # trajectories without an answer do not vote; nothing answered yet: undecided.
    (["", ""], [1.0, 1.0], 1, "weighted_majority", False),
    # no width left: whatever there is, is final.
    ([], [], 0, "weighted_majority", True),
])
def test_ties_and_edges(answers: list[str], scores: list[float], remaining: int, voting: str,
                        decided: bool) -> None:
    if remaining:
        assert check_exact(answers, scores, remaining, voting) is decided
    else:
        assert vote_decided(scores, answers, remaining, voting, group_by_string) is decided


def test_the_bound_uses_the_configured_aggregation() -> None:
    # The loop passes aggregated scores; every aggregation of scores in [0, 1] stays in [0, 1],
    # which is what the bound of 1 per trajectory needs (prod, min, mean, last alike).
    from ets.search.answers import aggregate

    for how in ("last", "min", "mean", "prod"):
        for steps in itertools.product((0.0, 0.3, 1.0), repeat=3):
            assert 0.0 <= aggregate(steps, how) <= 1.0


# ---- the loop ------------------------------------------------------------------------------

def cfg(**kw: object) -> SearchConfig:
    base: dict[str, object] = dict(method="rebase", width=6, max_step_tokens=5, max_tokens=1000, seed=3)
    base.update(kw)
    return SearchConfig(**base)  # type: ignore[arg-type]


# EARLY_STOP_SCRIPT, "8" at 0.9 and the open steps at 0.6: stops at depth 2 with width 1 left; the
# full search finishes d as "3" at 1.0.
SCORES = {"The answer is 8": 0.9, "The answer is 3": 1.0, "a": 0.6, "b": 0.6, "c": 0.6, "d": 0.6}


async def test_loop_stops_once_decided_and_keeps_the_full_answer() -> None:
    full = await run_search(Root("q", PROMPT), cfg(), ScriptedPolicy(EARLY_STOP_SCRIPT), TableScorer(SCORES))
    early = await run_search(Root("q", PROMPT), cfg(early_stop=True), ScriptedPolicy(EARLY_STOP_SCRIPT),
                             TableScorer(SCORES))
    assert not full.stats.stopped_early and full.stats.width_left == 0
    assert early.stats.stopped_early and early.stats.width_left == 1
    assert early.stats.depth_reached == 2 < full.stats.depth_reached == 3
    assert early.stats.generated_tokens < full.stats.generated_tokens
    # What the early search returns is what the full one had finished by then, in order.
    assert early.trajectories == full.trajectories[:len(early.trajectories)]
    assert [t.finish_reason for t in early.trajectories] == ["answer"] * 5
    pick = select_answer(early.trajectories, group=group_by_string)
    assert pick.answer == select_answer(full.trajectories, group=group_by_string).answer == "8"
    assert early.config is not None and early.config.early_stop


async def test_loop_does_not_stop_while_a_tie_is_possible() -> None:
    # The same tree with "8" at 0.5: d2 ends at 2.5 vs 1 left: decided; at 0.2: 1.0 vs a new
    # answer's 1.0, whose best (1.0) would beat 0.2 in the tie: undecided, the search runs to the end.
    for score, stops in ((0.5, True), (0.2, False)):
        table = {**SCORES, "The answer is 8": score}
        early = await run_search(Root("q", PROMPT), cfg(early_stop=True), ScriptedPolicy(EARLY_STOP_SCRIPT),
                                 TableScorer(table))
        assert early.stats.stopped_early is stops, score
    # Off by default.
    assert SearchConfig().early_stop is False


class HashTree:
    """A random but reproducible tree: a node's children and scores follow from a hash of its
    path, so the early and the full search see the same tree up to where the early one stops."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.texts: dict[int, str] = {}

    def _h(self, *key: object) -> int:
        return int.from_bytes(hashlib.blake2b(repr((self.seed, *key)).encode(), digest_size=8).digest(), "little")

    async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
        out = []
        for r in requests:
            row = []
            for k in range(r.n):
                h = self._h(tuple(r.prefix_ids), k)
                text = (f"The answer is {h % 3}. ки" if h % 5 < 2 else f"step {h % 97} ки")
                tid = 5000 + len(self.texts)
                self.texts[tid] = text
                row.append(SampledStep((tid, 2, 2), text, "step", prompt_tokens=len(r.prefix_ids)))
            out.append(row)
        return out

    def read_step(self, text: str) -> StepReading:
        mt = policy_model_type("math-shepherd")  # its steps end with " ки"
        return StepReading(mt.plain_step(text), mt.has_answer(text))

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
        return [(self._h(tuple(t.steps)) % 5) / 4 for t in trajectories]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        e = np.array([[1.0, float(self._h(t) % 7)] for t in texts])
        return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.mark.parametrize("method", ["rebase", "beam", "dvts", "best_of_n", "ets"])
@pytest.mark.parametrize("voting", VOTINGS)
async def test_random_trees_answer_equals_the_full_search(method: str, voting: str) -> None:
    stopped = 0
    for seed in range(12):
        config = cfg(method=method, width=8, voting=voting, max_depth=6, aggregation="mean")
        full = await run_search(Root("q", PROMPT), config, HashTree(seed), HashTree(seed))
        early = await run_search(Root("q", PROMPT), cfg(**{**config.__dict__, "early_stop": True}),
                                 HashTree(seed), HashTree(seed), offload=_in_thread)
        a = select_answer(early.trajectories, voting=voting, aggregation="mean", group=group_by_string)
        b = select_answer(full.trajectories, voting=voting, aggregation="mean", group=group_by_string)
        assert early.trajectories == full.trajectories[:len(early.trajectories)]
        if early.stats.stopped_early:
            stopped += 1
            assert a.ranking[0].answer == b.ranking[0].answer, (method, voting, seed)
            assert early.stats.generated_tokens < full.stats.generated_tokens
            assert early.stats.width_left > 0
        else:
            assert early.trajectories == full.trajectories and a.answer == b.answer
    if voting != "best":
        assert stopped > 0, "no tree stopped early: the check above is vacuous"


async def _in_thread(work: Callable[[], _T]) -> _T:
    return await asyncio.to_thread(work)
