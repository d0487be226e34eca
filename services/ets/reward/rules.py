"""The ``arithmetic`` PRM type: a rule-based process verifier that checks the equations in the text.

Owns equation finding (``find_equations``), their exact checking and the step-score mapping
(``score_steps``). Pure and deterministic: no model, no I/O, exact rational arithmetic
(``fractions.Fraction``), so the same steps always get the same scores.

What counts as an equation: a run of numbers, operators (``+ - * / ^``, ``x``/``×``/``·`` between
numbers, ``÷``, ``\\times``/``\\cdot``/``\\div``, ``\\frac{a}{b}``), parentheses and ``=`` signs,
with at least one operator in one of its sides: ``3 + 5 = 8``, chains ``2 * 3 = 6 + 4 = 10``
(every adjacent pair of sides must be equal), GSM8K's annotations ``<<3+5=8>>``. Dollar signs and
thousands commas (``$1,200``) are dropped, ``N%`` is ``N/100``, markdown bullets and bold markers
are ignored. Words and line breaks end a run, so in "Total = 4 * 3 = 12 apples" the sides are
``4 * 3`` and ``12``; a side cut off by a word (the
``+ 3`` of "5 apples + 3 = 8") is not checked rather than misread. Sides equal a bare number
written with d decimals when they agree to within half a unit of its last digit (``10 / 3 =
3.33``); otherwise exactly.

Score of step k (it judges the solution so far, as a PRM's step score does):
``SCORE_WRONG`` (0.1) when any equation in steps 1..k is wrong, else ``SCORE_RIGHT`` (0.9) when at
least one equation in steps 1..k checks, else ``SCORE_NONE`` (0.5): nothing to verify.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

SCORE_WRONG = 0.1
SCORE_NONE = 0.5
SCORE_RIGHT = 0.9

# Exponents beyond this are not evaluated (a side like 10^10^10 would not finish).
MAX_EXPONENT = 64

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_OPS = ((r"\times", "*"), (r"\cdot", "*"), (r"\div", "/"), (r"\left", ""), (r"\right", ""),
              (r"\$", ""), (r"\%", "%"), (r"\,", ""), (r"\!", ""))
_UNICODE_OPS = str.maketrans({"×": "*", "·": "*", "∙": "*", "⋅": "*", "÷": "/", "−": "-", "＝": "="})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TIMES_X = re.compile(r"(?<=[\d)])\s*[xX]\s*(?=[\d(])")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*%")
_LATEX_WORD = re.compile(r"\\[A-Za-z]+")
# Markdown that looks like operators: list bullets ("- 3 + 4 = 7") and bold/italic markers.
_BULLET = re.compile(r"^[ \t]*[-*+][ \t]+", re.MULTILINE)
_POWER_STARS = re.compile(r"(?<=[\d)])\s*\*\*\s*(?=[\d(])")
_EMPHASIS = re.compile(r"\*\*|__|(?<![\d)\s])\*(?![\d(\s])")
# One token of an arithmetic run; anything else (a word, ':', a sentence's '.', a line break)
# ends the run.
_TOKEN = re.compile(r"[ \t]*(\d+(?:\.\d+)?|\.\d+|\*\*|[-+*/^()=])")


@dataclass(frozen=True)
class Equation:
    """One checked equation: its sides as written (after normalisation) and whether they agree."""

    sides: tuple[str, ...]
    correct: bool


def normalize(text: str) -> str:
    """The text with every supported notation rewritten to ``+ - * / ^ ( ) =`` and plain numbers."""
    for _ in range(4):  # nested \frac: innermost first
        text = _FRAC.sub(r"((\1)/(\2))", text)
    for latex, plain in _LATEX_OPS:
        text = text.replace(latex, plain)
    text = _LATEX_WORD.sub(" ", text)  # \boxed, \text, ...: a word that ends a run
    text = _BULLET.sub("", text)
    text = _EMPHASIS.sub(" ", _POWER_STARS.sub("^", text))
    text = text.translate(_UNICODE_OPS).replace("{", "(").replace("}", ")").replace("$", "")
    text = _THOUSANDS.sub("", text)
    text = _TIMES_X.sub(" * ", text)
    return _PERCENT.sub(r"(\1/100)", text)


class _Parser:
    """Recursive descent over one side's tokens: + - (lowest), * /, unary sign, ** (right)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self.i = 0

    def parse(self) -> Fraction:
        value = self._expr()
        if self.i != len(self.tokens):
            raise ValueError("trailing tokens")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self) -> str:
        tok = self._peek()
        if tok is None:
            raise ValueError("unexpected end")
        self.i += 1
        return tok

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            value = value + self._term() if self._take() == "+" else value - self._term()
        return value

    def _term(self) -> Fraction:
        value = self._unary()
        while self._peek() in ("*", "/"):
            op = self._take()
            right = self._unary()
            if op == "*":
                value *= right
            elif right == 0:
                raise ValueError("division by zero")
            else:
                value /= right
        return value

    def _unary(self) -> Fraction:
        if self._peek() in ("+", "-"):
            return -self._unary() if self._take() == "-" else self._unary()
        return self._power()

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek() == "**":
            self._take()
            exponent = self._unary()
            if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT or (base == 0 and exponent < 0):
                raise ValueError("exponent not evaluated")
            return base ** int(exponent)
        return base

    def _atom(self) -> Fraction:
        tok = self._take()
        if tok == "(":
            value = self._expr()
            if self._take() != ")":
                raise ValueError("unbalanced parenthesis")
            return value
        if tok[0].isdigit() or tok[0] == ".":
            return Fraction(tok)
        raise ValueError(f"unexpected {tok!r}")


def _is_bare(tokens: Sequence[str]) -> bool:
    """A plain number (optionally signed): a claimed result, not a computation."""
    body = tokens[1:] if tokens[:1] == ["-"] else tokens
    return len(body) == 1 and (body[0][0].isdigit() or body[0][0] == ".")


def _decimals(tokens: Sequence[str]) -> int:
    number = tokens[-1]
    return len(number.split(".", 1)[1]) if "." in number else 0


def _agree(a: tuple[Sequence[str], Fraction], b: tuple[Sequence[str], Fraction]) -> bool:
    (ta, va), (tb, vb) = a, b
    if va == vb:
        return True
    # A bare number may be the other side rounded to the digits it shows.
    places = [_decimals(t) for t in (ta, tb) if _is_bare(t)]
    return bool(places) and abs(va - vb) < Fraction(1, 2 * 10 ** min(places))


def _check_run(tokens: list[str], signed: bool) -> Equation | None:
    """The equation a run writes, or None when it holds no checkable computation. ``signed``: the
    run opens with a '-' written against its number ("-3 + 5 = 2"), a sign and not a subtraction."""
    sides: list[list[str]] = [[]]
    for tok in tokens:
        if tok == "=":
            sides.append([])
        else:
            sides[-1].append(tok)
    # A first side that starts with a binary operator lost its left operand to a word before the
    # run ("5 apples - 3 = 2"); a last side that ends with one lost its right operand. Neither is
    # what was written, so neither is checked.
    if sides[0] and sides[0][0] in ("*", "/", "**", "+", "-") and not (sides[0][0] == "-" and signed):
        sides[0] = []
    if sides[-1] and sides[-1][-1] in ("+", "-", "*", "/", "**", "("):
        sides[-1] = []
    if not sides[0]:
        sides = sides[1:]
    if sides and not sides[-1]:
        sides = sides[:-1]
    if len(sides) < 2 or any(not s for s in sides):
        return None  # "= 8", "3 + 5 = = 8": nothing to compare
    if all(_is_bare(s) for s in sides):
        return None  # "8 = 8", "1 = 2" in a list: not a computation
    values: list[tuple[list[str], Fraction]] = []
    for side in sides:
        try:
            values.append((side, _Parser(side).parse()))
        except (ValueError, ZeroDivisionError, OverflowError):
            return None  # malformed or unevaluable: not checked rather than called wrong
    correct = all(_agree(values[i], values[i + 1]) for i in range(len(values) - 1))
    return Equation(tuple(" ".join(s) for s in sides), correct)


def _runs(text: str) -> list[tuple[list[str], bool]]:
    """Maximal runs of arithmetic tokens holding an '=', each with whether it opens with a sign."""
    runs: list[tuple[list[str], bool]] = []
    current: list[str] = []
    signed = False
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if current:
                runs.append((current, signed))
                current = []
            pos += 1
            continue
        tok = m.group(1)
        if current and tok[0] in "0123456789." and (current[-1][0] in "0123456789." or current[-1] == ")"):
            # Two operands in a row ("... = 8 9 * 2 = 18"): two runs, not one malformed one.
            runs.append((current, signed))
            current = []
        if not current:
            signed = tok == "-" and m.end() < len(text) and (text[m.end()].isdigit() or text[m.end()] in ".(")
        current.append("**" if tok == "^" else tok)
        pos = m.end()
    if current:
        runs.append((current, signed))
    return [(r, signed) for r, signed in runs if "=" in r]


def find_equations(text: str) -> list[Equation]:
    """Every checkable equation in ``text``: GSM8K annotations first, then the visible text."""
    found: list[Equation] = []
    for m in _ANNOTATION.finditer(text):
        found += _equations_in(m.group(1))
    return found + _equations_in(_ANNOTATION.sub(" ", text))


def _equations_in(text: str) -> list[Equation]:
    out = []
    for run, signed in _runs(normalize(text)):
        eq = _check_run(run, signed)
        if eq is not None:
            out.append(eq)
    return out


def score_steps(steps: Sequence[str]) -> list[float]:
    """Each step's score under the mapping in the module docstring (the solution so far)."""
    scores: list[float] = []
    any_wrong = any_right = False
    for step in steps:
        for eq in find_equations(step):
            any_wrong |= not eq.correct
            any_right |= eq.correct
        scores.append(SCORE_WRONG if any_wrong else SCORE_RIGHT if any_right else SCORE_NONE)
    return scores
