"""Closed-loop load on the search service: searches/min and latency against concurrency (issue 18).

    python bench/load.py --addr HOST:PORT --policy-url URL --search-metrics-url URL \\
        [--concurrency 1,2,4,8,16] [--methods ets,rebase] [--width 8] [--duration 45] \\
        [--data bench/data/arith_easy.jsonl --problems 8] [--out bench/results/load.json]
    python bench/load.py --start [--policy-max-total-tokens 2048] [--max-concurrent 8] ...   # its own stack

For each concurrency C and method (the methods alternate at each C, so machine drift hits both):
C clients each run one search after another (closed loop) over a fixed problem list, taken in
order from a shared counter, for ``--duration`` seconds; then no new search starts and the ones
in flight finish (they are counted: no search is cut off). The policy's prefix cache is flushed
before each (C, method) level. Per level it reports:

- searches/min (completed / time from the level's start to its last completion), latency
  p50/p95/p99 as the client sees it, and the service's admission split: queue wait (the
  service's ``ets_search_queue_wait_seconds``, mean over the level) vs run time (the search
  loop's own wall time, ``stats.wall_seconds``);
- generated tokens/s (the engine's ``sglang:generation_tokens_total`` over the level's time),
  the engine's running-batch size and queue (``sglang:num_running_reqs`` / ``num_queue_reqs``,
  sampled every ``--sample-s``), its KV pool (``sglang:kv_used_tokens``: slots held by running
  requests; ``kv_evictable_tokens``: the radix cache's unreferenced prefixes; as a share of the
  pool ``sglang:max_total_num_tokens``), evicted tokens and retracted requests (counters);
- prefix reuse: the engine's cached / prompt tokens over the level, and the searches' own sum;
- logical KV (total and peak, mean per search), accuracy against the data set's answers, and
  errors by gRPC status.

Writes JSON (``--out``, rewritten after every level, so a cut-off run keeps what it measured),
prints a Markdown table, and with ``--plot`` draws latency and throughput against C.
The parsing and percentile helpers are pure and tested (tests/benchmarks/test_load.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from stack import add_search_size_flags, flush_policy_cache  # the sibling benchmark's, shared

# SGLang's series this benchmark reads (srt/observability/metrics_collector.py). Counters keep
# their ``_total`` sample name; every series carries a ``model_name`` label (summed over here).
ENGINE_COUNTERS = (
    "sglang:prompt_tokens_total", "sglang:generation_tokens_total", "sglang:cached_tokens_total",
    "sglang:evicted_tokens_total", "sglang:num_retracted_requests_total",
    "sglang:queue_time_seconds_sum", "sglang:queue_time_seconds_count",
)
ENGINE_GAUGES = (
    "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:kv_used_tokens",
    "sglang:kv_evictable_tokens", "sglang:kv_available_tokens", "sglang:token_usage",
    "sglang:max_total_num_tokens",
)
SERVICE_COUNTERS = ("ets_search_queue_wait_seconds_sum", "ets_search_queue_wait_seconds_count")


# ---- pure helpers (tested) -----------------------------------------------------------------------

def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's
    default, "linear"); None for no values."""
    xs = sorted(float(v) for v in values)
    if not 0 <= q <= 100:
        raise ValueError(f"q: must be in [0, 100], got {q}")
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def parse_metrics(text: str, names: Iterable[str] | None = None) -> dict[str, float]:
    """Prometheus text exposition -> {sample name: value summed over its label sets}.

    ``names``: keep only these sample names (all when None). Histogram buckets (``_bucket``) are
    skipped unless named. Comments, blank lines and non-numeric values are ignored; NaN
    (SGLang's empty gauges) counts as absent."""
    wanted = set(names) if names is not None else None
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        if brace >= 0:
            name = line[:brace]
            close = line.rfind("}")
            rest = line[close + 1:].split()
        else:
            parts = line.split()
            name, rest = parts[0], parts[1:]
        if not rest:
            continue
        if wanted is not None and name not in wanted:
            continue
        if wanted is None and name.endswith("_bucket"):
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        if math.isnan(value):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """Counter increments between two scrapes (a series missing before counts from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


# Derived gauge: every KV slot not free (held by running requests, or cached and evictable).
KV_HELD = "kv_held_tokens"


def with_kv_held(samples: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    """The samples with ``KV_HELD`` (used + evictable) added where both gauges were read."""
    used, evictable = "sglang:kv_used_tokens", "sglang:kv_evictable_tokens"
    return [dict(s, **({KV_HELD: s[used] + s[evictable]} if used in s and evictable in s else {})) for s in samples]


def gauge_summary(samples: Sequence[Mapping[str, float]], name: str) -> dict[str, float | None]:
    """Mean and max of gauge ``name`` over the samples that carry it."""
    xs = [s[name] for s in samples if name in s]
    return {"mean": statistics.fmean(xs) if xs else None, "max": max(xs) if xs else None}


@dataclass
class Outcome:
    """One search as the load client saw it."""

    method: str
    problem: int
    start_s: float  # from the level's start
    end_s: float
    status: str  # "OK" or the gRPC status name
    correct: bool = False
    run_s: float = 0.0  # the search loop's own wall time (stats.wall_seconds)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    total_kv_tokens: int = 0
    peak_kv_tokens: int = 0
    detail: str = ""

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s


def summarise_level(outcomes: Sequence[Outcome], duration_s: float, engine_before: Mapping[str, float],
                    engine_after: Mapping[str, float], engine_samples: Sequence[Mapping[str, float]],
                    service_before: Mapping[str, float], service_after: Mapping[str, float]) -> dict[str, Any]:
    """One (C, method) row from the searches, two scrapes of each server and the gauge samples."""
    ok = [o for o in outcomes if o.status == "OK"]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status != "OK":
            errors[o.status] = errors.get(o.status, 0) + 1
    span = max((o.end_s for o in outcomes), default=0.0)
    eng = delta(engine_after, engine_before)
    svc = delta(service_after, service_before)
    lat = [o.latency_s for o in ok]
    prompt = eng.get("sglang:prompt_tokens_total", 0.0)
    own_prompt = sum(o.prompt_tokens for o in ok)
    pool = engine_after.get("sglang:max_total_num_tokens") or None
    used = gauge_summary(engine_samples, "sglang:kv_used_tokens")
    evictable = gauge_summary(engine_samples, "sglang:kv_evictable_tokens")
    held = gauge_summary(with_kv_held(engine_samples), KV_HELD)
    qcount = svc.get("ets_search_queue_wait_seconds_count", 0.0)
    ecount = eng.get("sglang:queue_time_seconds_count", 0.0)
    return {
        "searches": len(outcomes), "ok": len(ok), "errors": errors,
        "correct": sum(o.correct for o in ok), "accuracy": sum(o.correct for o in ok) / len(ok) if ok else None,
        "duration_s": duration_s, "span_s": span,
        "searches_per_min": 60 * len(ok) / span if span else 0.0,
        "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
        "latency_p99_s": percentile(lat, 99),
        "queue_wait_mean_s": svc.get("ets_search_queue_wait_seconds_sum", 0.0) / qcount if qcount else None,
        "run_mean_s": statistics.fmean(o.run_s for o in ok) if ok else None,
        "run_p50_s": percentile([o.run_s for o in ok], 50),
        "engine_queue_mean_s": eng.get("sglang:queue_time_seconds_sum", 0.0) / ecount if ecount else None,
        "engine_gen_tokens_per_s": eng.get("sglang:generation_tokens_total", 0.0) / span if span else 0.0,
        "search_gen_tokens_per_s": sum(o.generated_tokens for o in ok) / span if span else 0.0,
        "running_reqs": gauge_summary(engine_samples, "sglang:num_running_reqs"),
        "queued_reqs": gauge_summary(engine_samples, "sglang:num_queue_reqs"),
        "kv_pool_tokens": pool,
        "kv_used_tokens": used, "kv_evictable_tokens": evictable,
        "kv_held_max_tokens": held["max"],
        "kv_used_max_share": (used["max"] / pool) if pool and used["max"] is not None else None,
        "evicted_tokens": eng.get("sglang:evicted_tokens_total", 0.0),
        "retracted_requests": eng.get("sglang:num_retracted_requests_total", 0.0),
        "engine_prompt_tokens": prompt,
        "engine_cached_ratio": eng.get("sglang:cached_tokens_total", 0.0) / prompt if prompt else None,
        "search_cached_ratio": sum(o.cached_prompt_tokens for o in ok) / own_prompt if own_prompt else None,
        "mean_total_kv_tokens": statistics.fmean(o.total_kv_tokens for o in ok) if ok else None,
        "mean_peak_kv_tokens": statistics.fmean(o.peak_kv_tokens for o in ok) if ok else None,
        "mean_generated_tokens": statistics.fmean(o.generated_tokens for o in ok) if ok else None,
    }


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(levels: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| C | method | done | searches/min | p50 / p95 / p99 s | queue wait s | run s | gen tok/s | "
        "running reqs mean / max | KV used max (of pool) | evicted tok | retracted | engine reuse | "
        "KV total / peak | accuracy | errors |",
        "|---:|---|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in levels:
        s = r["summary"]
        pool = s["kv_pool_tokens"]
        share = s["kv_used_max_share"]
        kv_used = (f"{_fmt(s['kv_used_tokens']['max'], '.0f')} ({_fmt(100 * share if share is not None else None)}%"
                   f" of {_fmt(pool, '.0f')})")
        lines.append(
            f"| {r['concurrency']} | {r['label']} | {s['ok']} | {s['searches_per_min']:.2f} | "
            f"{_fmt(s['latency_p50_s'])} / {_fmt(s['latency_p95_s'])} / {_fmt(s['latency_p99_s'])} | "
            f"{_fmt(s['queue_wait_mean_s'])} | {_fmt(s['run_mean_s'])} | {s['engine_gen_tokens_per_s']:.1f} | "
            f"{_fmt(s['running_reqs']['mean'])} / {_fmt(s['running_reqs']['max'], '.0f')} | {kv_used} | "
            f"{s['evicted_tokens']:.0f} | {s['retracted_requests']:.0f} | "
            f"{_fmt(100 * s['engine_cached_ratio'] if s['engine_cached_ratio'] is not None else None)}% | "
            f"{_fmt(s['mean_total_kv_tokens'], '.0f')} / {_fmt(s['mean_peak_kv_tokens'], '.0f')} | "
            f"{s['correct']}/{s['ok']} | {s['errors'] or '-'} |")
    return "\n".join(lines)


def ratios(levels: Sequence[Mapping[str, Any]], a: str, b: str) -> list[dict[str, Any]]:
    """Per C: method a's searches/min and KV over method b's (side by side in one run)."""
    out = []
    for c in sorted({r["concurrency"] for r in levels}):
        by = {r["label"]: r["summary"] for r in levels if r["concurrency"] == c}
        if a in by and b in by and by[b]["searches_per_min"]:
            ka, kb = by[a]["mean_total_kv_tokens"], by[b]["mean_total_kv_tokens"]
            out.append({"concurrency": c, "throughput_ratio": by[a]["searches_per_min"] / by[b]["searches_per_min"],
                        "kv_total_ratio": (kb / ka) if ka and kb else None})
    return out


# ---- I/O --------------------------------------------------------------------------------------

def scrape(url: str | None, names: Iterable[str], timeout: float = 10.0) -> dict[str, float]:
    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return parse_metrics(resp.read().decode(), names)
    except (urllib.error.URLError, OSError):
        return {}


@dataclass
class Level:
    label: str  # method name, or method[overrides]
    method: str
    overrides: dict[str, float] = field(default_factory=dict)


async def run_level(addr: str, policy_metrics: str | None, service_metrics: str | None, level: Level,
                    concurrency: int, problems: Sequence[Any], base: dict[str, Any], duration_s: float,
                    sample_s: float, timeout_s: float) -> tuple[list[Outcome], dict[str, Any]]:
    import grpc

    from ets.api.v1 import search_pb2, search_pb2_grpc
    from ets.evaluation.report import answers_match

    outcomes: list[Outcome] = []
    samples: list[dict[str, float]] = []
    counter = 0
    t0 = time.perf_counter()
    stop_sampling = asyncio.Event()

    async def sampler() -> None:
        while not stop_sampling.is_set():
            snap = await asyncio.to_thread(scrape, policy_metrics, ENGINE_GAUGES, 5.0)
            if snap:
                snap["t"] = time.perf_counter() - t0
                samples.append(snap)
            try:
                await asyncio.wait_for(stop_sampling.wait(), sample_s)
            except TimeoutError:
                pass

    async def client(stub: Any) -> None:
        nonlocal counter
        while time.perf_counter() - t0 < duration_s:
            i = counter
            counter += 1
            p = problems[i % len(problems)]
            fields: dict[str, Any] = {**base, **level.overrides}
            config = search_pb2.SearchConfig(method=level.method, seed=1000 + i % len(problems), **fields)
            start = time.perf_counter() - t0
            try:
                reply = await stub.Search(search_pb2.SearchRequest(problem=p.problem, config=config,
                                                                   summary_only=True), timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                outcomes.append(Outcome(level.label, i % len(problems), start, time.perf_counter() - t0,
                                        err.code().name, detail=str(err.details())[:200]))
                continue
            s = reply.stats
            outcomes.append(Outcome(
                level.label, i % len(problems), start, time.perf_counter() - t0, "OK",
                correct=answers_match(reply.answer, p.answer), run_s=s.wall_seconds,
                generated_tokens=s.generated_tokens, prompt_tokens=s.prompt_tokens,
                cached_prompt_tokens=s.cached_prompt_tokens, total_kv_tokens=s.total_kv_tokens,
                peak_kv_tokens=s.peak_kv_tokens))

    engine_before = await asyncio.to_thread(scrape, policy_metrics, ENGINE_COUNTERS + ENGINE_GAUGES)
    service_before = await asyncio.to_thread(scrape, service_metrics, SERVICE_COUNTERS)
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        task = asyncio.create_task(sampler())
        t0 = time.perf_counter()
        await asyncio.gather(*(client(stub) for _ in range(concurrency)))
        stop_sampling.set()
        await task
    engine_after = await asyncio.to_thread(scrape, policy_metrics, ENGINE_COUNTERS + ENGINE_GAUGES)
    service_after = await asyncio.to_thread(scrape, service_metrics, SERVICE_COUNTERS)
    summary = summarise_level(outcomes, duration_s, engine_before, engine_after, samples, service_before,
                              service_after)
    return outcomes, {"summary": summary, "engine_samples": samples}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def run(args: argparse.Namespace, addr: str, policy_url: str | None, service_metrics: str | None,
              report: dict[str, Any], out: Path) -> None:
    from ets.evaluation.evaluate import load_dataset

    problems = load_dataset(args.data, limit=args.problems)
    base = {"width": args.width, "max_step_tokens": args.step_tokens, "max_tokens": args.max_tokens,
            "max_depth": args.max_depth}
    levels = []
    for spec in args.methods.split(","):
        spec = spec.strip()
        method, _, rest = spec.partition(":")
        overrides = {k: float(v) for k, v in (kv.split("=") for kv in rest.split(";") if kv)}
        levels.append(Level(spec.replace(":", "[") + ("]" if rest else ""), method, overrides))
    policy_metrics = f"{policy_url.rstrip('/')}/metrics" if policy_url else None
    import grpc

    from ets.api.v1 import search_pb2, search_pb2_grpc

    # Warm-up (a fresh CPU engine's first calls are slow): not measured. It has its own deadline
    # and retries what a starting stack answers (UNAVAILABLE, DEADLINE_EXCEEDED), so one slow
    # first call does not end the run before any level.
    retryable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    for attempt in range(1, args.warmup_tries + 1):
        try:
            async with grpc.aio.insecure_channel(addr) as channel:
                stub = search_pb2_grpc.SearchServiceStub(channel)
                await stub.Search(search_pb2.SearchRequest(
                    problem=problems[0].problem, summary_only=True,
                    config=search_pb2.SearchConfig(method="rebase", **base)), timeout=args.warmup_timeout)
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in retryable or attempt == args.warmup_tries:
                raise
            print(f"load: warm-up try {attempt} failed ({exc.code().name}); retrying", file=sys.stderr, flush=True)
            await asyncio.sleep(5.0)
    for c in [int(x) for x in args.concurrency.split(",")]:
        for level in levels:
            if policy_url:
                await asyncio.to_thread(flush_policy_cache, policy_url)
            load_before = load_average()
            t = time.perf_counter()
            outcomes, result = await run_level(addr, policy_metrics, service_metrics, level, c, problems, base,
                                               args.duration, args.sample_s, args.timeout)
            s = result["summary"]
            report["levels"].append({"concurrency": c, "label": level.label, "method": level.method,
                                     "overrides": level.overrides, "load_average_before": load_before,
                                     "load_average_after": load_average(), "wall_s": time.perf_counter() - t,
                                     **result, "outcomes": [asdict(o) for o in outcomes]})
            out.write_text(json.dumps(report, indent=1))
            print(f"load: C={c:<3} {level.label:<16} {s['ok']:>3} ok  {s['searches_per_min']:6.2f}/min  "
                  f"p50 {_fmt(s['latency_p50_s'])}s  queue {_fmt(s['queue_wait_mean_s'])}s  "
                  f"run {_fmt(s['run_mean_s'])}s  gen {s['engine_gen_tokens_per_s']:.1f} tok/s  "
                  f"batch {_fmt(s['running_reqs']['mean'])}  evicted {s['evicted_tokens']:.0f}  "
                  f"errors {s['errors'] or '-'}  load {load_before}", file=sys.stderr, flush=True)


def plot(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = sorted({r["label"] for r in report["levels"]})
    for label in labels:
        rows = sorted((r for r in report["levels"] if r["label"] == label), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rows]
        ax1.plot(cs, [r["summary"]["searches_per_min"] for r in rows], marker="o", label=label)
        p50 = [r["summary"]["latency_p50_s"] for r in rows]
        p95 = [r["summary"]["latency_p95_s"] for r in rows]
        line = ax2.plot(cs, p50, marker="o", label=f"{label} p50")[0]
        ax2.plot(cs, p95, marker="x", linestyle="--", color=line.get_color(), label=f"{label} p95")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent searches C")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("searches / min")
    ax2.set_ylabel("latency (s)")
    s = report["settings"]
    fig.suptitle(f"closed-loop load, width {s['width']}, {s['problems']} problems, "
                 f"pool {s.get('policy_max_total_tokens') or 'default'} tokens (2-core CPU, SmolLM2-135M)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", help="a running search service (HOST:PORT); else give --start")
    p.add_argument("--policy-url", help="its policy server (for /metrics and /flush_cache)")
    p.add_argument("--search-metrics-url", help="the search service's /metrics (queue wait)")
    p.add_argument("--start", action="store_true", help="start a CPU stack (real SmolLM2, arithmetic PRM) and use it")
    p.add_argument("--policy-max-total-tokens", type=int, default=None, help="with --start: the policy's KV pool")
    p.add_argument("--max-concurrent", type=int, default=None, help="with --start: ETS_MAX_CONCURRENT_SEARCHES")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--methods", default="ets,rebase",
                   help="comma list; overrides after a colon, ';'-separated: ets:lambda_c=5")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--data", default="bench/data/arith_easy.jsonl")
    add_search_size_flags(p, problems=8, step_tokens=32, max_tokens=224, max_depth=5)
    p.add_argument("--duration", type=float, default=45.0, help="seconds each level starts new searches")
    p.add_argument("--sample-s", type=float, default=0.5, help="engine gauge sampling interval")
    p.add_argument("--timeout", type=float, default=900.0, help="per-search deadline (s)")
    p.add_argument("--warmup-timeout", type=float, default=300.0, help="the unmeasured warm-up search's deadline (s)")
    p.add_argument("--warmup-tries", type=int, default=3, help="warm-up attempts on UNAVAILABLE / DEADLINE_EXCEEDED")
    p.add_argument("--out", default="bench/results/load.json")
    p.add_argument("--plot", default=None, help="write latency/throughput against C to this PNG")
    p.add_argument("--markdown-only", action="store_true", help="print the table and plot of --out; run nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.markdown_only:
        saved = json.loads(out.read_text())
        print(markdown(saved["levels"]))
        if args.plot:
            plot(saved, Path(args.plot))
        return 0
    if not args.addr and not args.start:
        p.error("give --addr (a running stack) or --start")
    report: dict[str, Any] = {
        "command": "python bench/load.py " + " ".join(argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("markdown_only",)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average_start": load_average(),
        "levels": [],
    }
    report["settings"]["problems"] = args.problems
    out.parent.mkdir(parents=True, exist_ok=True)
    stack = None
    try:
        if args.start:
            from ets.testing.stack import StackConfig, start_stack

            work = Path(tempfile.mkdtemp(prefix="ets-load-"))
            kw: dict[str, Any] = {"policy_max_total_tokens": args.policy_max_total_tokens}
            if args.max_concurrent is not None:
                kw["max_concurrent"] = args.max_concurrent
            print(f"load: starting the stack in {work}", file=sys.stderr, flush=True)
            stack = start_stack(StackConfig(work_dir=work, **kw))
            addr, policy_url, service_metrics = stack.search_addr, stack.policy_url, stack.search_metrics_url
        else:
            addr, policy_url, service_metrics = args.addr, args.policy_url, args.search_metrics_url
        asyncio.run(run(args, addr, policy_url, service_metrics, report, out))
    finally:
        if stack is not None:
            stack.stop()
    report["load_average_end"] = load_average()
    out.write_text(json.dumps(report, indent=1))
    print(markdown(report["levels"]))
    for a, b in (("ets", "rebase"),):
        for label in {r["label"] for r in report["levels"] if r["method"] == a}:
            for r in ratios(report["levels"], label, b):
                print(f"- C={r['concurrency']}: {label}/{b} searches/min {r['throughput_ratio']:.2f}x, "
                      f"{b}/{label} KV total {_fmt(r['kv_total_ratio'], '.2f')}x")
    if args.plot:
        plot(report, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
