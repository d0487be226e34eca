"""The ``grounded-arithmetic`` PRM type: equations that are true *and* compute what the problem gave.

Meant for arithmetic word problems (GSM8K-style, the synthetic sets in bench/data): a few given
quantities combined by + - * / into one number. **Not** meant for MATH-style algebra, symbolic
answers, proofs or anything whose steps are not numeric equations on the problem's quantities: there
it sees few equations, grounds fewer, and its scores say little.

What the ``arithmetic`` type (ets.reward.rules) checks is that each equation is true: "1 + 1 = 2"
scores like "3 + 5 = 8" although 1 appears nowhere in the problem. This type also asks where each
operand came from. An operand is *grounded* when its value is

- a number of the problem text (digits, ``$1,200``, ``80%`` as 80 and 0.8, number words up to
  ninety, and the implied factors of ``half``, ``twice``/``double``, ``triple``, ``quarter``,
  ``dozen``, ``percent``, and the unit conversions of hours/minutes, days, weeks and years), or
- a result of an earlier grounded, true equation of the same trajectory (any of its sides' values),
  so a multi-step computation stays grounded.

Equations are found as ``arithmetic`` finds them (``rules.find_equations``) after unit words
between a number and an operator are dropped ("54 apples / 9 friends = 6" reads as ``54 / 9 = 6``);
they are checked more strictly: a result written as an integer must be exact ("11 / 5 = 2" is
wrong), only one written with decimals may be rounded ("10 / 3 = 3.33"). The final answer (the
last "answer is N" so far) counts as derived when N is a result of a grounded true equation.

Score of step k, over steps 1..k (the solution so far, as a PRM's step score), with n equations of
which w are wrong and the true ones have grounding fractions g_e (grounded operands / operands):

    0.4
    + (0.3 * sum(g_e) / n - 0.1)             when n > 0: grounded work up, invented numbers down
    + 0.25 * coverage                         share of the problem's numbers used by grounded equations
    - 0.4 * w / n                             wrong arithmetic
    + 0.1 / -0.15 / -0.25                     the answer so far is derived / is only a given number /
                                              comes from nowhere (0 while no answer is stated)

clipped to [0.02, 0.98] (the top is 0.95). Coverage counts the numbers written in digits (the
number words when there are none), each occurrence once: "4 packs of 6 books and 4 loose books"
asks for 4 twice; "one pile" is rarely a quantity to compute with. A step with
nothing to check and no answer yet scores 0.4, below any step whose arithmetic is grounded. The
terms are fractions of the trajectory's arithmetic, so two candidates tie only
when their arithmetic is alike, not (as with three levels) whenever both contain a true equation.
Pure and deterministic (exact rational arithmetic, no model, no I/O).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from ets.reward.rules import Equation, _Parser, find_equations, normalize

SCORE_NONE = 0.4
SCORE_MIN = 0.02
SCORE_MAX = 0.98
W_GROUNDING = 0.3
UNGROUNDED_PENALTY = 0.1
W_COVERAGE = 0.25
W_WRONG = 0.4
ANSWER_DERIVED = 0.1
ANSWER_GIVEN = -0.15
ANSWER_UNDERIVED = -0.25

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
}
# Factors a word implies without writing them ("half" divides by 2; "hours" may convert by 60).
_IMPLIED: dict[str, tuple[Fraction, ...]] = {
    "half": (Fraction(2), Fraction(1, 2)), "halves": (Fraction(2), Fraction(1, 2)),
    "twice": (Fraction(2),), "double": (Fraction(2),), "doubles": (Fraction(2),), "doubled": (Fraction(2),),
    "triple": (Fraction(3),), "triples": (Fraction(3),), "tripled": (Fraction(3),), "thrice": (Fraction(3),),
    "quarter": (Fraction(4), Fraction(1, 4)), "quarters": (Fraction(4), Fraction(1, 4)),
    "dozen": (Fraction(12),), "dozens": (Fraction(12),),
    "percent": (Fraction(100),), "%": (Fraction(100),),
    "hour": (Fraction(60),), "hours": (Fraction(60),), "minute": (Fraction(60),), "minutes": (Fraction(60),),
    "day": (Fraction(24),), "days": (Fraction(24), Fraction(7)), "week": (Fraction(7),),
    "weeks": (Fraction(7),), "year": (Fraction(12), Fraction(52), Fraction(365)),
    "years": (Fraction(12), Fraction(52), Fraction(365)), "month": (Fraction(12),), "months": (Fraction(12),),
}
_WORD = re.compile(r"[A-Za-z]+|%")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
_PERCENT_NUMBER = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(?:%|percent)")
# Up to three words between a number and an operator or '=' ("54 apples / 9 friends = 6 ..."):
# units, dropped so the computation reads as one run. 'x' is kept when it multiplies ("3 x 4").
_UNIT_WORDS = re.compile(r"(?<=\d)(?:[ \t]+(?![xX][ \t]*[\d(])[A-Za-z][A-Za-z'’]*){1,3}"
                         r"(?=[ \t]*(?:[-+*/=×÷^]|[xX][ \t]*[\d(]))")
_ANSWER = re.compile(r"answer is\W{0,3}?\$?\s*(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))", re.IGNORECASE)


@dataclass(frozen=True)
class Given:
    """What the problem text grounds: its written numbers and the factors its words imply."""

    numbers: frozenset[Fraction]   # written in digits or as number words
    implied: frozenset[Fraction]   # from words (half, dozen, hours, ...)
    counted: tuple[Fraction, ...]  # what coverage counts, each occurrence: the digits (else the number words)

    @property
    def values(self) -> frozenset[Fraction]:
        return self.numbers | self.implied


def given_numbers(question: str) -> Given:
    """The numbers the problem text gives (``80%`` gives 80 and 4/5) and the factors its words imply."""
    # "80%" is the number 80 here (normalize would also write a 100 into the text).
    text = normalize(_PERCENT_NUMBER.sub(r"\1", question))
    digits = [Fraction(m.group()) for m in _NUMBER.finditer(text)]
    numbers = set(digits)
    words: list[Fraction] = []
    implied: set[Fraction] = set()
    for m in _PERCENT_NUMBER.finditer(question.replace(",", "")):
        implied.add(Fraction(m.group(1)) / 100)
    for word in _WORD.findall(question.lower()):
        if word in _NUMBER_WORDS:
            words.append(Fraction(_NUMBER_WORDS[word]))
            numbers.add(words[-1])
        implied.update(_IMPLIED.get(word, ()))
    return Given(frozenset(numbers), frozenset(implied - numbers), tuple(sorted(digits or words)))


def strip_units(text: str) -> str:
    """``text`` with unit words between a number and a following operator dropped."""
    return _UNIT_WORDS.sub("", text)


@dataclass(frozen=True)
class GroundedEquation:
    """One equation with where its operands came from: ``grounding`` is the share of its operands
    that are known (given or derived before it); ``results`` the values it adds when fully grounded
    and true."""

    equation: Equation
    operands: tuple[Fraction, ...]
    grounding: float
    results: tuple[Fraction, ...]
    used_given: tuple[Fraction, ...]  # its grounded operands that the problem wrote (coverage)


def _side_numbers(side: str) -> list[str]:
    return [tok for tok in side.split() if tok[0].isdigit() or tok[0] == "."]


def _is_bare(side: str) -> bool:
    tokens = side.split()
    return len(tokens) == 1 or (len(tokens) == 2 and tokens[0] == "-")


def _value(side: str) -> Fraction | None:
    try:
        return _Parser(side.split()).parse()
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _known(token: str, known: set[Fraction]) -> bool:
    """Whether the operand written as ``token`` is a known value; one written with d decimals also
    matches a value it rounds (3.33 for 10/3)."""
    value = Fraction(token)
    if value in known:
        return True
    if "." not in token:
        return False
    tolerance = Fraction(1, 2 * 10 ** len(token.split(".", 1)[1]))
    return any(abs(value - k) < tolerance for k in known)


def ground(equation: Equation, known: set[Fraction], given: Given) -> GroundedEquation:
    """How grounded ``equation`` is against ``known`` (given values and earlier derived results).
    Inside a chain each side's value is known to the sides after it."""
    local = set(known)
    operands: list[Fraction] = []
    grounded = 0
    used: list[Fraction] = []
    values: list[Fraction] = []
    for side in equation.sides:
        if not _is_bare(side):
            for token in _side_numbers(side):
                number = Fraction(token)
                operands.append(number)
                if _known(token, local):
                    grounded += 1
                    if number in given.counted:
                        used.append(number)
        value = _value(side)
        if value is not None:
            values.append(value)
            local.add(value)
    grounding = grounded / len(operands) if operands else 0.0
    results = tuple(values) if exactly_true(equation) and operands and grounded == len(operands) else ()
    return GroundedEquation(equation, tuple(operands), grounding, results, tuple(used) if results else ())


def exactly_true(equation: Equation) -> bool:
    """Stricter than ``arithmetic``: adjacent sides are equal, or one is a bare number with
    decimals that the other rounds to ("10 / 3 = 3.33"); "11 / 5 = 2" is wrong, not rounded."""
    if not equation.correct:
        return False
    values = [_value(side) for side in equation.sides]
    for i in range(len(values) - 1):
        (a, va), (b, vb) = (equation.sides[i], values[i]), (equation.sides[i + 1], values[i + 1])
        if va is None or vb is None:
            return False
        if va == vb:
            continue
        places = [len(x.split()[-1].split(".", 1)[1]) for x in (a, b) if _is_bare(x) and "." in x]
        if not places or abs(va - vb) >= Fraction(1, 2 * 10 ** min(places)):
            return False
    return True


def _answer(text: str) -> Fraction | None:
    found = _ANSWER.findall(text)
    if not found:
        return None
    try:
        return Fraction(found[-1].replace(",", ""))
    except ValueError:
        return None


def score_steps(question: str, steps: Sequence[str]) -> list[float]:
    """Each step's score under the mapping in the module docstring (the solution so far)."""
    given = given_numbers(question)
    known: set[Fraction] = set(given.values)
    derived: set[Fraction] = set()
    used: Counter[Fraction] = Counter()
    n = wrong = 0
    grounding_sum = 0.0
    answer: Fraction | None = None
    scores: list[float] = []
    for step in steps:
        for eq in find_equations(strip_units(step)):
            g = ground(eq, known, given)
            n += 1
            if not exactly_true(eq):
                wrong += 1
                continue
            grounding_sum += g.grounding
            derived.update(g.results)
            known.update(g.results)
            used += Counter(g.used_given)  # capped by the problem's occurrences below
        answer = _answer(step) if _answer(step) is not None else answer
        score = SCORE_NONE
        if n:
            score += W_GROUNDING * grounding_sum / n - UNGROUNDED_PENALTY - W_WRONG * wrong / n
        if given.counted:
            covered = sum((used & Counter(given.counted)).values())
            score += W_COVERAGE * covered / len(given.counted)
        if answer is not None:
            score += (ANSWER_DERIVED if answer in derived else ANSWER_GIVEN if answer in given.values
                      else ANSWER_UNDERIVED)
        scores.append(round(min(SCORE_MAX, max(SCORE_MIN, score)), 6))
    return scores
