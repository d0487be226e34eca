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

The summaries, tables and plot (pure, no I/O but the plot file) live in ``ets.evaluation.report``.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import grpc

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.config import search_defaults_from_env
from ets.search.config import SearchConfig
from ets.evaluation.local import LocalUpstreams, run_local
from ets.evaluation.preset import Preset, available as available_presets, load_preset
from ets.evaluation.spec import Problem, RunSpec
from ets.evaluation.store import SampleStore
from ets.evaluation.throughput import as_row, markdown as throughput_markdown, measure, summarise as throughput_summary
from ets.security import ClientSecurity
from ets.settings import parse_bool
from ets.security import channel as secure_channel
from ets.evaluation.stats import early_stop_comparisons, goal_line, paired_comparisons
from ets.evaluation.report import (
    ProblemResult,
    grade,
    compare_to_rebase,
    early_stop_markdown,
    format_table,
    markdown_table,
    extraction_markdown,
    extraction_rows,
    paired_markdown,
    plot,
    plot_kv_ratio,
    read_jsonl,
    summarise,
)
from ets.client.search import (
    add_service_flags,
    channel_options,
    config_from_args,
    security_from_args,
)

OUT_DEFAULT = "eval-results.json"
SWEEPABLE = ("lambda_c", "lambda_s", "cluster_distance", "softmax_temperature", "node_cost", "early_stop")


class DatasetError(ValueError):
    """A dataset line that cannot be used (names the line and the field)."""


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


# ---- what to run ------------------------------------------------------------------------------

def parse_sweep(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["lambda_c=1,2", "cluster_distance=0.1,0.3"]`` -> {field: values}; names the bad item.
    ``METHOD:FIELD=...`` sweeps that method instead of ``--sweep-method`` (key ``METHOD:FIELD``);
    ``early_stop`` takes booleans (0/1, false/true, off/on)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        method, colon, name = key.rpartition(":")
        name = name.strip()
        if not sep or not raw.strip():
            raise ValueError(f"--sweep {item!r}: expected [METHOD:]FIELD=v1,v2,...")
        if colon and not method.strip():
            raise ValueError(f"--sweep {item!r}: empty method before ':'")
        if name not in SWEEPABLE:
            raise ValueError(f"--sweep {item!r}: field {name!r} is not sweepable; one of {list(SWEEPABLE)}")
        key = f"{method.strip()}:{name}" if colon else name
        if key in grid:
            raise ValueError(f"--sweep {item!r}: field {name!r} given twice")
        values: list[Any] = []
        for v in raw.split(","):
            v = v.strip()
            if not v:
                continue
            if name == "node_cost":
                values.append(v)
                continue
            if name == "early_stop":
                try:
                    values.append(parse_bool(v))
                except ValueError:
                    raise ValueError(f"--sweep {item!r}: early_stop value {v!r} is not a boolean "
                                     "(0/1, false/true)") from None
                continue
            try:
                values.append(float(v))
            except ValueError:
                raise ValueError(f"--sweep {item!r}: {name} value {v!r} is not a number") from None
        grid[key] = values
    return grid


def parse_methods(value: str) -> list[tuple[str, int | None]]:
    """``"ets,rebase,beam@16"`` -> [(method, only this width or None)]; names the bad item."""
    out: list[tuple[str, int | None]] = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        method, at, width = item.partition("@")
        if not method.strip():
            raise ValueError(f"--methods {item!r}: empty method")
        if not at:
            out.append((method.strip(), None))
            continue
        try:
            out.append((method.strip(), int(width)))
        except ValueError:
            raise ValueError(f"--methods {item!r}: width {width!r} is not an integer") from None
    return out


def plan_runs(methods: Sequence[str | tuple[str, int | None]], widths: Sequence[int],
              sweep: dict[str, list[Any]] | None = None, sweep_widths: Sequence[int] | None = None,
              sweep_method: str = "ets", defaults: dict[str, Any] | None = None) -> list[RunSpec]:
    """Every method at every width (a ``(method, width)`` pair: at that width only), then each
    method's sweep grid (Cartesian product of its fields; plain fields belong to ``sweep_method``,
    ``METHOD:FIELD`` to METHOD) at ``sweep_widths`` (default: ``widths``). An override equal to
    ``defaults`` (the base configuration) is dropped, so ``lambda_c=1`` under a default of 1 is
    plain ``ets``; duplicates dropped, order kept."""
    pairs = [(m, None) if isinstance(m, str) else m for m in methods]
    runs = [RunSpec(name, w) for w in widths for name, only in pairs if only in (None, w)]
    # METHOD@W with W outside ``widths``: still run, at W.
    runs += [RunSpec(name, only) for name, only in pairs if only is not None and only not in widths]
    grids: dict[str, dict[str, list[Any]]] = {}
    for key, values in (sweep or {}).items():
        method, _, name = key.rpartition(":")
        grids.setdefault(method or sweep_method, {})[name] = values
    defaults = defaults or {}
    for w in (sweep_widths or widths):
        for method, grid in grids.items():
            names = sorted(grid)
            for point in itertools.product(*(grid[n] for n in names)):
                overrides = tuple((n, v) for n, v in zip(names, point, strict=True)
                                  if not (n in defaults and defaults[n] == v))
                runs.append(RunSpec(method, w, overrides))
    unique: dict[RunSpec, None] = {}
    for r in runs:
        unique.setdefault(r, None)
    return list(unique)


# ---- one search ---------------------------------------------------------------------------------

def _config_for(spec: RunSpec, base: search_pb2.SearchConfig, seed: int) -> search_pb2.SearchConfig:
    config = search_pb2.SearchConfig()
    config.CopyFrom(base)
    config.method, config.width, config.seed = spec.method, spec.width, seed
    for name, value in spec.overrides:
        setattr(config, name, value)
    return config


def request_id(spec: RunSpec, problem: Problem) -> str:
    """The search's request id: label, width and problem, in the characters the service accepts
    (letters, digits and ``. _ : -``; a sweep label's brackets and commas become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", f"eval-{spec.label}-w{spec.width}-{problem.id}")[:128]


async def run_one(stub: search_pb2_grpc.SearchServiceStub, problem: Problem, spec: RunSpec, seed: int,
                  base: search_pb2.SearchConfig, timeout: float) -> ProblemResult:
    """One search (SearchStream, for the per-depth kept/frontier counts) scored against the reference."""
    from google.protobuf import json_format

    result = ProblemResult(id=problem.id, label=spec.label, method=spec.method, width=spec.width,
                           reference=problem.answer, seed=seed, overrides=dict(spec.overrides))
    request = search_pb2.SearchRequest(problem=problem.problem, config=_config_for(spec, base, seed),
                                       request_id=request_id(spec, problem))
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
    await asyncio.to_thread(grade, result, response.answer, [c.answer for c in response.candidates], response.stats,
                            [(c.text, c.aggregate_score) for c in response.candidates], response.config.voting)
    result.wall_seconds = response.stats.wall_seconds
    result.resolved_config = json_format.MessageToDict(response.config, preserving_proto_field_name=True)
    return result


# ---- running ----------------------------------------------------------------------------------

Job = tuple[int, Problem, RunSpec]


async def _schedule(problems: Sequence[Problem], runs: Sequence[RunSpec],
                    run: Callable[[Job], Awaitable[ProblemResult]], *, concurrency: int, progress: bool,
                    done: Iterable[tuple[str, int, str]],
                    on_result: Callable[[ProblemResult], None] | None) -> list[ProblemResult]:
    """Every (problem, run) not in ``done``, ``concurrency`` at a time, problem by problem (so a
    cut-off evaluation has every configuration on its first problems)."""
    from tqdm import tqdm

    skip = set(done)
    jobs = [(i, p, r) for i, p in enumerate(problems) for r in runs if (r.label, r.width, p.id) not in skip]
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(jobs), desc="eval", unit="search", disable=not progress, file=sys.stderr)
    results: list[ProblemResult] = []

    async def one(job: Job) -> None:
        async with gate:
            result = await run(job)
        results.append(result)
        if on_result is not None:
            on_result(result)
        bar.update(1)
        bar.set_postfix_str(f"{job[2].label}/w{job[2].width}")

    try:
        await asyncio.gather(*(one(j) for j in jobs))
    finally:
        bar.close()
    return results


async def evaluate(addr: str, problems: Sequence[Problem], runs: Sequence[RunSpec], base: search_pb2.SearchConfig,
                   *, seed: int = 0, concurrency: int = 2, timeout: float = 600.0, progress: bool = True,
                   done: Iterable[tuple[str, int, str]] = (),
                   on_result: Callable[[ProblemResult], None] | None = None,
                   security: ClientSecurity | None = None) -> list[ProblemResult]:
    """Through the search service: every (problem, run) not in ``done``, ``concurrency`` searches
    in flight; problem i uses seed ``seed + i`` under every configuration (unpaired: the CPU
    engine ignores seeds). ``on_result`` sees each result as it lands."""
    async with secure_channel(addr, security, options=channel_options(3)) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)

        async def run(job: Job) -> ProblemResult:
            index, problem, spec = job
            return await run_one(stub, problem, spec, seed + index, base, timeout)

        return await _schedule(problems, runs, run, concurrency=concurrency, progress=progress, done=done,
                               on_result=on_result)


async def evaluate_local(upstreams: LocalUpstreams, store: SampleStore, problems: Sequence[Problem],
                         runs: Sequence[RunSpec], base: SearchConfig, *, seed: int = 0, concurrency: int = 2,
                         paired: bool = True, progress: bool = True, done: Iterable[tuple[str, int, str]] = (),
                         on_result: Callable[[ProblemResult], None] | None = None) -> list[ProblemResult]:
    """In-process (``--store``): the search core against the live policy and reward servers through
    ``store``; paired, every configuration of a problem draws the same k-th sample at the same node."""
    async def run(job: Job) -> ProblemResult:
        index, problem, spec = job
        return await run_local(problem, spec, base, seed + index, upstreams, store, paired=paired)

    return await _schedule(problems, runs, run, concurrency=concurrency, progress=progress, done=done,
                           on_result=on_result)


def build_report(meta: dict[str, Any], results: Sequence[ProblemResult]) -> dict[str, Any]:
    """Summaries per configuration, the paired comparisons against REBASE with the goal line, and
    every search's result."""
    summaries = summarise(results)
    paired = paired_comparisons(results)
    return {**meta, "summary": [asdict(s) for s in summaries],
            "paired_vs_rebase": paired, "goal": goal_line(paired),
            "paired_vs_best_of_n": paired_comparisons(results, reference="best_of_n"),
            "extraction": extraction_rows(results),
            "early_stop": early_stop_comparisons(results),
            "samples": {"requested": sum(r.samples_requested for r in results),
                        "drawn": sum(r.samples_drawn for r in results)},
            "ets_vs_rebase": compare_to_rebase(summaries, results),
            "results": [asdict(r) for r in results]}


# ---- presets: the settings, the plan, the estimate, the throughput phase -------------------------

def apply_preset(args: argparse.Namespace) -> Preset:
    """Fill what the command line left unset from ``args.preset``: data set, methods, widths, seed,
    concurrency, every config field the preset sets (a flag given explicitly wins), and the paired
    store, per-search lines, report, table and plots in ``--out-dir``, resumed when they exist."""
    preset = load_preset(args.preset)
    if args.dataset is None:
        # Relative to the working directory, else to the checkout the package runs from (editable).
        checkout = Path(__file__).resolve().parents[3] / preset.dataset
        args.dataset = preset.dataset if Path(preset.dataset).exists() or not checkout.exists() else str(checkout)
    args.methods = args.methods or ",".join(preset.methods)
    args.widths = args.widths or ",".join(str(w) for w in preset.widths)
    if args.concurrency is None:
        args.concurrency = preset.concurrency
    for name, value in {**preset.config, "seed": preset.seed}.items():
        if getattr(args, f"cfg_{name}", None) is None:
            setattr(args, f"cfg_{name}", value)
    out_dir = Path(args.out_dir or f"eval-{preset.name}")
    defaults = {"store": "store.jsonl", "jsonl": "searches.jsonl", "markdown": "report.md",
                "plot": "accuracy_kv.png", "ratio_plot": "kv_ratio.png"}
    for name, file in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, str(out_dir / file))
    if args.out == OUT_DEFAULT:
        args.out = str(out_dir / "report.json")
    args.resume = True  # a preset run picks up where an interrupted one stopped
    return preset


def plan_text(problems: Sequence[Problem], runs: Sequence[RunSpec], done: int, config: SearchConfig,
              concurrency: int) -> str:
    """What the evaluation will do, before it starts: searches per width and method, and the
    sampled-token ceiling from the budgets (each of a search's ``width`` candidates generates at
    most ``max_tokens``, root included, so width x max_tokens bounds a search)."""
    per_width: dict[int, list[str]] = {}
    for r in runs:
        per_width.setdefault(r.width, []).append(r.label)
    total = len(problems) * len(runs)
    ceiling = sum(len(problems) * r.width * config.max_tokens for r in runs)
    lines = [f"plan: {len(problems)} problems x {len(runs)} configurations = {total} searches "
             f"({done} already done, {total - done} to run, {concurrency} at a time)"]
    for width, labels in sorted(per_width.items()):
        lines.append(f"  width {width}: {', '.join(labels)}; at most {width * config.max_tokens:,} sampled tokens "
                     f"per search ({width} x max_tokens {config.max_tokens})")
    lines.append(f"  sampled tokens at most {ceiling:,} in all (searches end earlier when their candidates answer; "
                 "paired, the methods of a problem share samples, so the policy draws fewer)")
    lines.append("  time: estimated once the first problem's searches have finished; the bar shows an ETA")
    return "\n".join(lines)


def estimate_text(elapsed: float, finished: int, todo: int) -> str:
    """The time estimate from the first searches (every configuration of the first problem)."""
    rest = todo - finished
    eta = elapsed / finished * rest if finished else 0.0
    return (f"estimate: the first {finished} searches took {elapsed:.0f} s; the remaining {rest} at that pace: "
            f"about {eta / 3600:.1f} h ({eta:.0f} s)")


def run_throughput(args: argparse.Namespace, preset: Preset, problems: Sequence[Problem],
                   base: search_pb2.SearchConfig, security: ClientSecurity, out_dir: Path) -> dict[str, Any]:
    """The preset's throughput phase through the search service at ``--addr``: levels appended to
    ``throughput.jsonl`` in ``out_dir`` as they finish, finished levels not run again."""
    assert preset.throughput is not None
    t = preset.throughput
    widths = _csv(args.throughput_widths, int) if args.throughput_widths else list(t.widths)
    concurrency = args.throughput_concurrency or t.concurrency
    searches = args.throughput_searches or t.searches
    rounds = args.throughput_rounds or t.rounds
    path = out_dir / "throughput.jsonl"
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    done = [d for d in done if d["width"] in widths and d["method"] in t.methods and d["round"] < rounds
            and d["concurrency"] == concurrency]
    print(f"throughput: {', '.join(t.methods)} at widths {widths}, {rounds} rounds x {searches} searches, "
          f"{concurrency} clients, through {args.addr} ({len(done)} levels already done)", file=sys.stderr)
    seed = int(args.cfg_seed) if args.cfg_seed is not None else 0

    def level_done(level: Any) -> None:
        row = as_row(level)
        done.append(row)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  width {level.width} {level.method} round {level.round}: {level.searches} searches "
              f"({level.errors} failed) in {level.seconds:.0f} s", file=sys.stderr)

    async def go() -> None:
        async with secure_channel(args.addr, security, options=channel_options(3)) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)

            async def one(index: int, method: str, width: int) -> ProblemResult:
                spec = RunSpec(method, width, preset.lambda_s_overrides(width) if method == "ets" else ())
                return await run_one(stub, problems[index], spec, seed + index, base, args.timeout)

            await measure(one, len(problems), t.methods, widths, concurrency=concurrency, searches=searches,
                          rounds=rounds, done=done, on_level=level_done)

    asyncio.run(go())
    return {"addr": args.addr, "problems": len(problems), "levels": done, "summary": throughput_summary(done)}


def local_base_config(args: argparse.Namespace) -> SearchConfig:
    """``--store``'s search defaults: ETS_SEARCH_* as ``ets serve`` reads them, then the config flags."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    return search_defaults_from_env().replace(**overrides)


def _csv(value: str, kind: type) -> list[Any]:
    return [kind(v.strip()) for v in value.split(",") if v.strip()]


_In = TypeVar("_In")
_Out = TypeVar("_Out")


def _parsed(parser: argparse.ArgumentParser, parse: Callable[[_In], _Out], value: _In) -> _Out:
    """``parse(value)``; its ValueError (which names the flag or field) exits as a usage error."""
    try:
        return parse(value)
    except ValueError as err:
        parser.error(str(err))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ets eval", description="evaluate methods and widths over a JSONL dataset")
    parser.add_argument("dataset", nargs="?", default=None,
                        help="JSONL file with problem/answer fields (default with --preset: the preset's)")
    add_service_flags(parser)
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="run a named preset (a versioned file of settings; flags given explicitly override it): "
                             f"{', '.join(available_presets())}. Paired (--store) in --out-dir, resumed when "
                             "re-run, then the throughput phase against --addr")
    parser.add_argument("--out-dir", default=None,
                        help="with --preset: where the store, per-search lines, report, table and plots go "
                             "(default eval-PRESET)")
    parser.add_argument("--no-throughput", action="store_true", help="with --preset: skip the throughput phase")
    parser.add_argument("--throughput-searches", type=int, default=None,
                        help="with --preset: searches per method and round of the throughput phase")
    parser.add_argument("--throughput-concurrency", type=int, default=None,
                        help="with --preset: clients of the throughput phase")
    parser.add_argument("--throughput-widths", default=None, help="with --preset: widths of the throughput phase")
    parser.add_argument("--throughput-rounds", type=int, default=None,
                        help="with --preset: rounds of the throughput phase (each runs every method once)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods; METHOD@W runs that one at width W only (e.g. beam@16) "
                             "(default ets,rebase)")
    parser.add_argument("--widths", default=None, help="comma-separated widths (default 16)")
    parser.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2",
                        help="setting values to sweep (repeatable; grid product per method); METHOD:FIELD=... "
                             f"sweeps METHOD instead of --sweep-method; fields: {', '.join(SWEEPABLE)}")
    parser.add_argument("--sweep-widths", default=None, help="widths of the sweep (default: --widths)")
    parser.add_argument("--sweep-method", default="ets", help="method the sweep applies to")
    parser.add_argument("--limit", type=int, default=None, help="first N problems only")
    parser.add_argument("--concurrency", type=int, default=None, help="searches in flight (default 2)")
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline per search (s)")
    parser.add_argument("--out", default=OUT_DEFAULT, help="results JSON path (rewritten as results land)")
    parser.add_argument("--jsonl", default=None, help="per-search lines, appended as they land (default: OUT.jsonl)")
    parser.add_argument("--resume", action="store_true", help="skip searches already in --jsonl")
    parser.add_argument("--report-only", action="append", default=[], metavar="JSONL",
                        help="no searches: build --out, --plot and --markdown from these per-search files "
                             "(repeatable; e.g. two evaluations run side by side)")
    parser.add_argument("--plot", default=None, help="PNG path for accuracy vs KV tokens")
    parser.add_argument("--markdown", default=None, help="write the Markdown table here")
    parser.add_argument("--title", default=None, help="plot title")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--ratio-plot", default=None, help="PNG path for REBASE/ETS KV against width (paired)")
    local = parser.add_argument_group(
        "in-process (paired) mode: the search core against the live policy and reward servers")
    local.add_argument("--store", default=None,
                       help="sample store (JSONL, created or extended): run in-process, every configuration of a "
                            "problem drawing the same k-th sample at the same node; resumes without redrawing")
    local.add_argument("--unpaired", action="store_true",
                       help="with --store: each configuration draws its own samples (the control)")
    local.add_argument("--policy-url", default=os.environ.get("ETS_POLICY_URL", ""),
                       help="SGLang policy server (default $ETS_POLICY_URL)")
    local.add_argument("--reward-addr", default=os.environ.get("ETS_REWARD_ADDR", ""),
                       help="reward server host:port (default $ETS_REWARD_ADDR)")
    return parser


def main(argv: Sequence[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    security = security_from_args(parser, args)
    preset = _parsed(parser, apply_preset, args) if args.preset else None
    if args.dataset is None:
        parser.error("the dataset is required (or a --preset that names one)")
    args.methods = args.methods or "ets,rebase"
    args.widths = args.widths or "16"
    args.concurrency = 2 if args.concurrency is None else args.concurrency
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    methods = _parsed(parser, parse_methods, args.methods)
    try:
        widths = _csv(args.widths, int)
        sweep_widths = _csv(args.sweep_widths, int) if args.sweep_widths else None
    except ValueError:
        parser.error("--widths and --sweep-widths must be comma-separated integers")
    if not methods or not widths:
        parser.error("--methods and --widths must each name at least one value")
    sweep = _parsed(parser, parse_sweep, args.sweep)
    try:
        problems = load_dataset(args.dataset, args.limit)
    except (OSError, DatasetError) as err:
        print(f"ets eval: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.report_only:
        report_only(args, argv, problems)
        return
    if args.unpaired and not args.store:
        parser.error("--unpaired needs --store (the service path is unpaired already)")
    local_config: SearchConfig | None = None
    if args.store:
        if not args.policy_url or not args.reward_addr:
            parser.error("--store runs in-process: it needs --policy-url and --reward-addr "
                         "(or $ETS_POLICY_URL and $ETS_REWARD_ADDR)")
        local_config = _parsed(parser, local_base_config, args)  # ConfigError names the field
    # In-process, the base configuration is known: a sweep value equal to it is the plain run.
    defaults = asdict(local_config) if local_config is not None else None
    runs = plan_runs(methods, widths, sweep, sweep_widths, args.sweep_method, defaults)
    if preset is not None:  # the preset's lambda_s per width (none: the config's width preset is the same)
        runs = [RunSpec(r.method, r.width, r.overrides or preset.lambda_s_overrides(r.width)) if r.method == "ets"
                else r for r in runs]
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
        "dataset": str(args.dataset), "addr": args.addr, "methods": args.methods, "widths": widths,
        "sweep": sweep, "sweep_widths": sweep_widths or widths, "problems": len(problems), "seed": seed,
        "concurrency": args.concurrency,
        "config_overrides": json.loads(json.dumps({k[4:]: v for k, v in vars(args).items()
                                                    if k.startswith("cfg_") and v is not None})),
        "mode": ("unpaired (store)" if args.unpaired else "paired (store)") if args.store else "service (unpaired)",
    }
    if preset is not None:
        meta["preset"] = preset.as_dict()
    if args.store:
        assert local_config is not None
        meta["store"] = {"path": str(args.store), "policy_url": args.policy_url, "reward_addr": args.reward_addr}
        meta["search_defaults"] = json.loads(json.dumps(asdict(local_config)))
    collected = list(previous)
    started = time.perf_counter()
    todo = len(wanted) - len({r.key for r in previous})
    print(plan_text(problems, runs, len(wanted) - todo, local_config or SearchConfig(), args.concurrency),
          file=sys.stderr)
    landed = 0

    def land(result: ProblemResult) -> None:
        nonlocal landed
        landed += 1
        if landed == min(len(runs), todo):  # the first problem's configurations: a time estimate
            print(estimate_text(time.perf_counter() - started, landed, todo), file=sys.stderr)
        collected.append(result)
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result)) + "\n")
        report = build_report({**meta, "wall_seconds": time.perf_counter() - started, "complete": False}, collected)
        out.write_text(json.dumps(report, indent=2))

    if args.store:
        store_before = run_store(args, problems, runs, local_config, seed, previous, land, meta)
        meta["store"].update(store_before)
    else:
        asyncio.run(evaluate(args.addr, problems, runs, base, seed=seed, concurrency=args.concurrency,
                             timeout=args.timeout, progress=not args.no_progress,
                             done={r.key for r in previous}, on_result=land, security=security))
    meta["wall_seconds"] = time.perf_counter() - started
    if preset is not None and preset.throughput is not None and not args.no_throughput:
        meta["throughput"] = run_throughput(args, preset, problems, base, security, out.parent)
    report = build_report({**meta, "complete": True}, collected)
    out.write_text(json.dumps(report, indent=2))
    finish(args, report, collected, jsonl)


def run_store(args: argparse.Namespace, problems: Sequence[Problem], runs: Sequence[RunSpec],
              base: SearchConfig | None, seed: int, previous: Sequence[ProblemResult],
              land: Callable[[ProblemResult], None], meta: dict[str, Any]) -> dict[str, Any]:
    """``--store``: open (or create) the store, run in-process, say what was requested and drawn."""
    assert base is not None
    upstreams = LocalUpstreams(args.policy_url, args.reward_addr)
    store = SampleStore(args.store, {"created_by": meta["command"], "dataset": meta["dataset"]})
    before = {"samples_at_start": store.sample_count, "scores_at_start": len(store.scores),
              "embeddings_at_start": len(store.embeddings)}

    async def go() -> None:
        try:
            await evaluate_local(upstreams, store, problems, runs, base, seed=seed, concurrency=args.concurrency,
                                 paired=not args.unpaired, progress=not args.no_progress,
                                 done={r.key for r in previous}, on_result=land)
        finally:
            await upstreams.close()

    try:
        asyncio.run(go())
    finally:
        store.close()
    c = store.counts
    print(f"store {args.store}: {c.samples_requested} samples requested, {c.samples_drawn} drawn "
          f"({before['samples_at_start']} there at the start, {store.sample_count} now); "
          f"PRM scores {c.scores_requested} requested, {c.scores_computed} computed; "
          f"embeddings {c.embeds_requested} requested, {c.embeds_computed} computed")
    return {**before, "samples_at_end": store.sample_count, **asdict(c)}


def report_only(args: argparse.Namespace, argv: Sequence[str], problems: Sequence[Problem]) -> None:
    """``--report-only``: the report, table and plot of per-search files already written, over the
    data set's ``problems``: ``--limit`` applies, so a cut-off run can be reported over its first
    problems only (which configurations finished each one is not checked)."""
    collected: list[ProblemResult] = []
    for name in args.report_only:
        path = Path(name)
        if not path.exists():
            print(f"ets eval: --report-only {name}: no such file", file=sys.stderr)
            raise SystemExit(2)
        collected += read_jsonl(path)
    wanted = {p.id for p in problems}
    kept = [r for r in collected if r.id in wanted]
    if len(kept) < len(collected):
        print(f"ets eval: --report-only: {len(collected) - len(kept)} of {len(collected)} results are of problems "
              f"outside {args.dataset}{'' if args.limit is None else f' --limit {args.limit}'}; left out",
              file=sys.stderr)
    collected = kept
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
    paired = report["paired_vs_rebase"]
    table = markdown_table(summaries) + "\n\n" + paired_markdown(paired)
    if any(c.get("problems") for c in report.get("paired_vs_best_of_n", ())):
        table += ("\n\nAgainst best-of-N (weighted majority), paired:\n\n"
                  + paired_markdown(report["paired_vs_best_of_n"]))
    if report["early_stop"]:
        table += "\n\n" + early_stop_markdown(report["early_stop"])
    if report.get("extraction"):
        extraction = extraction_markdown(report["extraction"])
        table += "\n\nNumeric problems, strict against flexible extraction:\n\n" + extraction
        print(extraction)
    if report.get("throughput", {}).get("summary"):
        t = report["throughput"]
        table += (f"\n\nThroughput through the search service at the same settings ({t['addr']}, "
                  f"{t['problems']} problems cycled):\n\n" + throughput_markdown(t["summary"]))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    for c in paired:
        if c.get("problems"):
            lo, hi = c["kv_ratio_total_ci"]
            print(f"width {c['width']} {c['label']} (n={c['problems']}): "
                  f"REBASE/ETS KV total {c['kv_ratio_total']:.2f}x "
                  f"({lo:.2f}-{hi:.2f}), accuracy {100 * c['accuracy_difference']:+.1f} points "
                  f"(McNemar p {c['mcnemar_p']:.2f}): {c['verdict']}")
    for e in report["early_stop"]:
        g = e["generated_tokens"]
        print(f"width {e['width']} {e['label']} (n={e['problems']}): stopped early {e['stopped']}, same answer "
              f"{e['same_answer_where_stopped']}/{e['stopped']}, generated tokens saved {g['saved']:.0f} "
              f"({100 * g['saved_share']:.1f}%), samples drawn by the early runs {e['drawn_by_early']}")
    goal = report["goal"]
    print(f"goal line: paper's 1.8x {'met' if goal['paper_met'] else 'not met'}, "
          f"ours 2x {'met' if goal['ours_met'] else 'not met'}")
    if report["samples"]["requested"]:
        print(f"samples: {report['samples']['requested']} requested, {report['samples']['drawn']} drawn")
    print(f"results: {args.out}" + (f" (per search: {jsonl})" if jsonl else ""))
    name = Path(args.dataset).name
    if args.plot:
        plot(summaries, args.plot, title=args.title or f"{name}: accuracy vs KV tokens")
        print(f"plot: {args.plot}")
    if args.ratio_plot:
        plot_kv_ratio(paired, args.ratio_plot, title=f"{name}: REBASE/ETS logical KV (paired)")
        print(f"plot: {args.ratio_plot}")
    errors = sum(s.errors for s in summaries)
    if errors:
        print(f"ets eval: {errors} search(es) failed (see 'error' in {args.out})", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
