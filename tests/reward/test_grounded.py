"""The ``grounded-arithmetic`` PRM type: operands grounded in the problem text or in earlier
grounded results, strict truth, graded step scores, and its place in the rules backend."""
from __future__ import annotations

import asyncio
from fractions import Fraction

import pytest

from ets.reward.prm_types import MODEL_FREE_PRM_TYPES, PRM_TYPES
from ets.reward import grounded, rules
from ets.reward.backends.rules_backend import RulesBackend
from ets.reward.grounded import exactly_true, given_numbers, ground, score_steps, strip_units
from ets.reward.settings import RewardServerConfig

pytestmark = pytest.mark.pure

SPLIT = ("Lena splits 42 cards equally into 6 piles, then adds 15 cards to one pile. "
         "How many cards are in that pile now?")
PACKS = "Ana has 4 packs of 6 books and 4 loose books. How many books does Ana have?"


def test_given_numbers_reads_digits_words_percent_and_implied_factors() -> None:
    given = given_numbers("John arm wrestles 20 people. He beats 80%. How many people did he lose to?")
    assert {Fraction(20), Fraction(80)} <= given.numbers
    assert {Fraction(4, 5), Fraction(100)} <= given.values  # 80% is 0.8; percent implies 100
    assert given.counted == (Fraction(20), Fraction(80))
    money = given_numbers("Ali had $21. Leila gave him half of her $1,200.")
    assert {Fraction(21), Fraction(1200), Fraction(2), Fraction(1, 2)} <= money.values
    words = given_numbers("Three friends share two dozen eggs.")
    assert {Fraction(3), Fraction(2), Fraction(12)} <= words.values
    assert words.counted == (Fraction(2), Fraction(3))  # no digits: the number words count
    assert given_numbers(PACKS).counted == (Fraction(4), Fraction(4), Fraction(6))  # each occurrence


def test_unit_words_between_number_and_operator_are_dropped() -> None:
    assert strip_units("54 apples / 9 friends = 6 apples per friend.") == "54 / 9 = 6 apples per friend."
    assert strip_units("3 x 4 = 12") == "3 x 4 = 12"            # 'x' as times is kept
    assert strip_units("5 apples x 3 = 15") == "5 x 3 = 15"
    assert strip_units("He has 5 apples and some pears.") == "He has 5 apples and some pears."


def test_grounding_from_problem_text_and_chained_results() -> None:
    given = given_numbers(SPLIT)
    known = set(given.values)
    first = ground(rules.find_equations("42 / 6 = 7")[0], known, given)
    assert first.grounding == 1.0 and first.results == (Fraction(7), Fraction(7))
    # 7 is only known once the first equation derived it.
    second = rules.find_equations("7 + 15 = 22")[0]
    assert ground(second, known, given).grounding == 0.5 and ground(second, known, given).results == ()
    known.update(first.results)
    assert ground(second, known, given).grounding == 1.0
    # One equation doing both steps is grounded at once; a running chain whose sides differ
    # ("42 / 6 = 7 + 15 = 22": 7 is not 22) is false, as under ``arithmetic``.
    both = ground(rules.find_equations("42 / 6 + 15 = 22")[0], set(given.values), given)
    assert both.grounding == 1.0 and Fraction(22) in both.results
    running = rules.find_equations("42 / 6 = 7 + 15 = 22")[0]
    assert not exactly_true(running) and ground(running, set(given.values), given).results == ()


def test_strict_truth_rounds_only_decimals() -> None:
    assert exactly_true(rules.find_equations("10 / 3 = 3.33")[0])
    assert not exactly_true(rules.find_equations("11 / 5 = 2")[0])   # arithmetic calls this right
    assert rules.find_equations("11 / 5 = 2")[0].correct
    assert not exactly_true(rules.find_equations("3 + 5 = 9")[0])


def test_chained_grounded_solution_scores_highest() -> None:
    right = score_steps(SPLIT, ["42 / 6 = 7", "7 + 15 = 22", "The answer is 22."])
    assert right == sorted(right) and right[-1] == pytest.approx(0.95)
    # The same problem: an unchained second step (7 comes from nowhere) and the partial answer.
    unchained = score_steps(SPLIT, ["7 + 15 = 22", "The answer is 22."])
    partial = score_steps(SPLIT, ["42 / 6 = 7", "The answer is 7."])
    assert right[-1] > partial[-1] > unchained[-1]


def test_ungrounded_true_equations_score_below_grounded_ones() -> None:
    question = "Ravi shares 54 apples equally among 9 friends. How many apples does each friend get?"
    grounded_eq = score_steps(question, ["54 / 9 = 6"])
    invented = score_steps(question, ["1 + 1 = 2"])   # true, but 1 is nowhere in the problem
    nothing = score_steps(question, ["Let's think."])
    assert grounded_eq[0] > nothing[0] > invented[0]
    # An answer built on invented numbers scores below one built on the problem's.
    assert (score_steps(question, ["1 + 1 = 2", "54 - 2 = 52", "The answer is 52."])[-1]
            < score_steps(question, ["54 / 9 = 6", "The answer is 6."])[-1])
    # Under ``arithmetic`` both trajectories get the same 0.9: no separation.
    assert rules.score_steps(["1 + 1 = 2"]) == rules.score_steps(["54 / 9 = 6"]) == [rules.SCORE_RIGHT]


def test_false_equations_pull_the_score_down_and_stay_down() -> None:
    wrong = score_steps(SPLIT, ["42 / 6 = 8", "8 + 15 = 23", "The answer is 23."])
    right = score_steps(SPLIT, ["42 / 6 = 7", "7 + 15 = 22", "The answer is 22."])
    assert all(w < r for w, r in zip(wrong, right, strict=True))
    assert score_steps(SPLIT, ["42 * 6 = 250"]) == [grounded.SCORE_MIN]
    # Results of a false equation are not derived: 8 grounds nothing after it.
    assert score_steps(SPLIT, ["42 / 6 = 8", "8 + 15 = 23"])[-1] < score_steps(SPLIT, ["42 / 6 = 7"])[-1]


def test_coverage_counts_each_given_occurrence() -> None:
    full = score_steps(PACKS, ["4 x 6 = 24", "24 + 4 = 28", "The answer is 28."])
    half = score_steps(PACKS, ["4 x 6 = 24", "The answer is 24."])
    assert full[-1] > half[-1]


def test_answer_terms_derived_given_or_from_nowhere() -> None:
    question = "Ken had 56 stickers and gave away 10. How many stickers does Ken have left?"
    derived = score_steps(question, ["56 - 10 = 46", "The answer is 46."])[-1]
    restated = score_steps(question, ["56 - 10 = 46", "The answer is 56."])[-1]
    nowhere = score_steps(question, ["56 - 10 = 46", "The answer is 40."])[-1]
    assert derived > restated > nowhere


def test_scores_are_graded_with_many_distinct_values() -> None:
    """Candidates of one problem that ``arithmetic`` ties get distinct scores here."""
    trajectories = [
        ["42 / 6 = 7", "7 + 15 = 22", "The answer is 22."],
        ["42 / 6 = 7", "The answer is 7."],
        ["7 + 15 = 22", "The answer is 22."],
        ["42 + 15 = 57", "The answer is 57."],
        ["1 + 1 = 2", "The answer is 2."],
        ["The answer is 42."],
        ["42 / 6 = 8", "The answer is 8."],
        ["There are many cards."],
    ]
    ours = {score_steps(SPLIT, t)[-1] for t in trajectories}
    theirs = {rules.score_steps(t)[-1] for t in trajectories}
    assert len(theirs) == 3 and len(ours) >= 7
    assert all(grounded.SCORE_MIN <= s <= grounded.SCORE_MAX for s in ours)


def test_gsm8k_annotations_and_words_ground() -> None:
    question = "Ali had $21. Leila gave him half of her $100. How much does Ali have now?"
    reference = ["Leila gave 100/2 = $<<100/2=50>>50 to Ali.", "Ali now has $21+ $50 = $<<21+50=71>>71."]
    assert score_steps(question, reference + ["The answer is 71."])[-1] == pytest.approx(0.95)


def test_deterministic_and_one_score_per_step() -> None:
    steps = ["42 / 6 = 7", "nothing", "7 + 15 = 22", "The answer is 22."]
    assert score_steps(SPLIT, steps) == score_steps(SPLIT, steps)
    assert len(score_steps(SPLIT, steps)) == 4 and score_steps(SPLIT, []) == []


def test_registered_and_served_by_the_rules_backend() -> None:
    assert "grounded-arithmetic" in PRM_TYPES and "grounded-arithmetic" in MODEL_FREE_PRM_TYPES
    RewardServerConfig(prm_type="grounded-arithmetic", prm_backend="rules").validate()
    backend = RulesBackend("grounded-arithmetic")
    steps = ["42 / 6 = 7", "7 + 15 = 22"]
    encoded = [backend.adapter.encode(SPLIT, steps)]
    outcome = asyncio.run(backend.score(encoded, last_step_only=False))
    assert outcome.scores == [score_steps(SPLIT, steps)]
    # The question reaches the rules: another problem grounds the same steps differently.
    other = asyncio.run(backend.score([backend.adapter.encode("Tim has 2 pens.", steps)], last_step_only=True))
    assert other.scores[0] != outcome.scores[0][-1:]
    # ``arithmetic`` is unchanged, so committed results stay reproducible.
    arith = RulesBackend("arithmetic")
    assert asyncio.run(arith.score([arith.adapter.encode(SPLIT, steps)], False)).scores == [[0.9, 0.9]]
