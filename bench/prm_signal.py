"""Which PRM types give signal on real text: AUROC of step-score aggregates on sampled solutions.

    python bench/prm_signal.py --problems 12 --samples 8 --max-new-tokens 160

The real SmolLM2-135M-Instruct policy (prepared by ``ets models prepare``) samples ``--samples``
whole solutions per problem (temperature 0.7) for the first ``--problems`` problems of ``--data``
(default: the easiest GSM8K test problems, bench/data/gsm8k_easy.jsonl), rooted as the search
roots them (the policy model type's chat formatting; ``--system-prompt own`` keeps the chat
template's own system prompt instead of the type's). Each solution is split into steps at the
type's delimiter ("\\n\\n") and labelled right when its extracted answer (``ets.search.answers``)
equals the reference.

Sampler: ``--sampler transformers`` (default) draws in process with ``generate``, seeded per
problem; ``--sampler sglang`` draws from an SGLang CPU engine (started here with the project's
CPU flags, ``--sleep-on-idle`` included, or ``--policy-url``), unseeded (the CPU engine cannot
honour per-request seeds). Same weights either way. The default is the in-process one because on
this shared 2-core host (load average 10-18 while the team worked) the engine drew 8 x 40 tokens
in 250 s and transformers with one torch thread in 26 s (with two threads: 207 s, the OpenMP
threads spin against the other processes); ``--threads`` (1) sets this process's torch threads.

Every PRM type scores every step of every solution (in process, the same backend code the reward
server runs; an engine is stopped first): ``judge`` on the same SmolLM2 (transformers backend,
``--judge-dtype`` float32 by default), ``arithmetic`` (rules, no model) and the random-weight
tiny ``math-shepherd`` PRM the tests use (a no-signal baseline). For each type and aggregate
(last, min, mean of a solution's step scores) the AUROC of "right" against "wrong":
- ``pooled``: over all solutions, with a 95% interval from a seeded bootstrap over problems;
- ``within_problem``: the mean AUROC over problems that have both right and wrong solutions
  (what choosing among one problem's candidates needs; problem difficulty cannot help);
- ``answered_only``: pooled over solutions that state an answer at all.
AUROC 0.5 is no signal; ties count half. The JSON keeps every solution's label, answer and step
scores, so other views can be computed from it.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
_ANNOTATION = re.compile(r"<<[^<>]*>>")
DEFAULT_DATA = REPO / "bench" / "data" / "gsm8k_easy.jsonl"
AGGREGATES = ("last", "min", "mean")
# Which solutions each AUROC view compares: the policy's own (labelled by their extracted answer),
# the reference against the policy's, and the reference against its off-by-one copy.
VIEWS: dict[str, tuple[str, ...]] = {
    "sampled": ("sampled",),
    "reference_vs_sampled": ("reference", "sampled"),
    "reference_vs_corrupted": ("reference", "corrupted"),
}
PRMS = ("judge", "arithmetic", "tiny-math-shepherd")


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting half
    (Mann-Whitney U / (n_pos * n_neg)); None without both classes."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    # Average ranks over the pooled scores (ties share their mean rank).
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def bootstrap_interval(groups: Sequence[Sequence[tuple[float, bool]]], *, rounds: int = 1000,
                       seed: int = 0) -> tuple[float, float] | None:
    """95% percentile interval of the pooled AUROC, resampling whole problems (a problem's
    solutions are not independent of each other)."""
    rng = random.Random(seed)
    values = []
    for _ in range(rounds):
        picked = [groups[rng.randrange(len(groups))] for _ in groups]
        flat = [x for g in picked for x in g]
        value = auroc([s for s, _ in flat], [y for _, y in flat])
        if value is not None:
            values.append(value)
    if len(values) < rounds // 2:
        return None
    values.sort()
    return values[int(0.025 * len(values))], values[min(len(values) - 1, int(0.975 * len(values)))]


def summarise(samples: list[dict[str, Any]], prm: str, how: str,
              kinds: Sequence[str] = ("sampled",)) -> dict[str, Any]:
    """The three AUROC views of one PRM type and aggregate over the labelled solutions of ``kinds``."""
    from ets.search.answers import aggregate

    samples = [s for s in samples if s.get("kind", "sampled") in kinds]
    by_problem: dict[str, list[tuple[float, bool]]] = {}
    for s in samples:
        by_problem.setdefault(s["problem"], []).append((aggregate(s["scores"][prm], how), s["right"]))
    flat = [x for g in by_problem.values() for x in g]
    within = [w for g in by_problem.values() if (w := auroc([v for v, _ in g], [y for _, y in g])) is not None]
    answered = [(aggregate(s["scores"][prm], how), s["right"]) for s in samples if s["answer"]]
    interval = bootstrap_interval(list(by_problem.values()))
    return {
        "pooled": auroc([v for v, _ in flat], [y for _, y in flat]),
        "pooled_ci95": list(interval) if interval else None,
        "within_problem": statistics.fmean(within) if within else None,
        "within_problems": len(within),
        "answered_only": auroc([v for v, _ in answered], [y for _, y in answered]),
    }


def reference_steps(solution: str) -> list[str]:
    """A dataset's reference solution as steps: one per line, GSM8K's ``<<...>>`` calculator
    annotations removed (the visible equations stay), so it reads like written text."""
    return [s for s in (_ANNOTATION.sub("", line).strip() for line in solution.splitlines()) if s]


def corrupt(steps: Sequence[str], answer: str) -> list[str] | None:
    """The reference with its final result made wrong: the last occurrence of the answer in the
    last step becomes answer + 1 (so an equation producing it no longer holds); None if absent."""
    matches = list(re.finditer(rf"(?<![\d.,]){re.escape(answer)}(?![\d]|\.\d)", steps[-1]))
    if not matches or not re.fullmatch(r"-?\d+", answer):
        return None
    m = matches[-1]
    return [*steps[:-1], steps[-1][: m.start()] + str(int(answer) + 1) + steps[-1][m.end():]]


def split_steps(text: str, model_type: Any) -> list[str]:
    """A whole sampled solution as the search's steps: cut at the delimiter, empty pieces dropped."""
    delimiter = model_type.stop[0]
    steps = [model_type.plain_step(p) for p in text.split(delimiter)]
    return [s for s in steps if s] or [text.strip()]


async def sample_solutions(policy_url: str, problems: Sequence[dict[str, Any]], model_type: Any, samples: int,
                           max_new_tokens: int, temperature: float, concurrency: int) -> list[list[str]]:
    from ets.policy.client import PolicyClient, SamplingParams
    from ets.policy.generator import tokenize_root

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    gate = asyncio.Semaphore(concurrency)
    async with PolicyClient(policy_url) as client:
        async def one(problem: dict[str, Any]) -> list[str]:
            async with gate:
                root = await tokenize_root(client, problem["problem"], model_type)
                drawn = await client.generate_one(root.prompt_ids, params, n=samples)
                print(f"  sampled {problem['id']}", file=sys.stderr, flush=True)
                return [d.text for d in drawn]

        return list(await asyncio.gather(*(one(p) for p in problems)))


def draw_transformers(model_dir: Path, problems: Sequence[dict[str, Any]], model_type: Any, samples: int,
                      max_new_tokens: int, temperature: float, seed: int) -> list[tuple[list[str], list[int]]]:
    """Per problem, ``samples`` whole solutions and their generated token counts, drawn in process
    (transformers ``generate``, the prepared bf16 weights the engine serves) and seeded per problem,
    so a rerun draws the same solutions. Rooted as the search roots them (the type's chat messages)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out: list[tuple[list[str], list[int]]] = []
    for i, problem in enumerate(problems):
        text = tok.apply_chat_template(model_type.root_messages(problem["problem"]), tokenize=False,
                                       add_generation_prompt=True)
        ids = tok([text] * samples, return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(seed + i)
        with torch.inference_mode():
            drawn = model.generate(**ids, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
        rows = [row[ids["input_ids"].shape[1]:] for row in drawn]
        # generate pads finished rows with the end token: what is not padding was generated.
        lengths = [int((row != tok.eos_token_id).sum()) for row in rows]
        out.append(([str(tok.decode(row, skip_special_tokens=True)) for row in rows], lengths))
        print(f"  sampled {problem['id']}", file=sys.stderr, flush=True)
    return out


async def score_with_backend(backend: Any, samples: list[dict[str, Any]], name: str, chunk: int = 16) -> float:
    """Every step score of every sample from a started model backend; returns the seconds taken."""
    started = time.perf_counter()
    for i in range(0, len(samples), chunk):
        part = samples[i: i + chunk]
        encoded = [backend.adapter.encode(s["question"], s["steps"]) for s in part]
        outcome = await backend.score(encoded, last_step_only=False)
        for s, scores in zip(part, outcome.scores, strict=True):
            s["scores"][name] = [round(x, 6) for x in scores]
        print(f"  {name}: {min(i + chunk, len(samples))}/{len(samples)}", file=sys.stderr, flush=True)
    return time.perf_counter() - started


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL with id, problem, answer")
    p.add_argument("--problems", type=int, default=12)
    p.add_argument("--samples", type=int, default=8, help="solutions per problem")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--policy-model-type", default="llama-instruct")
    p.add_argument("--system-prompt", choices=("own", "model-type"), default="own",
                   help="own: the chat template's default system prompt; model-type: the type's")
    p.add_argument("--sampler", choices=("transformers", "sglang"), default="transformers",
                   help="who draws the solutions: in process, or an SGLang CPU engine (see the docstring)")
    p.add_argument("--policy-url", help="sglang sampler: a server already serving SmolLM2 (else one is started)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (scoring, sampling)")
    p.add_argument("--judge-dtype", default="float32")
    p.add_argument("--concurrency", type=int, default=16, help="problems sampled at once")
    p.add_argument("--engine-max-total-tokens", type=int, default=40000,
                   help="KV pool of the started engine: every problem's samples decode in one batch")
    p.add_argument("--seed", type=int, default=0, help="engine --random-seed and bootstrap seed")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "prm_signal.json"))
    return p


async def _sample_on_engine(args: argparse.Namespace, model: Path, problems: Sequence[dict[str, Any]],
                            model_type: Any) -> list[list[str]]:
    """The sglang sampler: an attached server (``--policy-url``) or an engine started and stopped here."""
    engine = None
    url = args.policy_url
    if not url:
        from ets.engine.launcher import LaunchConfig
        from ets.engine.process import free_port, start_server

        # The CPU default pool (8192 tokens) would queue most of the batch; SmolLM2's KV is ~23 kB a
        # token in bf16, so 40000 tokens is under 1 GB.
        config = LaunchConfig(model_path=str(model), host="127.0.0.1", port=free_port(), device="cpu",
                              random_seed=args.seed, max_total_tokens=args.engine_max_total_tokens,
                              mem_fraction_static=0.15)
        engine = start_server(config, log_path=Path(tempfile.gettempdir()) / "prm-signal-policy.log",
                              name="prm-signal-policy", timeout=900)
        url = engine.url
    try:
        return await sample_solutions(url, problems, model_type, args.samples, args.max_new_tokens,
                                      args.temperature, args.concurrency)
    finally:
        if engine is not None:
            engine.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from ets.policy.model_types import policy_model_type
    from ets.models import DEFAULT_POLICY_MODEL, prepare_model
    from ets.reward.backends.transformers_backend import TransformersBackend
    from ets.reward.rules import score_steps
    from ets.search.answers import equivalent, extract_answer
    from ets.testing.tiny_models import make_tiny_model

    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"--data: {data} does not exist")
    problems = [json.loads(line) for line in data.read_text().splitlines() if line.strip()][: args.problems]
    model_type = policy_model_type(args.policy_model_type)
    if args.system_prompt == "own":
        model_type = dataclasses.replace(model_type, system_prompt=None)
    model = prepare_model(DEFAULT_POLICY_MODEL)
    timings: dict[str, float] = {}

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.sampler == "transformers":
        texts = [solutions for solutions, _ in draw_transformers(model, problems, model_type, args.samples,
                                                                  args.max_new_tokens, args.temperature, args.seed)]
    else:
        texts = await _sample_on_engine(args, model, problems, model_type)
    timings["sampling_s"] = time.perf_counter() - started

    samples: list[dict[str, Any]] = []
    for problem, drawn in zip(problems, texts, strict=True):
        for text in drawn:
            answer = extract_answer(text)
            samples.append({
                "problem": problem["id"], "question": problem["problem"], "steps": split_steps(text, model_type),
                "answer": answer, "right": bool(answer) and equivalent(answer, str(problem["answer"])),
                "scores": {}, "kind": "sampled", "text": text,
            })
        # Controls with known labels: the reference solution (right) and the same with its final
        # result off by one (wrong), when the dataset has references.
        if problem.get("solution"):
            steps = reference_steps(problem["solution"])
            gold = str(problem["answer"])
            samples.append({"problem": problem["id"], "question": problem["problem"], "steps": steps,
                            "answer": gold, "right": True, "scores": {}, "kind": "reference",
                            "text": "\n".join(steps)})
            wrong = corrupt(steps, gold) if steps else None
            if wrong is not None:
                samples.append({"problem": problem["id"], "question": problem["problem"], "steps": wrong,
                                "answer": str(int(gold) + 1), "right": False, "scores": {}, "kind": "corrupted",
                                "text": "\n".join(wrong)})

    started = time.perf_counter()
    for s in samples:
        s["scores"]["arithmetic"] = score_steps(s["steps"])
    timings["arithmetic_s"] = time.perf_counter() - started

    judge = TransformersBackend(str(model), "judge", dtype=args.judge_dtype)
    await judge.start()
    try:
        timings["judge_s"] = await score_with_backend(judge, samples, "judge")
    finally:
        await judge.close()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = TransformersBackend(str(make_tiny_model(Path(tmp) / "prm", "math-shepherd")), "math-shepherd")
        await tiny.start()
        try:
            timings["tiny_math_shepherd_s"] = await score_with_backend(tiny, samples, "tiny-math-shepherd")
        finally:
            await tiny.close()

    sampled = [s for s in samples if s["kind"] == "sampled"]
    right = [s for s in sampled if s["right"]]
    by_problem = {p["id"]: [s["right"] for s in sampled if s["problem"] == p["id"]] for p in problems}
    return {
        "command": "python bench/prm_signal.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "policy_model": DEFAULT_POLICY_MODEL,
        "data": str(data.relative_to(REPO) if data.is_relative_to(REPO) else data),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "policy_url")},
        "counts": {
            "problems": len(problems), "solutions": len(sampled), "right": len(right),
            "answered": sum(1 for s in sampled if s["answer"]),
            "problems_with_a_right_solution": sum(1 for v in by_problem.values() if any(v)),
            "mean_steps": statistics.fmean(len(s["steps"]) for s in sampled),
            "references": sum(1 for s in samples if s["kind"] == "reference"),
            "corrupted_references": sum(1 for s in samples if s["kind"] == "corrupted"),
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "auroc": {view: {prm: {how: summarise(samples, prm, how, kinds) for how in AGGREGATES} for prm in PRMS}
                  for view, kinds in VIEWS.items()},
        "samples": [{k: s[k] for k in ("problem", "kind", "right", "answer", "scores", "text")}
                    | {"steps": len(s["steps"])} for s in samples],
    }


def main() -> None:
    args = _parser().parse_args()
    # SIGTERM unwinds like Ctrl-C, so the engine started here is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = asyncio.run(run(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    counts = result["counts"]
    print(f"{counts['solutions']} solutions of {counts['problems']} problems, {counts['right']} right, "
          f"{counts['answered']} answered; timings {result['timings_s']}")
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    for view, per_prm in result["auroc"].items():
        print(f"{view}\n  {'PRM':<20}{'agg':<6}{'pooled':>8}  {'95% CI':<14}{'within':>8}{'answered':>10}")
        for prm, per in per_prm.items():
            for how, r in per.items():
                ci = "-" if not r["pooled_ci95"] else f"{r['pooled_ci95'][0]:.2f}-{r['pooled_ci95'][1]:.2f}"
                print(f"  {prm:<20}{how:<6}{fmt(r['pooled']):>8}  {ci:<14}{fmt(r['within_problem']):>8}"
                      f"{fmt(r['answered_only']):>10}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
