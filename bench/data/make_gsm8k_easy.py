"""Select the easiest GSM8K test problems (fewest solution steps) into ``gsm8k_easy.jsonl``.

    python bench/data/make_gsm8k_easy.py --source ../shared/data/gsm8k/test.jsonl \\
        --count 100 --out bench/data/gsm8k_easy.jsonl

GSM8K (Cobbe et al. 2021, https://github.com/openai/grade-school-math, MIT licence: LICENSE.gsm8k
beside this file) writes one calculator annotation ``<<a*b=c>>`` per arithmetic step of its
reference solution, one line per step (some steps are left unannotated). A problem's step count
is the larger of its annotation and line counts; problems are ranked by (steps, problem length,
source order), so the selection is deterministic. Each output line keeps ``id``, ``problem``, ``answer``
and ``solution`` from the source and adds ``steps``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def solution_steps(solution: str) -> int:
    """Steps of a GSM8K reference solution: the larger of its calculator annotations and lines."""
    lines = len([line for line in solution.strip().splitlines() if line.strip()])
    return max(1, solution.count("<<"), lines)


def easiest(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    def key(item: tuple[int, dict[str, Any]]) -> tuple[int, int, int]:
        order, row = item
        return solution_steps(row["solution"]), len(row["problem"]), order

    ranked = sorted(enumerate(rows), key=key)
    return [{"id": r["id"], "problem": r["problem"], "answer": str(r["answer"]), "solution": r["solution"],
             "steps": solution_steps(r["solution"])} for _, r in ranked[:count]]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="GSM8K test JSONL (id, problem, answer, solution)")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("gsm8k_easy.jsonl"))
    args = p.parse_args(argv)
    rows = []
    with open(args.source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                missing = [k for k in ("id", "problem", "answer", "solution") if k not in row]
                if missing:
                    print(f"{args.source}:{lineno}: field {missing[0]!r} missing", file=sys.stderr)
                    return 2
                rows.append(row)
    picked = easiest(rows, args.count)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in picked:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    steps = [r["steps"] for r in picked]
    print(f"{len(picked)} of {len(rows)} problems -> {args.out} (steps {min(steps)}-{max(steps)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
