"""``ets eval``: accuracy and efficiency of methods and widths over a JSONL dataset.

    ets eval bench/data/gsm8k_sample.jsonl --addr localhost:50051 --methods ets,rebase \\
        --widths 16,64 --concurrency 4 --out results.json --plot accuracy_vs_kv.png

Each line is a problem with ``problem`` (or ``question``) and ``answer`` fields (MATH500 /
GSM8K; a GSM8K ``answer`` ending in ``#### 42`` is reduced to ``42``). Every (method, width)
runs every problem through the search service (``--concurrency`` searches in flight). A
prediction is correct when it is mathematically equivalent to the reference
(``ets.search.answers``: normalisation, then a symbolic check). Results (per problem and per
method/width: accuracy, mean and peak logical KV tokens, generated/prompt/cached tokens, wall
time) go to ``--out``; ``--plot`` draws accuracy against mean KV tokens, one line per method
with one point per width, like the paper's figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import grpc

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.security import ClientSecurity
from ets.security import channel as secure_channel
from ets.service.client import (
    DEFAULT_ADDR,
    add_config_flags,
    add_security_flags,
    channel_options,
    config_from_args,
    security_from_args,
)


class DatasetError(ValueError):
    """A dataset line that cannot be used (names the line and the field)."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


def load_dataset(path: str | Path, limit: int | None = None) -> list[Problem]:
    problems: list[Problem] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{lineno}: not JSON: {err}") from None
            text = row.get("problem", row.get("question"))
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f"{path}:{lineno}: field 'problem' (or 'question') missing or empty")
            answer = row.get("answer")
            if answer is None:
                raise DatasetError(f"{path}:{lineno}: field 'answer' missing")
            answer = str(answer)
            if "####" in answer:  # GSM8K: worked solution, then "#### <final answer>"
                answer = answer.rsplit("####", 1)[1].strip()
            problems.append(Problem(str(row.get("id", row.get("unique_id", lineno))), text, answer))
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise DatasetError(f"{path}: no problems")
    return problems


def answers_match(predicted: str, reference: str) -> bool:
    """Mathematical equivalence of a predicted and a reference answer (ets.search.answers)."""
    if not predicted.strip():
        return False
    from ets.search import answers

    return bool(answers.equivalent(predicted, reference))


@dataclass
class ProblemResult:
    id: str
    method: str
    width: int
    reference: str
    answer: str = ""
    correct: bool = False
    error: str = ""
    total_kv_tokens: int = 0
    peak_kv_tokens: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    model_calls: int = 0
    depth_reached: int = 0
    wall_seconds: float = 0.0
    selection_seconds: float = 0.0
    policy_seconds: float = 0.0
    reward_seconds: float = 0.0
    candidates: int = 0


@dataclass
class Summary:
    method: str
    width: int
    problems: int
    errors: int
    accuracy: float
    mean_total_kv_tokens: float
    mean_peak_kv_tokens: float
    mean_generated_tokens: float
    cache_reuse: float  # cached / prompt tokens, over all searches
    mean_wall_seconds: float
    generated_tokens_per_second: float  # generated tokens / summed search wall time
    extra: dict[str, float] = field(default_factory=dict)


def summarise(results: Sequence[ProblemResult]) -> list[Summary]:
    groups: dict[tuple[str, int], list[ProblemResult]] = {}
    for r in results:
        groups.setdefault((r.method, r.width), []).append(r)
    out = []
    for (method, width), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.error]
        mean = (lambda xs: statistics.fmean(xs) if xs else 0.0)
        prompt = sum(r.prompt_tokens for r in ok)
        wall = sum(r.wall_seconds for r in ok)
        out.append(Summary(
            method=method, width=width, problems=len(rs), errors=len(rs) - len(ok),
            accuracy=sum(r.correct for r in rs) / len(rs),
            mean_total_kv_tokens=mean([r.total_kv_tokens for r in ok]),
            mean_peak_kv_tokens=mean([r.peak_kv_tokens for r in ok]),
            mean_generated_tokens=mean([r.generated_tokens for r in ok]),
            cache_reuse=sum(r.cached_prompt_tokens for r in ok) / prompt if prompt else 0.0,
            mean_wall_seconds=mean([r.wall_seconds for r in ok]),
            generated_tokens_per_second=sum(r.generated_tokens for r in ok) / wall if wall else 0.0,
        ))
    return out


async def _one(stub: search_pb2_grpc.SearchServiceStub, problem: Problem, method: str, width: int,
               base: search_pb2.SearchConfig, timeout: float) -> ProblemResult:
    config = search_pb2.SearchConfig()
    config.CopyFrom(base)
    config.method, config.width = method, width
    result = ProblemResult(id=problem.id, method=method, width=width, reference=problem.answer)
    try:
        response = await stub.Search(
            search_pb2.SearchRequest(problem=problem.problem, config=config, request_id=f"eval-{problem.id}"),
            timeout=timeout)
    except grpc.aio.AioRpcError as err:
        result.error = f"{err.code().name}: {err.details()}"
        return result
    s = response.stats
    result.answer = response.answer
    result.correct = await asyncio.to_thread(answers_match, response.answer, problem.answer)
    for name in ("total_kv_tokens", "peak_kv_tokens", "generated_tokens", "prompt_tokens", "cached_prompt_tokens",
                 "model_calls", "depth_reached", "wall_seconds", "selection_seconds", "policy_seconds",
                 "reward_seconds"):
        setattr(result, name, getattr(s, name))
    result.candidates = len(response.candidates)
    return result


async def evaluate(addr: str, problems: Sequence[Problem], methods: Sequence[str], widths: Sequence[int],
                   base: search_pb2.SearchConfig, *, concurrency: int = 4, timeout: float = 600.0,
                   progress: bool = True, security: ClientSecurity | None = None) -> list[ProblemResult]:
    """Run every (method, width, problem) through the service with ``concurrency`` in flight."""
    from tqdm import tqdm

    jobs = [(m, w, p) for m in methods for w in widths for p in problems]
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(jobs), desc="eval", unit="search", disable=not progress, file=sys.stderr)
    async with secure_channel(addr, security, options=channel_options(3)) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)

        async def run(job: tuple[str, int, Problem]) -> ProblemResult:
            method, width, problem = job
            async with gate:
                result = await _one(stub, problem, method, width, base, timeout)
            bar.update(1)
            bar.set_postfix_str(f"{method}/w{width}")
            return result

        try:
            results = await asyncio.gather(*(run(j) for j in jobs))
        finally:
            bar.close()
    return list(results)


def plot(summaries: Sequence[Summary], path: str | Path, title: str = "") -> None:
    """Accuracy against mean total logical KV tokens; one line per method, a point per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in sorted({s.method for s in summaries}):
        pts = sorted((s for s in summaries if s.method == method), key=lambda s: s.width)
        xs = [s.mean_total_kv_tokens for s in pts]
        ys = [100 * s.accuracy for s in pts]
        ax.plot(xs, ys, marker="o", label=method)
        for s, x, y in zip(pts, xs, ys):
            ax.annotate(f"w{s.width}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("mean total KV tokens per search (logical, sum over selections)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy vs KV cache size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(summaries: Sequence[Summary]) -> str:
    head = (f"{'method':<10} {'width':>5} {'n':>4} {'err':>4} {'acc':>6} {'KV total':>10} {'KV peak':>9} "
            f"{'gen tok':>8} {'reuse':>6} {'wall s':>7} {'tok/s':>7}")
    rows = [head, "-" * len(head)]
    for s in summaries:
        rows.append(f"{s.method:<10} {s.width:>5} {s.problems:>4} {s.errors:>4} {100 * s.accuracy:>5.1f}% "
                    f"{s.mean_total_kv_tokens:>10.0f} {s.mean_peak_kv_tokens:>9.0f} {s.mean_generated_tokens:>8.0f} "
                    f"{100 * s.cache_reuse:>5.1f}% {s.mean_wall_seconds:>7.2f} {s.generated_tokens_per_second:>7.1f}")
    return "\n".join(rows)


def _csv(value: str, kind: type) -> list[Any]:
    return [kind(v.strip()) for v in value.split(",") if v.strip()]


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="ets eval", description="evaluate methods and widths over a JSONL dataset")
    parser.add_argument("dataset", help="JSONL file with problem/answer fields")
    parser.add_argument("--addr", default=os.environ.get("ETS_SEARCH_ADDR", DEFAULT_ADDR))
    parser.add_argument("--methods", default="ets,rebase", help="comma-separated methods")
    parser.add_argument("--widths", default="16", help="comma-separated widths")
    parser.add_argument("--limit", type=int, default=None, help="first N problems only")
    parser.add_argument("--concurrency", type=int, default=4, help="searches in flight")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline per search (s)")
    parser.add_argument("--out", default="eval-results.json", help="results JSON path")
    parser.add_argument("--plot", default=None, help="PNG path for accuracy vs KV tokens")
    parser.add_argument("--no-progress", action="store_true")
    add_security_flags(parser)
    add_config_flags(parser)
    args = parser.parse_args(list(argv))
    security = security_from_args(parser, args)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    try:
        methods, widths = _csv(args.methods, str), _csv(args.widths, int)
    except ValueError:
        parser.error("--widths must be comma-separated integers")
    if not methods or not widths:
        parser.error("--methods and --widths must each name at least one value")
    try:
        problems = load_dataset(args.dataset, args.limit)
    except (OSError, DatasetError) as err:
        print(f"ets eval: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    base = config_from_args(args)
    started = time.perf_counter()
    results = asyncio.run(evaluate(args.addr, problems, methods, widths, base, concurrency=args.concurrency,
                                   timeout=args.timeout, progress=not args.no_progress, security=security))
    summaries = summarise(results)
    report = {
        "dataset": str(args.dataset), "addr": args.addr, "methods": methods, "widths": widths,
        "problems": len(problems), "wall_seconds": time.perf_counter() - started,
        "config_overrides": json.loads(json.dumps({k[4:]: v for k, v in vars(args).items()
                                                    if k.startswith("cfg_") and v is not None})),
        "summary": [asdict(s) for s in summaries],
        "results": [asdict(r) for r in results],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(format_table(summaries))
    print(f"results: {args.out}")
    if args.plot:
        plot(summaries, args.plot, title=f"{Path(args.dataset).name}: accuracy vs KV tokens")
        print(f"plot: {args.plot}")
    errors = sum(s.errors for s in summaries)
    if errors:
        print(f"ets eval: {errors} search(es) failed (see 'error' in {args.out})", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
