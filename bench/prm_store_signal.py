"""The signal table: each rule-based PRM type re-scored on finished candidates already drawn.

    python bench/prm_store_signal.py --out bench/results/prm_store_signal.json

No policy draws: the candidates are the committed ones. Two kinds of source:

- ``--store NAME STORE DATASET``: a paired-evaluation sample store (``ets eval --store``, gzip or
  plain). Its trees are rebuilt from the samples alone: the root is the problem rooted as the search
  roots it (the ``smollm2-instruct`` chat messages, tokenized by the prepared model's own tokenizer,
  trying each ``--instruction`` until the store holds the root's samples: the committed stores
  span an instruction change), each child's prefix is its parent's plus the sample's ids, and each
  node's budget is the loop's ``min(max_step_tokens, max_tokens - tokens so far)``. A node is a
  finished candidate when the loop would finish it (an answer marker, end of sequence, the token
  budget, the depth cap); nodes that were pruned are frontier members but not candidates. One
  problem's candidates are the union over every configuration and width that drew from the store.
- ``--solutions NAME JSON DATASET``: whole sampled solutions (``bench/instruction.py`` rows or
  ``bench/prm_signal.py`` samples), split into steps at the blank line the search steps at.

For each PRM type (``--prm-types``: the rule-based ones, which are free to run here; the model
types need an engine per type and are left to bench/prm_signal.py) and each source:

- AUROC of the last step's score for right against wrong final answers (pooled, with a 95%
  interval from a seeded bootstrap over problems; and the mean within-problem AUROC);
- the weighted vote (the search's ``weighted_majority`` over last-step scores; answers grouped by
  numeric value, the rest by text) against the oracle (a right answer among the candidates),
  re-voted on the same stored candidates: over each problem's whole pool, and as the mean over
  ``--draws`` seeded subsets of ``--widths`` candidates (the size a search's finished set has);
  plain majority, which needs no PRM, beside it;
- the distinct score values a depth's frontier holds (stores only: every node of that depth, over
  all configurations, so a superset of one search's frontier): mean over (problem, depth).

A right answer is one ``ets.evaluation.report.answers_match`` (math-verify) finds equivalent to the
reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from prm_signal import auroc, bootstrap_interval  # noqa: E402

from ets.reward.prm_types import MODEL_FREE_PRM_TYPES  # noqa: E402
from ets.policy.model_types import PolicyModelType  # noqa: E402

# The answer-line instructions the committed stores were drawn under: the current one, and the
# placeholder wording of eval_width (docs/demo.md).
INSTRUCTIONS = (
    'Solve it step by step. End your reply with the sentence "The answer is" followed by the final number.',
    'Solve it step by step. End your reply with "The answer is N." where N is the final number.',
)
DEFAULT_STORES = (
    ("eval_width", "bench/results/eval_width.store.jsonl.gz", "bench/data/arith_easy.jsonl"),
    ("eval_instruction", "bench/results/eval_instruction.store.jsonl.gz", "bench/data/arith_easy.jsonl"),
)
DEFAULT_SOLUTIONS = (
    ("instruction_ab", "bench/results/instruction.json", "bench/data/arith_easy.jsonl,bench/data/gsm8k_easy.jsonl"),
)


@dataclass
class Candidate:
    """One finished trajectory: its plain step texts and whether its answer is right."""

    steps: tuple[str, ...]
    text: str
    answer: str = ""
    right: bool = False


@dataclass
class Problem:
    id: str
    question: str
    reference: str
    candidates: list[Candidate] = field(default_factory=list)
    # depth -> the plain step texts of every node at that depth (the frontier over all configurations)
    frontier: dict[int, list[tuple[str, ...]]] = field(default_factory=dict)


# ---- rebuilding trees from a store (pure) ----------------------------------------------------------
Samples = dict[tuple[str, int], dict[str, Any]]


def read_store(path: Path) -> Samples:
    """(key, k) -> sample row of an ``ets-sample-store`` file (gzip or plain)."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    samples: Samples = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a live run
                if row.get("kind") == "sample":
                    samples[(row["key"], int(row["k"]))] = row
    return samples


def node_samples(samples: Samples, key: str) -> Iterator[dict[str, Any]]:
    k = 0
    while (key, k) in samples:
        yield samples[(key, k)]
        k += 1


def walk(samples: Samples, key_of: Callable[[Sequence[int], int], str], root_ids: Sequence[int],
         model_type: PolicyModelType, *, max_tokens: int, max_step_tokens: int,
         max_depth: int) -> tuple[list[tuple[str, ...]], dict[int, list[tuple[str, ...]]]]:
    """Every finished trajectory (plain step texts) in the store's tree under ``root_ids``, and
    every node's steps by depth. ``key_of(prefix_ids, budget)`` is the store's sample key."""
    finished: list[tuple[str, ...]] = []
    by_depth: dict[int, list[tuple[str, ...]]] = {}
    todo: list[tuple[tuple[int, ...], tuple[str, ...]]] = [(tuple(root_ids), ())]
    while todo:
        prefix, steps = todo.pop()
        budget = min(max_step_tokens, max_tokens - len(prefix))
        if budget <= 0:
            continue
        for row in node_samples(samples, key_of(prefix, budget)):
            ids = prefix + tuple(int(t) for t in row["ids"])
            child = steps + (model_type.plain_step(row["text"]),)
            depth = len(child)
            by_depth.setdefault(depth, []).append(child)
            # The loop's _terminal_reason, then its depth cap.
            if (model_type.has_answer(row["text"]) or row["finish"] == "eos" or len(ids) >= max_tokens
                    or depth >= max_depth):
                finished.append(child)
            else:
                todo.append((ids, child))
    return finished, by_depth


# ---- the vote (pure) ----------------------------------------------------------------------------------
def vote(scores: Sequence[float], groups: Sequence[int | None], voting: str = "weighted_majority") -> int | None:
    """The winning answer group of candidates with these scores and answer groups (None: no
    answer), as ``ets.search.answers.select_answer`` ranks them: the vote (score sum, or count),
    then the best score, then the group seen first."""
    tally: dict[int, list[float]] = {}
    order: dict[int, int] = {}
    for i, (score, group) in enumerate(zip(scores, groups, strict=True)):
        if group is None:
            continue
        order.setdefault(group, i)
        tally.setdefault(group, []).append(score)
    if not tally:
        return None

    def key(g: int) -> tuple[float, float, int]:
        votes = sum(tally[g]) if voting == "weighted_majority" else float(len(tally[g]))
        return (votes, max(tally[g]), -order[g])

    return max(tally, key=key)


def answer_key(answer: str) -> str | None:
    """A canonical key for an answer math-verify reads as one number (its value), else None."""
    from ets.search.answers import _parse

    parsed = _parse(answer, None)
    if not parsed:
        return None
    x = parsed[0]
    if not getattr(x, "is_number", False):
        return None
    try:
        return f"{float(x):.12g}"  # 8, 8.0 and 16/2 alike
    except (TypeError, ValueError):
        return None


def answer_groups(answers: Sequence[str]) -> list[int | None]:
    """Each candidate's answer group (None: no answer). Answers that parse to one number are grouped
    by its value; the others ("90 apples", "N = 3 + 15, which is 18") by their whitespace-free text
    (``group_by_string``, the search's own fallback): the search's pairwise math-verify check took
    minutes per problem over a pool of ~100 distinct answers."""
    from ets.search.answers import group_by_string

    distinct = list(dict.fromkeys(a for a in answers if a))
    of: dict[str, int] = {}
    by_value: dict[str, int] = {}
    rest: list[str] = []
    for a in distinct:
        key = answer_key(a)
        if key is None:
            rest.append(a)
        else:
            of[a] = by_value.setdefault(key, len(by_value))
    for gid, members in enumerate(group_by_string(rest), start=len(by_value)):
        for i in members:
            of[rest[i]] = gid
    return [of.get(a) if a else None for a in answers]


def subset_vote(scores: Sequence[float], groups: Sequence[int | None], right_groups: set[int], width: int,
                draws: int, rng: random.Random, voting: str = "weighted_majority") -> tuple[float, float]:
    """Mean vote accuracy and oracle over ``draws`` random subsets of ``width`` candidates (all of
    them, once, when there are no more)."""
    n = len(scores)
    picks = [list(range(n))] if n <= width else [sorted(rng.sample(range(n), width)) for _ in range(draws)]
    hits = oracle = 0
    for pick in picks:
        won = vote([scores[i] for i in pick], [groups[i] for i in pick], voting)
        hits += won is not None and won in right_groups
        oracle += any(groups[i] in right_groups for i in pick if groups[i] is not None)
    return hits / len(picks), oracle / len(picks)


def distinct_per_frontier(frontier: dict[int, list[tuple[str, ...]]], score: Callable[[tuple[str, ...]], float]
                          ) -> list[tuple[int, int, int]]:
    """(depth, nodes, distinct last-step scores) of each depth with at least two nodes."""
    out = []
    for depth, nodes in sorted(frontier.items()):
        if len(nodes) >= 2:
            out.append((depth, len(nodes), len({score(n) for n in nodes})))
    return out


# ---- loading sources -----------------------------------------------------------------------------------
def read_problems(datasets: str) -> dict[str, dict[str, Any]]:
    """Problems by id from comma-separated JSONL files; ``FILE[a:b]`` keeps lines a..b-1 only."""
    rows: dict[str, dict[str, Any]] = {}
    for spec in datasets.split(","):
        path, lo, hi = spec, None, None
        if spec.endswith("]") and "[" in spec:
            path, window = spec[:-1].split("[", 1)
            lo_s, hi_s = window.split(":", 1)
            lo, hi = int(lo_s) if lo_s else None, int(hi_s) if hi_s else None
        lines = [line for line in (REPO / path).read_text().splitlines() if line.strip()]
        for line in lines[lo:hi]:
            row = json.loads(line)
            rows[row["id"]] = row
    return rows


def store_problems(store: Path, datasets: str, tokenizer: Any, model_path: str, *, max_tokens: int,
                   max_step_tokens: int, max_depth: int, temperature: float) -> list[Problem]:
    from ets.evaluation.store import sample_key
    from ets.policy.model_types import policy_model_type

    samples = read_store(store)
    keys = {key for key, _ in samples}
    base = policy_model_type("smollm2-instruct")
    out: list[Problem] = []
    for pid, row in read_problems(datasets).items():
        for instruction in INSTRUCTIONS:
            mt = dataclasses.replace(base, instruction=instruction)
            ids = tokenizer.apply_chat_template(mt.root_messages(row["problem"]), add_generation_prompt=True,
                                                tokenize=True)
            ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
            identity = f"{model_path}|{mt.name}|stop={list(mt.stop)}|trim={mt.no_stop_trim}"

            def key_of(prefix: Sequence[int], budget: int, identity: str = identity) -> str:
                return sample_key(identity, prefix, budget, temperature)

            if key_of(ids, min(max_step_tokens, max_tokens - len(ids))) in keys:
                finished, by_depth = walk(samples, key_of, ids, mt, max_tokens=max_tokens,
                                          max_step_tokens=max_step_tokens, max_depth=max_depth)
                out.append(Problem(pid, row["problem"], str(row["answer"]),
                                   [Candidate(s, "".join(s)) for s in finished], by_depth))
                break
    return out


def solution_problems(path: Path, datasets: str) -> list[Problem]:
    rows = json.loads(path.read_text())
    solutions = rows.get("rows") or [s for s in rows.get("samples", []) if s.get("kind", "sampled") == "sampled"]
    meta = read_problems(datasets)
    by_id: dict[str, Problem] = {}
    for s in solutions:
        p = meta[s["problem"]]
        prob = by_id.setdefault(s["problem"], Problem(s["problem"], p["problem"], str(p["answer"])))
        steps = tuple(x.strip() for x in s["text"].split("\n\n") if x.strip()) or (s["text"].strip(),)
        prob.candidates.append(Candidate(steps, "\n\n".join(steps)))
    return list(by_id.values())


def label(problems: Sequence[Problem]) -> None:
    """Each candidate's extracted answer and whether it is right (math-verify, cached per answer)."""
    from ets.evaluation.report import answers_match
    from ets.search.answers import extract_answer

    for p in problems:
        cache: dict[str, bool] = {}
        reference = answer_key(p.reference)
        for c in p.candidates:
            c.answer = extract_answer(c.text)
            if c.answer not in cache:
                key = answer_key(c.answer) if c.answer else None
                # Two plain numbers compare by value; anything else goes through math-verify.
                cache[c.answer] = (key == reference if key is not None and reference is not None
                                   else answers_match(c.answer, p.reference))
            c.right = cache[c.answer]


# ---- the table ------------------------------------------------------------------------------------------
def _last_score(prm_type: str, question: str, steps: Sequence[str]) -> float:
    from ets.reward.backends.rules_backend import score_rules

    return score_rules(prm_type, question, steps)[-1]


def measure(problems: Sequence[Problem], prm_types: Sequence[str], widths: Sequence[int], draws: int,
            seed: int) -> dict[str, Any]:
    from ets.reward.backends.rules_backend import score_rules

    result: dict[str, Any] = {
        "problems": len(problems), "candidates": sum(len(p.candidates) for p in problems),
        "right": sum(c.right for p in problems for c in p.candidates),
        "oracle_problems": sum(any(c.right for c in p.candidates) for p in problems), "prm": {},
    }
    groups = {p.id: answer_groups([c.answer for c in p.candidates]) for p in problems}
    rights = {p.id: {g for g, c in zip(groups[p.id], p.candidates, strict=True) if c.right and g is not None}
              for p in problems}
    for prm in (*prm_types, "majority"):
        entry: dict[str, Any] = {}
        scores: dict[str, list[float]] = {}
        for p in problems:
            if prm == "majority":
                scores[p.id] = [1.0] * len(p.candidates)
            else:
                scores[p.id] = [score_rules(prm, p.question, c.steps)[-1] for c in p.candidates]
        voting = "majority" if prm == "majority" else "weighted_majority"
        if prm != "majority":
            per_problem = [[(s, c.right) for s, c in zip(scores[p.id], p.candidates, strict=True)]
                           for p in problems if p.candidates]
            flat = [x for g in per_problem for x in g]
            within = [w for g in per_problem if (w := auroc([s for s, _ in g], [y for _, y in g])) is not None]
            ci = bootstrap_interval(per_problem, seed=seed)
            entry["auroc"] = auroc([s for s, _ in flat], [y for _, y in flat])
            entry["auroc_ci95"] = list(ci) if ci else None
            entry["auroc_within_problem"] = statistics.fmean(within) if within else None
            entry["within_problems"] = len(within)
            entry["distinct_scores"] = len({s for s, _ in flat})
        pool = sum((w := vote(scores[p.id], groups[p.id], voting)) is not None and w in rights[p.id]
                   for p in problems)
        entry["vote_pool"] = pool
        rng = random.Random(seed)
        for width in widths:
            acc = [subset_vote(scores[p.id], groups[p.id], rights[p.id], width, draws, rng, voting)
                   for p in problems if p.candidates]
            entry[f"vote_w{width}"] = statistics.fmean(a for a, _ in acc) if acc else None
            entry[f"oracle_w{width}"] = statistics.fmean(o for _, o in acc) if acc else None
        if prm != "majority" and any(p.frontier for p in problems):
            cells = [cell for p in problems
                     for cell in distinct_per_frontier(p.frontier, functools.partial(_last_score, prm, p.question))]
            entry["frontier_cells"] = len(cells)
            entry["frontier_nodes_mean"] = statistics.fmean(n for _, n, _ in cells) if cells else None
            entry["frontier_distinct_mean"] = statistics.fmean(d for _, _, d in cells) if cells else None
            entry["frontier_distinct_median"] = statistics.median(d for _, _, d in cells) if cells else None
        result["prm"][prm] = entry
    return result


def markdown(results: dict[str, Any], widths: Sequence[int]) -> str:
    head = ("| source | PRM type | problems | candidates (right) | AUROC (95% CI) | within-problem AUROC | "
            "distinct values | " + " | ".join(f"vote / oracle, {w} candidates" for w in widths)
            + " | vote / oracle, whole pool | distinct per frontier (nodes) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, src in results.items():
        for prm, e in src["prm"].items():
            def pct(x: float | None) -> str:
                return "" if x is None else f"{100 * x:.0f}%"
            ci = e.get("auroc_ci95")
            au = "" if e.get("auroc") is None else f"{e['auroc']:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
            within = "" if e.get("auroc_within_problem") is None else \
                f"{e['auroc_within_problem']:.2f} ({e['within_problems']} problems)"
            votes = " | ".join(f"{pct(e[f'vote_w{w}'])} / {pct(e[f'oracle_w{w}'])}" for w in widths)
            frontier = "" if e.get("frontier_distinct_mean") is None else \
                f"{e['frontier_distinct_mean']:.1f} ({e['frontier_nodes_mean']:.0f})"
            lines.append(f"| {name} | {prm} | {src['problems']} | {src['candidates']} ({src['right']}) | {au} | "
                         f"{within} | {e.get('distinct_scores', '')} | {votes} | "
                         f"{e['vote_pool']}/{src['problems']} / {src['oracle_problems']}/{src['problems']} | "
                         f"{frontier} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", nargs=3, action="append", metavar=("NAME", "STORE", "DATASETS"),
                   help="a sample store and its dataset(s), comma-separated, FILE[a:b] for lines a..b-1 "
                        "(default: the committed stores)")
    p.add_argument("--solutions", nargs=3, action="append", metavar=("NAME", "JSON", "DATASETS"),
                   help="whole sampled solutions (default, with no --store: bench/results/instruction.json)")
    p.add_argument("--prm-types", default=",".join(MODEL_FREE_PRM_TYPES))
    p.add_argument("--widths", default="16,64", help="subset sizes re-voted")
    p.add_argument("--draws", type=int, default=200, help="random subsets per problem and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-path", default=None, help="the policy folder (default: the prepared SmolLM2)")
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument("--max-step-tokens", type=int, default=64)
    p.add_argument("--max-depth", type=int, default=6)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "prm_store_signal.json"))
    p.add_argument("--report", metavar="JSON", help="print the table of a results file (no scoring)")
    a = p.parse_args()
    widths = [int(w) for w in a.widths.split(",") if w]
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        print(markdown(saved["sources"], saved["widths"]))
        return
    prm_types = [t for t in a.prm_types.split(",") if t]
    unknown = [t for t in prm_types if t not in MODEL_FREE_PRM_TYPES]
    if unknown:
        raise SystemExit(f"--prm-types: {unknown} are not rule-based (choose from {list(MODEL_FREE_PRM_TYPES)})")
    # The defaults only when neither kind is named.
    named = a.store is not None or a.solutions is not None
    stores = a.store or ([] if named else [list(s) for s in DEFAULT_STORES])
    solutions = a.solutions or ([] if named else [list(s) for s in DEFAULT_SOLUTIONS])
    tokenizer = None
    model_path = a.model_path
    if stores:
        from transformers import AutoTokenizer

        from ets.models import DEFAULT_POLICY_MODEL, prepare_model

        model_path = model_path or str(prepare_model(DEFAULT_POLICY_MODEL))
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name, path, datasets in stores:
        t0 = time.perf_counter()
        problems = store_problems(REPO / path, datasets, tokenizer, str(model_path), max_tokens=a.max_tokens,
                                  max_step_tokens=a.max_step_tokens, max_depth=a.max_depth,
                                  temperature=a.temperature)
        if not problems:
            raise SystemExit(f"{path}: no problem of {datasets} has its root in the store (model path, instruction?)")
        label(problems)
        results[name] = {"kind": "store", "path": path, "datasets": datasets,
                         **measure(problems, prm_types, widths, a.draws, a.seed)}
        timings[name] = time.perf_counter() - t0
        print(f"{name}: {len(problems)} problems, {results[name]['candidates']} candidates "
              f"({timings[name]:.0f}s)", file=sys.stderr, flush=True)
    for name, path, datasets in solutions:
        t0 = time.perf_counter()
        problems = solution_problems(REPO / path, datasets)
        label(problems)
        results[name] = {"kind": "solutions", "path": path, "datasets": datasets,
                         **measure(problems, prm_types, widths, a.draws, a.seed)}
        timings[name] = time.perf_counter() - t0
        print(f"{name}: {len(problems)} problems, {results[name]['candidates']} solutions "
              f"({timings[name]:.0f}s)", file=sys.stderr, flush=True)
    out = {"command": "python bench/prm_store_signal.py " + " ".join(sys.argv[1:]), "widths": widths,
           "draws": a.draws, "seed": a.seed, "timings_s": timings, "sources": results}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(results, widths))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
