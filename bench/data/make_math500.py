"""Copy MATH-500 into ``math500.jsonl``: the 500 MATH test problems of OpenAI's PRM800K split.

    python bench/data/make_math500.py --source ../shared/data/math500/test.jsonl --out bench/data/math500.jsonl

MATH (Hendrycks et al. 2021) and the PRM800K split (OpenAI 2023) are MIT-licensed: LICENSE.math500
beside this file. This is the set the ETS paper (Hooper et al. 2025) and REBASE report on. Each
output line keeps ``id`` (MATH's own path, e.g. ``test/precalculus/807.json``), ``problem``,
``answer`` (the ``\\boxed{}`` content of the reference solution, LaTeX as MATH writes it),
``subject`` and ``level`` (1-5), in source order; the worked ``solution`` is left out (the search
never sees it, and grading needs only the answer).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

FIELDS = ("id", "problem", "answer", "subject", "level")


def select(row: dict[str, Any], lineno: int) -> dict[str, Any]:
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ValueError(f"line {lineno}: field {missing[0]!r} missing")
    return {f: row[f] for f in FIELDS}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="PRM800K math_splits/test.jsonl (MATH-500)")
    p.add_argument("--out", default="bench/data/math500.jsonl")
    args = p.parse_args(argv)
    rows = [select(json.loads(line), n) for n, line in
            enumerate(Path(args.source).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} problems -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
