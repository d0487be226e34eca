"""Which answer-line instruction the small policy follows: a paired A/B of SmolLM2's wordings.

    python bench/instruction.py --problems 24 --samples 8

The real SmolLM2-135M-Instruct policy (prepared by ``ets models prepare``) samples ``--samples``
whole solutions (temperature 0.7, top-k/top-p off, ``--max-new-tokens``: the CPU stack's
``ETS_SEARCH_MAX_TOKENS`` less the ~70-token chat root) for each problem under each wording, rooted
exactly as the search roots them (the ``smollm2-instruct`` type's chat messages with only the
instruction swapped). Problems: the first ``--problems`` / 2 of the seeded arithmetic set and of the
GSM8K-easy subset (``--data FILE``: the first ``--problems`` of FILE instead). Draws run in process
(transformers ``generate``, the bf16 weights the engine
serves), seeded per problem with the same seed under every wording, so a rerun draws the same
text; SGLang's CPU engine ignores per-request seeds.

Per wording, over every sample: the share with an answer line (``has_answer``: the type's markers),
with a usable answer (``extract_answer`` holds a digit), with the placeholder copied (the answer is
a bare letter such as the instruction's "N"), and right (a usable answer ``equivalent`` to the
reference). Samples
of one problem are not independent, so each rate's 95% interval comes from a seeded bootstrap over
problems, and each wording is compared with the first (``--wordings``' baseline) paired by
problem: the mean per-problem difference with its bootstrap interval.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prm_signal import draw_transformers  # the sibling benchmark's seeded in-process sampler
from ets.search.answers import equivalent, extract_answer

REPO = Path(__file__).resolve().parents[1]
DATASETS = (REPO / "bench" / "data" / "arith_easy.jsonl", REPO / "bench" / "data" / "gsm8k_easy.jsonl")

# The wordings compared, the one in force first (the baseline of the paired differences).
WORDINGS: dict[str, str] = {
    "placeholder-N": 'Solve it step by step. End your reply with "The answer is N." where N is the final number.',
    "sentence-followed-by": ('Solve it step by step. End your reply with the sentence "The answer is" '
                             'followed by the final number.'),
    "then-write": 'Solve it step by step. Then write "The answer is" and the final number.',
    "last-line": 'Solve it step by step. On the last line, write "The answer is" followed by the final number.',
}
# An answer that is one bare letter (the instruction's "N", an "X"): the placeholder, copied.
_PLACEHOLDER = re.compile(r"^[A-Za-z]$")
_DIGIT = re.compile(r"\d")


# ---- pure part ---------------------------------------------------------------------------------

def classify(text: str, reference: str, model_type: Any) -> dict[str, bool]:
    """One sampled solution's labels: answer line, usable (numeric) answer, placeholder, right."""
    answer = extract_answer(text)
    usable = bool(_DIGIT.search(answer))
    return {
        "answer_line": model_type.has_answer(text),
        "usable": usable,
        "placeholder": bool(_PLACEHOLDER.match(answer)),
        "right": usable and equivalent(answer, reference),
    }


def per_problem_rates(rows: Sequence[dict[str, Any]], label: str) -> dict[str, float]:
    """problem id -> share of its samples with ``label``."""
    by_problem: dict[str, list[bool]] = {}
    for row in rows:
        by_problem.setdefault(row["problem"], []).append(bool(row[label]))
    return {p: sum(v) / len(v) for p, v in by_problem.items()}


def bootstrap_mean(values: Sequence[float], *, rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the mean) over a seeded bootstrap of ``values``."""
    if not values:
        raise ValueError("values: empty")
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(rounds))
    return statistics.fmean(values), means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def summarise(rows: Sequence[dict[str, Any]], wordings: Sequence[str],
              labels: Sequence[str] = ("answer_line", "usable", "placeholder", "right")) -> dict[str, Any]:
    """Rates per wording (bootstrap over problems) and paired differences against ``wordings[0]``."""
    out: dict[str, Any] = {}
    base = wordings[0]
    for name in wordings:
        mine = [r for r in rows if r["wording"] == name]
        entry: dict[str, Any] = {"samples": len(mine), "problems": len({r["problem"] for r in mine}),
                                 "mean_tokens": statistics.fmean(r["tokens"] for r in mine) if mine else 0.0}
        for label in labels:
            rates = per_problem_rates(mine, label)
            mean, low, high = bootstrap_mean(list(rates.values()))
            entry[label] = {"rate": mean, "ci95": [low, high]}
            if name != base:
                theirs = per_problem_rates([r for r in rows if r["wording"] == base], label)
                diffs = [rates[p] - theirs[p] for p in rates if p in theirs]
                d, dlow, dhigh = bootstrap_mean(diffs)
                entry[label]["minus_" + base] = {"mean": d, "ci95": [dlow, dhigh], "problems": len(diffs)}
        out[name] = entry
    return out


def table(summary: dict[str, Any], base: str) -> str:
    lines = ["| wording | samples | answer line | usable answer | placeholder copied | right | "
             f"paired vs {base} (pts): answer line, usable, right | mean tokens |", "|---|---|---|---|---|---|---|---|"]

    def pct(cell: dict[str, Any]) -> str:
        return f"{100 * cell['rate']:.0f}% ({100 * cell['ci95'][0]:.0f}-{100 * cell['ci95'][1]:.0f})"

    def diff(cell: dict[str, Any]) -> str:
        d = cell.get("minus_" + base)
        return "" if d is None else f"{100 * d['mean']:+.0f} ({100 * d['ci95'][0]:+.0f} to {100 * d['ci95'][1]:+.0f})"

    for name, e in summary.items():
        paired = "" if name == base else ", ".join(diff(e[k]) for k in ("answer_line", "usable", "right"))
        lines.append(f"| {name} | {e['samples']} | {pct(e['answer_line'])} | {pct(e['usable'])} | "
                     f"{pct(e['placeholder'])} | {pct(e['right'])} | {paired} | {e['mean_tokens']:.0f} |")
    return "\n".join(lines)


# ---- the run -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=24, help="problems in all, half from each dataset")
    p.add_argument("--data", type=Path, help="draw for the first --problems of this JSONL instead of the two sets")
    p.add_argument("--samples", type=int, default=8, help="solutions per problem and wording")
    p.add_argument("--max-new-tokens", type=int, default=250)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    p.add_argument("--wordings", default=",".join(WORDINGS),
                   help=f"comma-separated names, the baseline first (known: {', '.join(WORDINGS)})")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "instruction.json"))
    p.add_argument("--report", metavar="JSON", help="summarise and print the table of a results file (no sampling)")
    return p


def main() -> None:
    args = _parser().parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        names = list(saved["wordings"])
        print(table(summarise(saved["rows"], names), names[0]))
        return
    names = [w.strip() for w in args.wordings.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORDINGS]
    if unknown or not names:
        raise SystemExit(f"--wordings: unknown {unknown} (known: {', '.join(WORDINGS)})")
    import torch

    from ets.models import DEFAULT_POLICY_MODEL, prepare_model
    from ets.policy.model_types import policy_model_type

    torch.set_num_threads(args.threads)
    half = args.problems // 2
    sources = ((args.data, args.problems),) if args.data else zip(DATASETS, (args.problems - half, half), strict=True)
    problems = [json.loads(line) for data, n in sources
                for line in data.read_text().splitlines()[:n] if line.strip()]
    base_type = policy_model_type("smollm2-instruct")
    model = prepare_model(DEFAULT_POLICY_MODEL)
    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    for name in names:
        model_type = dataclasses.replace(base_type, instruction=WORDINGS[name])
        started = time.perf_counter()
        drawn = draw_transformers(model, problems, model_type, args.samples, args.max_new_tokens,
                                  args.temperature, args.seed)
        timings[name] = time.perf_counter() - started
        for problem, (texts, lengths) in zip(problems, drawn, strict=True):
            for k, (text, n_tokens) in enumerate(zip(texts, lengths, strict=True)):
                rows.append({"wording": name, "problem": problem["id"], "k": k, "tokens": n_tokens, "text": text,
                             **classify(text, str(problem["answer"]), model_type)})
        print(f"{name}: {timings[name]:.0f}s", file=sys.stderr, flush=True)
    summary = summarise(rows, names)
    result = {
        "command": "python bench/instruction.py " + " ".join(sys.argv[1:]),
        "model": DEFAULT_POLICY_MODEL, "problems": [p["id"] for p in problems], "samples": args.samples,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
        "wordings": {n: WORDINGS[n] for n in names}, "summary": summary, "timings_s": timings, "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(summary, names[0]))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
