"""The mixed evaluation set of the grounded-PRM paired run: arithmetic sets and GSM8K-easy, interleaved.

    python bench/data/make_mixed.py --out bench/data/eval_mixed48.jsonl

Takes the first ``--easy`` problems of arith_easy.jsonl, the first ``--chain`` of arith_chain.jsonl
and the first ``--gsm8k`` of gsm8k_easy.jsonl (files in this folder, unchanged), and interleaves
them (two easy, one chain, one GSM8K, repeated), so an evaluation cut off after any number of
problems (it runs problem-major) still covers every set in the same proportion. Deterministic.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def first(name: str, n: int) -> list[dict[str, object]]:
    with open(HERE / name, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) < n:
        raise SystemExit(f"{name} has {len(rows)} problems, {n} asked")
    return rows[:n]


def interleave(easy: list[dict[str, object]], chain: list[dict[str, object]],
               gsm8k: list[dict[str, object]]) -> list[dict[str, object]]:
    """Two easy, one chain, one GSM8K, repeated; what one list runs out of, the others continue."""
    out: list[dict[str, object]] = []
    e, c, g = list(easy), list(chain), list(gsm8k)
    while e or c or g:
        for source, take in ((e, 2), (c, 1), (g, 1)):
            out += source[:take]
            del source[:take]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--easy", type=int, default=24)
    p.add_argument("--chain", type=int, default=12)
    p.add_argument("--gsm8k", type=int, default=12)
    p.add_argument("--out", type=Path, default=HERE / "eval_mixed48.jsonl")
    a = p.parse_args()
    rows = interleave(first("arith_easy.jsonl", a.easy), first("arith_chain.jsonl", a.chain),
                      first("gsm8k_easy.jsonl", a.gsm8k))
    with open(a.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} problems -> {a.out}")


if __name__ == "__main__":
    main()
