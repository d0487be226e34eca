"""Generate arithmetic word problems with computed answers (seeded): one- and two-step, or chains.

    python bench/data/make_arith.py --seed 0 --count 100 --out bench/data/arith_easy.jsonl
    python bench/data/make_arith.py --kind chain --seed 1 --count 100 --out bench/data/arith_chain.jsonl

A synthetic set for a policy too weak for GSM8K: every problem is an instance of a fixed
template (a name, an item, small random integers) whose answer is computed by the template's
own arithmetic, so every answer is exact and every line reproducible from the seed. Half the
problems take one operation (add, subtract, multiply, divide exactly), half two (a multiply or
divide, then an add or subtract). Each line: ``id``, ``problem``, ``answer``, ``solution``
(GSM8K-style equations), ``steps``.

``--kind chain`` (``arith_chain.jsonl``): harder but still small-number problems, each a chain of
two or three operations on one quantity told as a story (start, then each event changes it),
alternating two- and three-operation chains; every intermediate stays a positive integer.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

NAMES = ("Tom", "Mia", "Sara", "Ben", "Lena", "Omar", "Ravi", "Julia", "Ken", "Ana", "Leo", "Nina")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "cards", "shells", "coins")
CONTAINERS = ("boxes", "bags", "jars", "baskets", "packs")


@dataclass(frozen=True)
class Item:
    problem: str
    answer: int
    solution: str
    steps: int


# (rng, name, item) -> Item: every template tells of a name and an item, drawn by the caller.
Template = Callable[[random.Random, str, str], Item]


def _who(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES), rng.choice(ITEMS)


def add(rng: random.Random, name: str, item: str) -> Item:
    a, b = rng.randint(3, 60), rng.randint(2, 40)
    return Item(f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                a + b, f"{a} + {b} = {a + b}", 1)


def subtract(rng: random.Random, name: str, item: str) -> Item:
    a = rng.randint(20, 90)
    b = rng.randint(2, a - 1)
    return Item(f"{name} had {a} {item} and gave away {b}. How many {item} does {name} have left?",
                a - b, f"{a} - {b} = {a - b}", 1)


def multiply(rng: random.Random, name: str, item: str) -> Item:
    box = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return Item(f"There are {a} {box} with {b} {item} in each. How many {item} are there in total?",
                a * b, f"{a} * {b} = {a * b}", 1)


def divide(rng: random.Random, name: str, item: str) -> Item:
    per, groups = rng.randint(2, 12), rng.randint(2, 9)
    total = per * groups
    return Item(f"{name} shares {total} {item} equally among {groups} friends. How many {item} does each friend get?",
                per, f"{total} / {groups} = {per}", 1)


def multiply_add(rng: random.Random, name: str, item: str) -> Item:
    box = rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    return Item(f"{name} has {a} {box} of {b} {item} and {c} loose {item}. How many {item} does {name} have?",
                a * b + c, f"{a} * {b} = {a * b}\n{a * b} + {c} = {a * b + c}", 2)


def multiply_subtract(rng: random.Random, name: str, item: str) -> Item:
    box = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    c = rng.randint(1, a * b - 1)
    return Item(f"{name} buys {a} {box} with {b} {item} in each and then loses {c} {item}. "
                f"How many {item} does {name} have left?",
                a * b - c, f"{a} * {b} = {a * b}\n{a * b} - {c} = {a * b - c}", 2)


def price_change(rng: random.Random, name: str, item: str) -> Item:
    price, n, paid_extra = rng.randint(2, 9), rng.randint(2, 8), rng.randint(1, 10)
    cost = price * n
    return Item(f"{name} buys {n} {item} at {price} dollars each and pays with {cost + paid_extra} dollars. "
                f"How many dollars of change does {name} get?",
                paid_extra, f"{n} * {price} = {cost}\n{cost + paid_extra} - {cost} = {paid_extra}", 2)


def divide_add(rng: random.Random, name: str, item: str) -> Item:
    per, groups, extra = rng.randint(2, 10), rng.randint(2, 6), rng.randint(1, 15)
    total = per * groups
    return Item(f"{name} splits {total} {item} equally into {groups} piles, then adds {extra} {item} to one pile. "
                f"How many {item} are in that pile now?",
                per + extra, f"{total} / {groups} = {per}\n{per} + {extra} = {per + extra}", 2)


ONE_STEP: tuple[Template, ...] = (add, subtract, multiply, divide)
TWO_STEP: tuple[Template, ...] = (multiply_add, multiply_subtract, price_change, divide_add)


# ---- chains: one quantity changed by 2-3 events -----------------------------------------------

def _event(rng: random.Random, value: int, name: str, item: str) -> tuple[str, str, int]:
    """One event applied to ``value``: (sentence, equation, new value); intermediates stay positive."""
    kinds = ["gain", "lose", "double"] + (["halve"] if value % 2 == 0 and value >= 4 else [])
    kind = rng.choice(kinds if value <= 40 else ["lose", "gain"] + (["halve"] if value % 2 == 0 else []))
    if kind == "gain":
        b = rng.randint(2, 20)
        return f"Then {name} gets {b} more {item}.", f"{value} + {b} = {value + b}", value + b
    if kind == "lose":
        b = rng.randint(2, value - 1) if value > 3 else 1
        return f"Then {name} gives away {b} {item}.", f"{value} - {b} = {value - b}", value - b
    if kind == "double":
        return f"Then the number of {item} doubles.", f"{value} * 2 = {value * 2}", value * 2
    return f"Then {name} gives away half of the {item}.", f"{value} / 2 = {value // 2}", value // 2


def chain(rng: random.Random, operations: int) -> Item:
    """A start (a count, or groups of a size: one more operation), then events until ``operations``."""
    name, item = _who(rng)
    if rng.random() < 0.5:
        box = rng.choice(CONTAINERS)
        a, b = rng.randint(2, 6), rng.randint(2, 9)
        value, text, eqs = a * b, [f"{name} has {a} {box} with {b} {item} in each."], [f"{a} * {b} = {a * b}"]
    else:
        value = rng.randint(5, 40)
        text, eqs = [f"{name} has {value} {item}."], []
    while len(eqs) < operations:
        sentence, eq, value = _event(rng, value, name, item)
        text.append(sentence)
        eqs.append(eq)
    text.append(f"How many {item} does {name} have now?")
    return Item(" ".join(text), value, "\n".join(eqs), operations)


def generate_chain(seed: int, count: int) -> list[dict[str, object]]:
    """``count`` chain problems, alternating two and three operations, deterministic in ``seed``."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for i in range(count):
        item = chain(rng, 2 if i % 2 == 0 else 3)
        rows.append({"id": f"chain-{seed}-{i}", "problem": item.problem, "answer": str(item.answer),
                     "solution": item.solution, "steps": item.steps})
    return rows


def generate(seed: int, count: int) -> list[dict[str, object]]:
    """``count`` problems, alternating one- and two-step, deterministic in ``seed``."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for i in range(count):
        template = rng.choice(ONE_STEP if i % 2 == 0 else TWO_STEP)
        item = template(rng, *_who(rng))
        rows.append({"id": f"arith-{seed}-{i}", "problem": item.problem, "answer": str(item.answer),
                     "solution": item.solution, "steps": item.steps})
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("easy", "chain"), default="easy",
                   help="easy: one- and two-step templates (arith_easy); chain: 2-3 operation chains")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="default: arith_easy.jsonl / arith_chain.jsonl here")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be at least 1")
    rows = generate_chain(args.seed, args.count) if args.kind == "chain" else generate(args.seed, args.count)
    if args.out is None:
        args.out = Path(__file__).with_name("arith_chain.jsonl" if args.kind == "chain" else "arith_easy.jsonl")
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} problems (seed {args.seed}) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
