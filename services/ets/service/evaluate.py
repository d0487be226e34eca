"""``ets eval``: accuracy and efficiency of search methods, widths and ETS settings over a dataset.

    ets eval bench/data/gsm8k_easy.jsonl --addr localhost:50051 \\
        --methods ets,rebase,beam,dvts,best_of_n --widths 8,16 \\
        --sweep cluster_distance=0.1,0.3 --sweep lambda_c=1,2 --sweep-widths 16 \\
        --concurrency 2 --out bench/results/eval.json --plot docs/eval.png --markdown eval.md

Owns: loading a JSONL dataset (``problem``/``question`` and ``answer`` per line; a GSM8K answer
ending in ``#### 42`` is reduced to ``42``), the runs to make (method x width, plus a grid of
ETS settings from ``--sweep FIELD=v1,v2`` at ``--sweep-widths``), running them through the search
service, and summarising: accuracy with a 95% Wilson interval, how often an answer was
extracted, oracle accuracy (some finished candidate right: what a perfect vote could reach),
logical KV tokens (total = sum over selections, and peak), generated tokens, wall time, engine
cache reuse (cached / prompt tokens) and how much of the frontier the selection kept.

Every run of a problem uses the same seed (``--seed`` + the problem's index), so methods are
compared on the same draws as far as the engine honours seeds. Each finished search is appended
to ``--jsonl`` and the report (``--out``) is rewritten, so a run cut off early still leaves its
data; ``--resume`` skips the searches already in ``--jsonl``, and ``--report-only A.jsonl
--report-only B.jsonl`` rebuilds the report, table and plot from such files (say, two
evaluations run side by side) without searching. A prediction is correct when it is
mathematically equivalent to the reference (``ets.search.answers``). Wall times are measured
with ``--concurrency`` searches sharing the engines.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

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

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
SWEEPABLE = ("lambda_c", "lambda_s", "cluster_distance", "softmax_temperature", "node_cost")
# ETS reaches REBASE's accuracy with at least this much less logical KV: the paper's headline.
KV_REDUCTION_GOAL = 1.8


class DatasetError(ValueError):
    """A dataset line that cannot be used (names the line and the field)."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


def load_dataset(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Problems of a JSONL file, in file order; ``limit`` keeps the first N."""
    problems: list[Problem] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{lineno}: not JSON: {err}") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: not a JSON object")
            text = row.get("problem", row.get("question"))
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f"{path}:{lineno}: field 'problem' (or 'question') missing or empty")
            answer = row.get("answer")
            if answer is None or (isinstance(answer, str) and not answer.strip()):
                raise DatasetError(f"{path}:{lineno}: field 'answer' missing or empty")
            answer = str(answer)
            if "####" in answer:  # GSM8K: worked solution, then "#### <final answer>"
                answer = answer.rsplit("####", 1)[1].strip()
            pid = str(row.get("id", row.get("unique_id", lineno)))
            if pid in seen:
                raise DatasetError(f"{path}:{lineno}: field 'id' repeats {pid!r}")
            seen.add(pid)
            problems.append(Problem(pid, text, answer))
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise DatasetError(f"{path}: no problems")
    return problems


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound at 0/n and n/n, unlike the normal
    approximation); (0, 1) when there are no trials."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"successes: need 0 <= successes <= trials, got {successes}/{trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    # Exact at the edges (0/n starts at 0, n/n ends at 1), where rounding would nudge them.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def answers_match(predicted: str, reference: str) -> bool:
    """Mathematical equivalence of a predicted and a reference answer (ets.search.answers)."""
    if not predicted.strip():
        return False
    from ets.search import answers

    return bool(answers.equivalent(predicted, reference))


# ---- what to run ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """One configuration to evaluate: a method at a width with SearchConfig overrides."""

    method: str
    width: int
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``ets`` or ``ets[cluster_distance=0.3,lambda_c=2]`` (the width is reported apart)."""
        if not self.overrides:
            return self.method
        return f"{self.method}[{','.join(f'{k}={_fmt(v)}' for k, v in self.overrides)}]"


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_sweep(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["lambda_c=1,2", "cluster_distance=0.1,0.3"]`` -> {field: values}; names the bad item."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not raw.strip():
            raise ValueError(f"--sweep {item!r}: expected FIELD=v1,v2,...")
        if name not in SWEEPABLE:
            raise ValueError(f"--sweep {item!r}: field {name!r} is not sweepable; one of {list(SWEEPABLE)}")
        if name in grid:
            raise ValueError(f"--sweep {item!r}: field {name!r} given twice")
        values: list[Any] = []
        for v in raw.split(","):
            v = v.strip()
            if not v:
                continue
            if name == "node_cost":
                values.append(v)
                continue
            try:
                values.append(float(v))
            except ValueError:
                raise ValueError(f"--sweep {item!r}: {name} value {v!r} is not a number") from None
        grid[name] = values
    return grid


def plan_runs(methods: Sequence[str], widths: Sequence[int], sweep: dict[str, list[Any]] | None = None,
              sweep_widths: Sequence[int] | None = None, sweep_method: str = "ets") -> list[RunSpec]:
    """Every method at every width, then the sweep grid's points (Cartesian product) for
    ``sweep_method`` at ``sweep_widths`` (default: ``widths``); duplicates dropped, order kept."""
    runs: list[RunSpec] = [RunSpec(m, w) for w in widths for m in methods]
    if sweep:
        names = sorted(sweep)
        for w in (sweep_widths or widths):
            for values in itertools.product(*(sweep[n] for n in names)):
                runs.append(RunSpec(sweep_method, w, tuple(zip(names, values, strict=True))))
    unique: dict[RunSpec, None] = {}
    for r in runs:
        unique.setdefault(r, None)
    return list(unique)


# ---- one search ---------------------------------------------------------------------------------

@dataclass
class ProblemResult:
    id: str
    label: str
    method: str
    width: int
    reference: str
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    answer: str = ""
    correct: bool = False
    oracle: bool = False  # some finished candidate's answer is right
    error: str = ""
    total_kv_tokens: int = 0
    peak_kv_tokens: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    model_calls: int = 0
    selections: int = 0
    depth_reached: int = 0
    solver_fallbacks: int = 0
    wall_seconds: float = 0.0
    selection_seconds: float = 0.0
    policy_seconds: float = 0.0
    reward_seconds: float = 0.0
    candidates: int = 0
    frontier: int = 0  # candidates offered to the selection, summed over depths
    kept: int = 0      # of those, given at least one child
    resolved_config: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, str]:
        return self.label, self.width, self.id


def result_from_json(row: dict[str, Any]) -> ProblemResult:
    names = {f.name for f in fields(ProblemResult)}
    return ProblemResult(**{k: v for k, v in row.items() if k in names})


def _any_correct(answers: Sequence[str], reference: str) -> bool:
    return any(answers_match(a, reference) for a in dict.fromkeys(a for a in answers if a.strip()))


def _config_for(spec: RunSpec, base: search_pb2.SearchConfig, seed: int) -> search_pb2.SearchConfig:
    config = search_pb2.SearchConfig()
    config.CopyFrom(base)
    config.method, config.width, config.seed = spec.method, spec.width, seed
    for name, value in spec.overrides:
        setattr(config, name, value)
    return config


async def run_one(stub: search_pb2_grpc.SearchServiceStub, problem: Problem, spec: RunSpec, seed: int,
                  base: search_pb2.SearchConfig, timeout: float) -> ProblemResult:
    """One search (SearchStream, for the per-depth kept/frontier counts) scored against the reference."""
    from google.protobuf import json_format

    result = ProblemResult(id=problem.id, label=spec.label, method=spec.method, width=spec.width,
                           reference=problem.answer, seed=seed, overrides=dict(spec.overrides))
    request = search_pb2.SearchRequest(problem=problem.problem, config=_config_for(spec, base, seed),
                                       request_id=f"eval-{spec.label}-w{spec.width}-{problem.id}")
    response: search_pb2.SearchResponse | None = None
    try:
        async for event in stub.SearchStream(request, timeout=timeout):
            if event.HasField("progress"):
                result.frontier += event.progress.frontier_size
                result.kept += event.progress.kept_candidates
            else:
                response = event.result
    except grpc.aio.AioRpcError as err:
        result.error = f"{err.code().name}: {err.details()}"
        return result
    if response is None:
        result.error = "stream ended without a result"
        return result
    s = response.stats
    result.answer = response.answer
    result.correct = await asyncio.to_thread(answers_match, response.answer, problem.answer)
    result.oracle = result.correct or await asyncio.to_thread(
        _any_correct, [c.answer for c in response.candidates], problem.answer)
    for name in ("total_kv_tokens", "peak_kv_tokens", "generated_tokens", "prompt_tokens", "cached_prompt_tokens",
                 "model_calls", "selections", "depth_reached", "solver_fallbacks", "wall_seconds",
                 "selection_seconds", "policy_seconds", "reward_seconds"):
        setattr(result, name, getattr(s, name))
    result.candidates = len(response.candidates)
    result.resolved_config = json_format.MessageToDict(response.config, preserving_proto_field_name=True)
    return result


# ---- summary --------------------------------------------------------------------------------------

@dataclass
class Summary:
    label: str
    method: str
    width: int
    overrides: dict[str, Any]
    problems: int
    errors: int
    correct: int
    accuracy: float          # correct / problems (a failed search counts as wrong)
    accuracy_ci_low: float   # 95% Wilson interval
    accuracy_ci_high: float
    answered: float          # share of searches that extracted an answer
    oracle_accuracy: float   # share where some finished candidate was right
    mean_total_kv_tokens: float
    mean_peak_kv_tokens: float
    max_peak_kv_tokens: int
    mean_generated_tokens: float
    cache_reuse: float       # cached / prompt tokens, over all searches
    kept_share: float        # candidates kept / offered, over all selections
    mean_wall_seconds: float
    generated_tokens_per_second: float  # generated tokens / summed search wall time


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def summarise(results: Sequence[ProblemResult]) -> list[Summary]:
    """One Summary per (label, width), sorted by width, then label."""
    groups: dict[tuple[str, int], list[ProblemResult]] = {}
    for r in results:
        groups.setdefault((r.label, r.width), []).append(r)
    out = []
    for (label, width), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ok = [r for r in rs if not r.error]
        prompt = sum(r.prompt_tokens for r in ok)
        wall = sum(r.wall_seconds for r in ok)
        frontier = sum(r.frontier for r in ok)
        correct = sum(r.correct for r in rs)
        lo, hi = wilson_interval(correct, len(rs))
        out.append(Summary(
            label=label, method=rs[0].method, width=width, overrides=dict(rs[0].overrides),
            problems=len(rs), errors=len(rs) - len(ok), correct=correct,
            accuracy=correct / len(rs), accuracy_ci_low=lo, accuracy_ci_high=hi,
            answered=sum(bool(r.answer) for r in rs) / len(rs),
            oracle_accuracy=sum(r.oracle for r in rs) / len(rs),
            mean_total_kv_tokens=_mean([r.total_kv_tokens for r in ok]),
            mean_peak_kv_tokens=_mean([r.peak_kv_tokens for r in ok]),
            max_peak_kv_tokens=max((r.peak_kv_tokens for r in ok), default=0),
            mean_generated_tokens=_mean([r.generated_tokens for r in ok]),
            cache_reuse=sum(r.cached_prompt_tokens for r in ok) / prompt if prompt else 0.0,
            kept_share=sum(r.kept for r in ok) / frontier if frontier else 0.0,
            mean_wall_seconds=_mean([r.wall_seconds for r in ok]),
            generated_tokens_per_second=sum(r.generated_tokens for r in ok) / wall if wall else 0.0,
        ))
    return out


def compare_to_rebase(summaries: Sequence[Summary], results: Sequence[ProblemResult] = ()) -> list[dict[str, Any]]:
    """Each ETS configuration against REBASE at the same width: KV reduction (REBASE / ETS, mean
    total and mean peak), accuracy difference, whether ETS's accuracy lies within REBASE's 95%
    interval or above it, and whether the paper's goal (that, with >= 1.8x less total KV) holds.
    When per-problem results are given, only problems both finished are compared for KV."""
    out = []
    for width in sorted({s.width for s in summaries}):
        rebase = next((s for s in summaries if s.width == width and s.label == "rebase"), None)
        if rebase is None:
            continue
        for s in summaries:
            if s.width != width or s.method != "ets":
                continue
            ets_kv, rebase_kv = s.mean_total_kv_tokens, rebase.mean_total_kv_tokens
            ets_peak, rebase_peak = s.mean_peak_kv_tokens, rebase.mean_peak_kv_tokens
            if results:  # paired: the same problems under both
                mine = {r.id: r for r in results if r.label == s.label and r.width == width and not r.error}
                theirs = {r.id: r for r in results if r.label == "rebase" and r.width == width and not r.error}
                both = sorted(set(mine) & set(theirs))
                if both:
                    ets_kv = statistics.fmean(mine[i].total_kv_tokens for i in both)
                    rebase_kv = statistics.fmean(theirs[i].total_kv_tokens for i in both)
                    ets_peak = statistics.fmean(mine[i].peak_kv_tokens for i in both)
                    rebase_peak = statistics.fmean(theirs[i].peak_kv_tokens for i in both)
            reduction = rebase_kv / ets_kv if ets_kv else 0.0
            matches = s.accuracy >= rebase.accuracy_ci_low
            out.append({
                "width": width, "label": s.label,
                "kv_reduction_total": reduction,
                "kv_reduction_peak": rebase_peak / ets_peak if ets_peak else 0.0,
                "accuracy_delta": s.accuracy - rebase.accuracy,
                "accuracy_within_rebase_ci": matches,
                "goal_met": bool(matches and reduction >= KV_REDUCTION_GOAL),
            })
    return out


# ---- output -----------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(summaries: Sequence[Summary]) -> str:
    """Plain-text table for the terminal."""
    head = (f"{'method':<36} {'width':>5} {'n':>4} {'err':>3} {'acc':>6} {'95% CI':>13} {'answ':>6} {'oracle':>6} "
            f"{'KV total':>9} {'KV peak':>8} {'gen tok':>7} {'reuse':>6} {'kept':>6} {'wall s':>7}")
    rows = [head, "-" * len(head)]
    for s in summaries:
        ci = f"{100 * s.accuracy_ci_low:.0f}-{100 * s.accuracy_ci_high:.0f}%"
        rows.append(f"{s.label:<36} {s.width:>5} {s.problems:>4} {s.errors:>3} {_pct(s.accuracy):>6} {ci:>13} "
                    f"{_pct(s.answered):>6} {_pct(s.oracle_accuracy):>6} {s.mean_total_kv_tokens:>9.0f} "
                    f"{s.mean_peak_kv_tokens:>8.0f} {s.mean_generated_tokens:>7.0f} {_pct(s.cache_reuse):>6} "
                    f"{_pct(s.kept_share):>6} {s.mean_wall_seconds:>7.1f}")
    return "\n".join(rows)


def markdown_table(summaries: Sequence[Summary], comparisons: Sequence[dict[str, Any]] = ()) -> str:
    """The README / docs table (one row per configuration), then the ETS-vs-REBASE lines."""
    lines = [
        "| method | width | n | accuracy (95% CI) | answered | oracle | KV total (mean) | KV peak (mean) "
        "| generated tok | cache reuse | kept | wall s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        err = f" ({s.errors} failed)" if s.errors else ""
        lines.append(
            f"| {s.label} | {s.width} | {s.problems}{err} | {_pct(s.accuracy)} "
            f"({100 * s.accuracy_ci_low:.0f}-{100 * s.accuracy_ci_high:.0f}%) | {_pct(s.answered)} | "
            f"{_pct(s.oracle_accuracy)} | {s.mean_total_kv_tokens:.0f} | {s.mean_peak_kv_tokens:.0f} | "
            f"{s.mean_generated_tokens:.0f} | {_pct(s.cache_reuse)} | {_pct(s.kept_share)} | "
            f"{s.mean_wall_seconds:.1f} |")
    if comparisons:
        lines.append("")
        for c in comparisons:
            verdict = "goal met" if c["goal_met"] else "goal not met"
            within = "within or above" if c["accuracy_within_rebase_ci"] else "below"
            lines.append(
                f"- width {c['width']}, {c['label']}: REBASE/ETS KV total {c['kv_reduction_total']:.2f}x, "
                f"peak {c['kv_reduction_peak']:.2f}x; accuracy {100 * c['accuracy_delta']:+.1f} points "
                f"({within} REBASE's interval): {verdict} (>= {KV_REDUCTION_GOAL}x at REBASE's accuracy)")
    return "\n".join(lines)


def plot(summaries: Sequence[Summary], path: str | Path, title: str = "") -> None:
    """Accuracy (with its 95% interval) against mean total logical KV tokens: one line per
    method through its widths; sweep configurations as unconnected points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    plain = [s for s in summaries if not s.overrides]
    for method in sorted({s.method for s in plain}):
        pts = sorted((s for s in plain if s.method == method), key=lambda s: s.width)
        xs = [s.mean_total_kv_tokens for s in pts]
        ys = [100 * s.accuracy for s in pts]
        err = [[100 * (s.accuracy - s.accuracy_ci_low) for s in pts],
               [100 * (s.accuracy_ci_high - s.accuracy) for s in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method, alpha=0.9)
        for s, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(f"w{s.width}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    swept = [s for s in summaries if s.overrides]
    if swept:
        ax.scatter([s.mean_total_kv_tokens for s in swept], [100 * s.accuracy for s in swept], marker="x",
                   color="black", label="ets sweep", zorder=3)
        for s in swept:
            short = ",".join(f"{_abbrev(k)}{_fmt(v)}" for k, v in s.overrides.items())
            ax.annotate(f"{short} w{s.width}", (s.mean_total_kv_tokens, 100 * s.accuracy), textcoords="offset points",
                        xytext=(4, -9), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("mean total KV tokens per search (logical, sum over selections)")
    ax.set_ylabel("accuracy (%), 95% Wilson interval")
    ax.set_title(title or "accuracy vs KV cache size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _abbrev(name: str) -> str:
    return {"lambda_c": "c", "lambda_s": "s", "cluster_distance": "d", "softmax_temperature": "T",
            "node_cost": "cost:"}.get(name, name)


# ---- running ----------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[ProblemResult]:
    """Results already written (a cut-off last line is ignored)."""
    out: list[ProblemResult] = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(result_from_json(json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return out


async def evaluate(addr: str, problems: Sequence[Problem], runs: Sequence[RunSpec], base: search_pb2.SearchConfig,
                   *, seed: int = 0, concurrency: int = 2, timeout: float = 600.0, progress: bool = True,
                   done: Iterable[tuple[str, int, str]] = (),
                   on_result: Callable[[ProblemResult], None] | None = None,
                   security: ClientSecurity | None = None) -> list[ProblemResult]:
    """Run every (problem, run) not in ``done`` with ``concurrency`` searches in flight, problem by
    problem (so a cut-off evaluation has every configuration on its first problems); problem i
    uses seed ``seed + i`` under every configuration. ``on_result`` sees each result as it lands."""
    from tqdm import tqdm

    skip = set(done)
    jobs = [(i, p, r) for i, p in enumerate(problems) for r in runs if (r.label, r.width, p.id) not in skip]
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(jobs), desc="eval", unit="search", disable=not progress, file=sys.stderr)
    results: list[ProblemResult] = []
    async with secure_channel(addr, security, options=channel_options(3)) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)

        async def run(job: tuple[int, Problem, RunSpec]) -> None:
            index, problem, spec = job
            async with gate:
                result = await run_one(stub, problem, spec, seed + index, base, timeout)
            results.append(result)
            if on_result is not None:
                on_result(result)
            bar.update(1)
            bar.set_postfix_str(f"{spec.label}/w{spec.width}")

        try:
            await asyncio.gather(*(run(j) for j in jobs))
        finally:
            bar.close()
    return results


def build_report(meta: dict[str, Any], results: Sequence[ProblemResult]) -> dict[str, Any]:
    summaries = summarise(results)
    return {**meta, "summary": [asdict(s) for s in summaries],
            "ets_vs_rebase": compare_to_rebase(summaries, results),
            "results": [asdict(r) for r in results]}


def _csv(value: str, kind: type) -> list[Any]:
    return [kind(v.strip()) for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ets eval", description="evaluate methods and widths over a JSONL dataset")
    parser.add_argument("dataset", help="JSONL file with problem/answer fields")
    parser.add_argument("--addr", default=os.environ.get("ETS_SEARCH_ADDR", DEFAULT_ADDR))
    parser.add_argument("--methods", default="ets,rebase", help="comma-separated methods")
    parser.add_argument("--widths", default="16", help="comma-separated widths")
    parser.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2",
                        help=f"ETS setting values to sweep (repeatable; grid product); fields: {', '.join(SWEEPABLE)}")
    parser.add_argument("--sweep-widths", default=None, help="widths of the sweep (default: --widths)")
    parser.add_argument("--sweep-method", default="ets", help="method the sweep applies to")
    parser.add_argument("--limit", type=int, default=None, help="first N problems only")
    parser.add_argument("--concurrency", type=int, default=2, help="searches in flight")
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline per search (s)")
    parser.add_argument("--out", default="eval-results.json", help="results JSON path (rewritten as results land)")
    parser.add_argument("--jsonl", default=None, help="per-search lines, appended as they land (default: OUT.jsonl)")
    parser.add_argument("--resume", action="store_true", help="skip searches already in --jsonl")
    parser.add_argument("--report-only", action="append", default=[], metavar="JSONL",
                        help="no searches: build --out, --plot and --markdown from these per-search files "
                             "(repeatable; e.g. two evaluations run side by side)")
    parser.add_argument("--plot", default=None, help="PNG path for accuracy vs KV tokens")
    parser.add_argument("--markdown", default=None, help="write the Markdown table here")
    parser.add_argument("--title", default=None, help="plot title")
    parser.add_argument("--no-progress", action="store_true")
    add_security_flags(parser)
    add_config_flags(parser)
    return parser


def main(argv: Sequence[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    security = security_from_args(parser, args)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    try:
        methods, widths = _csv(args.methods, str), _csv(args.widths, int)
        sweep_widths = _csv(args.sweep_widths, int) if args.sweep_widths else None
    except ValueError:
        parser.error("--widths and --sweep-widths must be comma-separated integers")
    if not methods or not widths:
        parser.error("--methods and --widths must each name at least one value")
    try:
        sweep = parse_sweep(args.sweep)
    except ValueError as err:
        parser.error(str(err))
    try:
        problems = load_dataset(args.dataset, args.limit)
    except (OSError, DatasetError) as err:
        print(f"ets eval: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.report_only:
        report_only(args, argv)
        return
    runs = plan_runs(methods, widths, sweep, sweep_widths, args.sweep_method)
    base = config_from_args(args)
    seed = int(args.cfg_seed) if args.cfg_seed is not None else 0
    out = Path(args.out)
    jsonl = Path(args.jsonl) if args.jsonl else out.with_suffix(".jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    wanted = {(r.label, r.width, p.id) for r in runs for p in problems}
    previous = [r for r in read_jsonl(jsonl) if r.key in wanted] if args.resume else []
    if not args.resume:
        jsonl.write_text("")
    meta = {
        "command": "ets eval " + " ".join(argv),
        "dataset": str(args.dataset), "addr": args.addr, "methods": methods, "widths": widths,
        "sweep": sweep, "sweep_widths": sweep_widths or widths, "problems": len(problems), "seed": seed,
        "concurrency": args.concurrency,
        "config_overrides": json.loads(json.dumps({k[4:]: v for k, v in vars(args).items()
                                                    if k.startswith("cfg_") and v is not None})),
    }
    collected = list(previous)
    started = time.perf_counter()

    def land(result: ProblemResult) -> None:
        collected.append(result)
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result)) + "\n")
        report = build_report({**meta, "wall_seconds": time.perf_counter() - started, "complete": False}, collected)
        out.write_text(json.dumps(report, indent=2))

    asyncio.run(evaluate(args.addr, problems, runs, base, seed=seed, concurrency=args.concurrency,
                         timeout=args.timeout, progress=not args.no_progress,
                         done={r.key for r in previous}, on_result=land, security=security))
    report = build_report({**meta, "wall_seconds": time.perf_counter() - started, "complete": True}, collected)
    out.write_text(json.dumps(report, indent=2))
    finish(args, report, collected, jsonl)


def report_only(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """``--report-only``: the report, table and plot of per-search files already written."""
    collected: list[ProblemResult] = []
    for name in args.report_only:
        path = Path(name)
        if not path.exists():
            print(f"ets eval: --report-only {name}: no such file", file=sys.stderr)
            raise SystemExit(2)
        collected += read_jsonl(path)
    if not collected:
        print(f"ets eval: --report-only: no results in {', '.join(args.report_only)}", file=sys.stderr)
        raise SystemExit(2)
    meta = {"command": "ets eval " + " ".join(argv), "dataset": str(args.dataset), "sources": args.report_only,
            "problems": len({r.id for r in collected}), "complete": True}
    report = build_report(meta, collected)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    finish(args, report, collected, None)


def finish(args: argparse.Namespace, report: dict[str, Any], collected: Sequence[ProblemResult],
           jsonl: Path | None) -> None:
    """Print the table and the ETS-vs-REBASE lines; write the Markdown table and the plot."""
    summaries = summarise(collected)
    print(format_table(summaries))
    table = markdown_table(summaries, report["ets_vs_rebase"])
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    for c in report["ets_vs_rebase"]:
        print(f"width {c['width']} {c['label']}: REBASE/ETS KV total {c['kv_reduction_total']:.2f}x, "
              f"accuracy {100 * c['accuracy_delta']:+.1f} points, goal {'met' if c['goal_met'] else 'not met'}")
    print(f"results: {args.out}" + (f" (per search: {jsonl})" if jsonl else ""))
    if args.plot:
        plot(summaries, args.plot, title=args.title or f"{Path(args.dataset).name}: accuracy vs KV tokens")
        print(f"plot: {args.plot}")
    errors = sum(s.errors for s in summaries)
    if errors:
        print(f"ets eval: {errors} search(es) failed (see 'error' in {args.out})", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
