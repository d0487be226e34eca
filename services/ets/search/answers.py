"""Answer choice: extract each trajectory's final answer, aggregate its step scores, and vote.

Owns ``extract_answer`` (``\\boxed{...}`` with nested braces, "The final answer is X", "The answer
is: X"), ``aggregate`` (last / min / mean / prod), answer equivalence through ``math-verify``
(parse + verify; no hand-written LaTeX grading), ``select_answer`` (weighted majority vote,
majority vote, best-of) and ``vote_decided``, the exact early-stop rule (the vote's winner can no
longer change, whatever the remaining width adds; see its docstring for what that guarantees).

Equivalence is a function the caller may replace (``select_answer(..., group=...)``): this
module's ``group_answers`` runs math-verify on the calling thread. math-verify bounds parse/verify
with ``signal.alarm``, which only works on a main thread: there each parse/compare gets
``EQUIVALENCE_TIMEOUT_S``; on other threads it runs unbounded. A server, which chooses answers in
worker threads, passes a bounded grouping instead (``ets.service.grouping``: a worker process
with a deadline and a fallback to ``group_by_string``). No I/O here.
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # the loop imports this module (its early stop votes)
    from ets.search.loop import Trajectory

EQUIVALENCE_TIMEOUT_S = 2

# answers -> indices grouped by equivalence (first occurrence first; "" excluded).
Grouping = Callable[[Sequence[str]], list[list[int]]]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MARKERS = re.compile(
    r"(?:the\s+final\s+answer\s+is|the\s+answer\s+is)\s*:?\s*",
    re.IGNORECASE,
)
_TRAILING = re.compile(r"(?:\s*(?:I hope it is correct\.?|ки))+\s*$", re.IGNORECASE)
# A sentence ends at a period followed by a space and a capital ("3. After that"), not "3.5".
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])")
# GSM8K's own closing line: "#### 72".
_HASHES = re.compile(r"####\s*")
# "8 apples left", "3 apples, and the solution is 5": a number, then words (units, a clause) and
# nothing mathematical -> the number. Not "3 and 5" (two answers), "4 pi", "2 \\sqrt{3}", "3 x + 2".
_NUMBER_THEN_WORDS = re.compile(r"^\$?(-?\d[\d,]*(?:\.\d+)?)\s*,?\s+"
                                r"(?!(?:and|or|pi|sqrt|times|over|plus|minus|divided)\b)"
                                r"([A-Za-z]{2,}\b[^\\^_{}=+*/<>|]*)$")
# "3 + 5 = 8" after a marker (small models restate the sum): numbers and operators only on the
# left, one number on the right -> the right. "x = 3" (a variable) stays as written.
# Words may follow the result ("11 + 5 = 16 pencils": 16, what the model states).
_NUMERIC_EQUATION = re.compile(r"^[\d\s.,+\-*/×÷()]+=\s*(-?[\d.,]*\d)(?:\s+[A-Za-z][A-Za-z\s]*)?$")
# A quoted answer: '"11"' (the instruction quotes "The answer is", and the model quotes back).
_QUOTED = re.compile(r'^"([^"]+)"$')
# "4 (because 4 is 4 x 4)", "5 (the final number of cookies)": a number, then only a parenthetical.
_NUMBER_THEN_ASIDE = re.compile(r"^\$?(-?\d[\d,]*(?:\.\d+)?)\s+\([^()]*\)$")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    found: str | None = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            found = text[m.end(): i - 1]
    return found


def extract_answer(text: str) -> str:
    """The final answer in a trajectory's text ("" when it gives none).

    The last ``\\boxed{}`` wins; otherwise the text after the last "The final answer is" /
    "The answer is" marker (else after GSM8K's "####"), up to the end of its line, without a
    closing period, ``$`` signs or a trailing step tag, and only its first sentence; a purely
    numeric equation there ("3 + 5 = 8", "3 + 5 = 8 apples") gives its result, a number followed
    by words only ("8 apples left", "3 apples, and the solution is 5") or by a parenthetical
    ("4 (because ...)") gives the number, and quotes around the answer go, as do a trailing comma,
    semicolon or colon and an unmatched closing bracket ("8," and "4)" answer 8 and 4).
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    last = None
    for match in _MARKERS.finditer(text):
        last = match
    if last is None:
        for match in _HASHES.finditer(text):
            last = match
    if last is None:
        return ""
    rest = text[last.end():].split("\n", 1)[0]
    rest = _TRAILING.sub("", rest).strip()
    # Only the first sentence: "The answer is 3. After that, Tom ..." answers 3.
    rest = _SENTENCE_END.split(rest, maxsplit=1)[0]
    rest = rest.strip("$ ").rstrip(".").strip().strip("$").strip()
    # What a line break cut off: "8," (the clause went on below), "4)" (an aside opened above),
    # a lone quote. The reader's answer is what is left. (Brackets counted together: "(1, 2]" and
    # "[1, 2)" are half-open intervals, balanced.)
    rest = rest.rstrip(",;:").strip()
    while rest[-1:] in (")", "]") and rest.count(")") + rest.count("]") > rest.count("(") + rest.count("["):
        rest = rest[:-1].rstrip()
    quoted = _QUOTED.match(rest)
    if quoted:
        rest = quoted.group(1).strip()
    if not rest.strip('"\''):
        return ""
    for rule in (_NUMERIC_EQUATION, _NUMBER_THEN_WORDS, _NUMBER_THEN_ASIDE):
        found = rule.match(rest)
        if found:
            return found.group(1)
    return rest


# lm-evaluation-harness's GSM8K "flexible-extract": the last number-like run of the text.
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def extract_final_number(text: str) -> str:
    """The last number in a trajectory's text ("" when it has none), as lm-evaluation-harness's
    GSM8K flexible extraction reads it: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, without
    ``$``, thousands commas and a closing period (its ``regexes_to_ignore``)."""
    found = ""
    for m in _FLEXIBLE.finditer(text):
        value = m.group(0).replace("$", "").replace(",", "").rstrip(".")
        if any(ch.isdigit() for ch in value):
            found = value
    return found


def aggregate(scores: Sequence[float], how: str = "last") -> float:
    """Aggregate a trajectory's step scores: last (default), min, mean or prod (0.0 if empty)."""
    if not scores:
        return 0.0
    if how == "last":
        return float(scores[-1])
    if how == "min":
        return float(min(scores))
    if how == "mean":
        return float(sum(scores) / len(scores))
    if how == "prod":
        return float(math.prod(scores))
    raise ValueError(f"aggregation: unknown {how!r}")


def _timeout() -> int | None:
    """math-verify's per-call timeout: its alarms only work on the main thread."""
    return EQUIVALENCE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parse(answer: str, timeout: int | None) -> tuple[Any, ...]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if not answer:
        return ()
    try:
        return tuple(parse(
            f"${answer}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=timeout, raise_on_error=False,
        ))
    except Exception:  # noqa: BLE001 - math-verify raises on timeouts and odd inputs; treat as unparsable
        return ()


def normalise(answer: str) -> str:
    return re.sub(r"\s+", "", answer)


# A number in a stated base: "52_8", "4210_{5}" (MATH's base answers).
_BASED = re.compile(r"\s*\$?([0-9A-Za-z]+)_\{?(\d+)\}?\$?\s*")
# A column vector: \begin{pmatrix} a \\ b \end{pmatrix} (also bmatrix), one entry per row.
_COLUMN = re.compile(r"\\begin\{([pb])matrix\}((?:(?!\\end|&).)*)\\end\{\1matrix\}", re.DOTALL)


def _column_as_tuple(answer: str) -> str:
    """Column vectors written as tuples: "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}" -> "(1, 2)" (a
    reader calls them the same vector; math-verify parses a matrix and a tuple as different
    types). Matrices with columns (&) stay as they are."""
    return _COLUMN.sub(lambda m: "(" + ", ".join(e.strip() for e in m.group(2).split("\\\\")) + ")", answer)


def _bases_differ(a: str, b: str) -> bool:
    """Both answers name a base and the bases differ: "52_8" vs "52_9" (math-verify drops the
    subscript, which would call them equal)."""
    ma, mb = _BASED.fullmatch(a), _BASED.fullmatch(b)
    return bool(ma and mb and int(ma.group(2)) != int(mb.group(2)))


def equivalent(a: str, b: str) -> bool:
    """Whether two extracted answers are mathematically equal (math-verify, either direction;
    column vectors compared as tuples, numbers in different stated bases never equal)."""
    if normalise(a) == normalise(b):
        return True
    if not a or not b or _bases_differ(a, b):
        return False
    if "matrix}" in a or "matrix}" in b:
        a, b = _column_as_tuple(a), _column_as_tuple(b)
    from math_verify import verify

    timeout = _timeout()
    pa, pb = _parse(a, timeout), _parse(b, timeout)
    if not pa or not pb:
        return False
    try:
        return bool(
            verify(list(pa), list(pb), timeout_seconds=timeout, raise_on_error=False)
            or verify(list(pb), list(pa), timeout_seconds=timeout, raise_on_error=False)
        )
    except Exception:  # noqa: BLE001 - as in parsing: a failure to verify is 'not equal'
        return False


def group_answers(answers: Sequence[str]) -> list[list[int]]:
    """Indices grouped by equivalence (first occurrence is the representative); "" excluded."""
    groups: list[list[int]] = []
    for i, ans in enumerate(answers):
        if not ans:
            continue
        for g in groups:
            if equivalent(answers[g[0]], ans):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


class FallbackGroups(list[list[int]]):
    """Groups made by a fallback (string matching, when equivalence could not finish in time or its
    worker died): a list like any grouping's, so the vote uses it unchanged, and the pipeline can
    tell and flag it (``ets.search.pipeline``; the bounded worker is ``ets.service.grouping``)."""


def group_by_string(answers: Sequence[str]) -> list[list[int]]:
    """Indices grouped by their whitespace-normalised strings (the fallback when equivalence
    cannot finish in time)."""
    groups: dict[str, list[int]] = {}
    for i, ans in enumerate(answers):
        if ans:
            groups.setdefault(normalise(ans), []).append(i)
    return list(groups.values())


@dataclass(frozen=True)
class AnswerVote:
    """One answer group's standing in the vote."""

    answer: str  # the group's representative (its first answer)
    trajectories: int  # trajectories in the group
    vote: float  # the group's vote (sum, count or best score, per the voting rule)
    best_score: float  # its best trajectory's aggregated score (the first tie-break)


@dataclass(frozen=True)
class AnswerChoice:
    answer: str  # the chosen answer ("" when no trajectory gave one)
    best_index: int | None  # index of the trajectory shown as the best one (None if none)
    aggregate_scores: tuple[float, ...]  # per trajectory
    answers: tuple[str, ...]  # extracted answer per trajectory
    # Every answer group, the winner first, then by the vote's own order (vote, best score, first seen).
    ranking: tuple[AnswerVote, ...] = ()

    @property
    def votes(self) -> dict[str, float]:
        """Group representative -> vote total."""
        return {v.answer: v.vote for v in self.ranking}


# A group's place in the vote: (vote, best aggregated score, -first-seen order); higher wins.
_Key = tuple[float, float, int]


def _tally(scores: Sequence[float], groups: Sequence[list[int]], voting: str) -> list[tuple[_Key, list[int]]]:
    """Each group's vote key, in first-seen order (the one ranking ``select_answer`` and
    ``vote_decided`` share)."""
    if voting not in ("weighted_majority", "majority", "best"):
        raise ValueError(f"voting: unknown {voting!r}")
    keyed: list[tuple[_Key, list[int]]] = []
    for order, g in enumerate(groups):
        if voting == "weighted_majority":
            total = float(sum(scores[i] for i in g))
        elif voting == "majority":
            total = float(len(g))
        else:
            total = float(max(scores[i] for i in g))
        keyed.append(((total, float(max(scores[i] for i in g)), -order), g))
    return keyed


def select_answer(
    trajectories: Sequence[Trajectory], voting: str = "weighted_majority", aggregation: str = "last",
    group: Grouping = group_answers,
) -> AnswerChoice:
    """Choose the final answer.

    weighted_majority: equivalent answers pool their trajectories' aggregated scores; majority:
    they pool counts; best: the single highest aggregated score. Ties go to the group whose best
    trajectory scores higher, then to the earlier one. The best trajectory is the highest-scoring
    one inside the winning group (or the highest-scoring overall if no trajectory has an answer).
    ``group`` decides which answers are equivalent.
    """
    if voting not in ("weighted_majority", "majority", "best"):
        raise ValueError(f"voting: unknown {voting!r}")
    scores = tuple(aggregate(t.step_scores, aggregation) for t in trajectories)
    answers = tuple(extract_answer(t.text) for t in trajectories)
    if not trajectories:
        return AnswerChoice("", None, scores, answers)
    groups = group(answers)
    if not groups:
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return AnswerChoice("", best, scores, answers)

    def best_in(g: list[int]) -> int:
        return max(g, key=lambda i: (scores[i], -i))

    keyed = _tally(scores, groups, voting)
    ranked = sorted(keyed, key=lambda kv: kv[0], reverse=True)
    ranking = tuple(AnswerVote(answers[g[0]], len(g), key[0], key[1]) for key, g in ranked)
    best = best_in(ranked[0][1])
    return AnswerChoice(answers[best], best, scores, answers, ranking)


def choose(answers: Sequence[str], scores: Sequence[float], voting: str = "weighted_majority",
           group: Grouping = group_answers) -> str:
    """The answer ``select_answer``'s vote picks from already extracted ``answers`` and aggregated
    ``scores`` (one per trajectory): for voting over another extraction of the same candidates
    (``ets eval``'s flexible extraction). "" when none answered."""
    groups = group(answers)
    if not groups:
        return ""
    winner = max(_tally(scores, groups, voting), key=lambda kv: kv[0])[1]
    return answers[max(winner, key=lambda i: (scores[i], -i))]


def _most_gained(key: _Key, remaining: int, voting: str) -> _Key:
    """The highest key a group can reach when ``remaining`` more trajectories, each with an
    aggregated score in [0, 1], all join it (its first-seen order cannot change)."""
    total, best, order = key
    if remaining <= 0:
        return key
    if voting == "best":
        return (1.0, 1.0, order)  # a max: one trajectory at 1.0 sets it, more add nothing
    if voting == "majority":
        return (total + remaining, 1.0, order)
    # Float sums: the vote adds scores one at a time in trajectory order, and rounding is monotone,
    # so adding 1.0 the same way bounds every continuation exactly.
    for _ in range(remaining):
        total += 1.0
    return (total, 1.0, order)


def vote_decided(scores: Sequence[float], answers: Sequence[str], remaining: int,
                 voting: str = "weighted_majority", group: Grouping = group_answers) -> bool:
    """Whether the vote over these finished trajectories is decided: no ``remaining`` further
    trajectories (at most one per unit of width left), whatever their answers and aggregated
    scores in [0, 1], can change which answer group ``select_answer`` picks.

    ``scores`` / ``answers``: aggregated score and extracted answer of each finished trajectory,
    in the order they finished. The bound per rule (``select_answer``'s order: vote, then the
    group's best score, then the group seen first):

    - weighted_majority (sum of scores): every further trajectory adds at most 1 to one group;
      decided when the leader's key beats every other group's vote plus ``remaining`` (and a new
      answer's ``remaining``), with best score 1.0 at an equal vote, which only a leader whose own
      best is 1.0 and that was seen first survives.
    - majority (counts): the same with counts (each trajectory adds exactly 1).
    - best (a max, not a sum): one further trajectory at 1.0 lifts any group to 1.0, so the "1 per
      trajectory" bound does not apply; decided only when ``remaining`` is 0 or the leader already
      has 1.0 and every group that could tie it comes later.

    Guaranteed: the winning group (its representative answer) is the one the full search would
    pick from these trajectories plus any it could still finish. Not guaranteed: the best
    trajectory and the answer's exact text (a later, higher-scoring member of the same group
    would replace them with an equivalent answer), any other group's standing, the statistics.
    It relies on the grouping treating the earlier trajectories the same in both votes (greedy in
    finishing order, as ``group_answers`` and the string fallback are; a grouping that times out in
    one vote and not in the other can differ). No answer yet: undecided.
    """
    if remaining <= 0:
        return True
    answered = [s for s, a in zip(scores, answers, strict=True) if a]
    if not answered:
        return False
    # Cheap necessary condition before grouping (math-verify): the leader's vote is at most the
    # sum (count) of every answered trajectory's, and it must beat a new answer's ``remaining``.
    if voting == "weighted_majority" and sum(answered) < remaining:
        return False
    if voting == "majority" and len(answered) < remaining:
        return False
    if voting == "best" and max(answered) < 1.0:
        return False
    keyed = _tally(scores, group(answers), voting)
    if not keyed:
        return False
    leader = max(range(len(keyed)), key=lambda i: keyed[i][0])
    lead_key = keyed[leader][0]
    challengers = [key for i, (key, _) in enumerate(keyed) if i != leader]
    challengers.append((0.0, 0.0, -len(keyed)))  # an answer not seen yet: after every group
    return all(_most_gained(key, remaining, voting) < lead_key for key in challengers)
