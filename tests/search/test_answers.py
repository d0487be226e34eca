"""Answer extraction, score aggregation and voting on real MATH-style answers (math-verify)."""
from __future__ import annotations

import math
import threading

import pytest

from ets.search.answers import aggregate, equivalent, extract_answer, group_answers, group_by_string, select_answer
from ets.search.loop import Trajectory


def traj(text: str, *scores: float) -> Trajectory:
    return Trajectory(steps=(text,), step_scores=tuple(scores), tokens=10, finish_reason="answer", depth=len(scores))


@pytest.mark.parametrize(
    "text,answer",
    [
        (r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} and later \boxed{\left(1, \frac{2}{3}\right]}", r"\left(1, \frac{2}{3}\right]"),
        (r"\boxed{{a}^{2}+\{1\}}", r"{a}^{2}+\{1\}"),
        ("Step 3: compute. The answer is: 12 ки", "12"),
        ("The final answer is $x = 3$. I hope it is correct.", "x = 3"),
        ("Therefore, the final answer is: $\\boxed{30^\\circ}$. I hope it is correct.", "30^\\circ"),
        ("the answer is 7.\nMore text", "7"),
        ("No conclusion yet ки", ""),
        # SmolLM2 restates the sum after the marker; the result is the answer.
        ("so he has 8 apples now.\nThe answer is 3 + 5 = 8.", "8"),
        ("The answer is 16 - 3 - 4 = 9.", "9"),
        ("The answer is x = 3 + 5.", "x = 3 + 5"),
        ("The answer is 3. After breaking this down, Tom has 3 apples left", "3"),
        # A number, then words only: the number (a reader's answer; math-verify alone reads
        # "3 apples, and the solution is 5" as 5 and "8 apples left" as a product of letters).
        ("The answer is 3.5 apples.", "3.5"),
        ("The answer is 8 apples left.", "8"),
        ("The answer is 3 apples, and the solution is 5", "3"),
        ("The answer is $18.00 per hour.", "18.00"),
        ("The answer is 3 and 5.", "3 and 5"),
        ("The answer is 4 pi.", "4 pi"),
        (r"The answer is 2 \sqrt{3} units.", r"2 \sqrt{3} units"),
        ("The answer is 12 cm^2.", "12 cm^2"),
        ("The answer is the final answer.", "the final answer"),
        ("The answer is 11 + 5 = 16 pencils.", "16"),
        ("The answer is 4 (because 4 is 4 x 4).", "4"),
        ('The answer is "11".', "11"),
        # Lines cut by a break (SmolLM2 on the demo problem): the answer without the cut.
        ("The answer is 8,\nwhich is the total.", "8"),
        ("The answer is 4).", "4"),
        ('The answer is "11",\nso he has 11.', "11"),
        ('The answer is "\n8 apples', ""),
        ("The answer is (1, 2].", "(1, 2]"),
        ("The answer is f(3).", "f(3)"),
        ("The answer is [1, 2).", "[1, 2)"),
        ("The answer is N = 4.", "N = 4"),
        # GSM8K's own closing line, when no marker sentence is there.
        ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
        ("#### 5\nThe answer is 7.", "7"),
        (r"\boxed{unbalanced", ""),
    ],
)
def test_extract_answer(text: str, answer: str) -> None:
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "a,b",
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{1}{2}", r"\frac12"),
        ("x = 3", "3"),
        ("(1, 2]", r"\left(1,2\right]"),
        ("30^\\circ", "30"),
        (r"\frac{\pi}{2}", r"\pi/2"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("1,000", "1000"),
        ("0.50", "0.5"),
    ],
)
def test_equivalent_answers(a: str, b: str) -> None:
    assert equivalent(a, b) and equivalent(b, a)


@pytest.mark.parametrize("a,b", [(r"\frac{1}{2}", r"\frac{1}{3}"), ("(1, 2]", "[1, 2]"), ("3", "-3"), ("", "0"),
                                 ("x", "y")])
def test_different_answers(a: str, b: str) -> None:
    assert not equivalent(a, b)


def test_equivalence_off_the_main_thread() -> None:
    """signal-based timeouts cannot run there; math-verify is still used (without the alarm)."""
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.extend([equivalent(r"\frac{3}{4}", "0.75"), equivalent("1", "2")]))
    t.start()
    t.join(120)
    assert out == [True, False]


def test_aggregate() -> None:
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8
    assert aggregate(s, "min") == 0.5
    assert aggregate(s, "mean") == pytest.approx(2.2 / 3)
    assert aggregate(s, "prod") == pytest.approx(0.36)
    assert aggregate([], "last") == 0.0
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(s, "median")


def test_weighted_majority_pools_equivalent_answers() -> None:
    """1/2 appears as \\boxed{\\frac{1}{2}}, 0.5 and \\dfrac12 (0.3 + 0.3 + 0.2 = 0.8) against a single
    confident 2 (0.7): weighted vote picks 1/2, best-of picks 2, majority picks 1/2."""
    ts = [
        traj(r"Thus \boxed{\frac{1}{2}}", 0.9, 0.3),
        traj("The answer is: 0.5 ки", 0.3),
        traj(r"Therefore, the final answer is: $\boxed{\dfrac12}$.", 0.2),
        traj(r"\boxed{2}", 0.7),
        traj("no answer here", 0.99),
    ]
    w = select_answer(ts, "weighted_majority", "last")
    assert equivalent(w.answer, "1/2") and w.best_index == 0
    assert w.votes[r"\frac{1}{2}"] == pytest.approx(0.8) and w.votes["2"] == pytest.approx(0.7)
    assert w.answers[4] == ""
    b = select_answer(ts, "best", "last")
    assert b.answer == "2" and b.best_index == 3
    m = select_answer(ts, "majority", "last")
    assert equivalent(m.answer, "0.5")
    # Aggregation changes the weights: with min, the first trajectory votes 0.3 (unchanged), with
    # prod 0.27, so 0.27 + 0.3 + 0.2 = 0.77 still beats 0.7.
    assert math.isclose(select_answer(ts, "weighted_majority", "prod").votes[r"\frac{1}{2}"], 0.77)


def test_answer_groups_with_intervals_degrees_and_equations() -> None:
    answers = ["x = 3", "3", "(1, 2]", r"\left(1,2\right]", "[1, 2]", "45^\\circ", "45", "", "3.0"]
    assert group_answers(answers) == [[0, 1, 8], [2, 3], [4], [5, 6]]


def test_no_answers_and_ties() -> None:
    assert select_answer([]).answer == "" and select_answer([]).best_index is None
    none = select_answer([traj("hmm", 0.2), traj("hmm", 0.6)])
    assert none.answer == "" and none.best_index == 1
    # Tie on votes: the group whose best trajectory scores higher wins.
    tie = select_answer([traj(r"\boxed{1}", 0.3), traj(r"\boxed{1}", 0.3), traj(r"\boxed{5}", 0.6)],
                        "weighted_majority")
    assert tie.answer == "5"
    with pytest.raises(ValueError, match="voting"):
        select_answer([traj("x", 0.1)], "plurality")


def test_the_grouping_is_the_callers() -> None:
    """select_answer votes over whatever groups the caller's grouping function forms."""
    ts = [traj(r"\boxed{0.5}", 0.4), traj(r"\boxed{\frac{1}{2}}", 0.4), traj(r"\boxed{2}", 0.6)]
    assert select_answer(ts).answer in ("0.5", r"\frac{1}{2}")  # math-verify pools 0.5 and 1/2
    assert select_answer(ts, group=group_by_string).answer == "2"  # strings alone do not
