"""Benchmark the whole CPU stack: ETS vs REBASE vs beam vs best-of-N at widths 16 and 64.

    .venv/bin/python bench/stack.py [--widths 16,64] [--methods ets,rebase,beam,best_of_n]
        [--problems 3] [--out bench/results/stack.json] [--addr HOST:PORT --policy-url URL]

Starts the stack with ``ets.testing.stack`` (tiny policy + tiny math-shepherd PRM on SGLang CPU,
reward server, search service; ``--policy smollm2-135m-instruct`` for the real policy) unless
``--addr`` points at a running one. The same problems and
seeds run under every method and width, one search at a time, with the policy's prefix cache
flushed before each search so its cached-token ratio is the search's own reuse. Per (width,
method) it reports logical KV tokens (total = sum over selections, and peak), the engine's
cached-prompt-token ratio, generated tokens, wall time, and the service's own overhead: wall
time outside policy and reward calls (selection, tree bookkeeping, gRPC and conversion), per
search step and as a share of wall time. The ETS/REBASE ratio of mean total and peak KV tokens
is printed per width. Writes JSON (``--out``) and prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from ets.api.v1 import search_pb2, search_pb2_grpc

PROBLEMS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "A box holds 12 pencils. How many pencils are in 4 boxes?",
    "A train travels 60 miles per hour for 3 hours. How far does it travel?",
    "Mia had 50 dollars and spent 18 dollars on a book. How much money does she have left?",
    "A baker makes 7 trays of 9 cookies. He sells 20 cookies. How many cookies remain?",
]


def flush_policy_cache(policy_url: str) -> bool:
    """Empty the policy's radix cache. SGLang refuses (HTTP 400) while any request runs, e.g. the
    search service's one-token /health probe, so wait for idle (``timeout``) and retry."""
    import urllib.error
    import urllib.request

    for _ in range(10):
        req = urllib.request.Request(f"{policy_url.rstrip('/')}/flush_cache?timeout=5", method="POST", data=b"")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
                return True
        except urllib.error.HTTPError:  # busy: SGLang refuses to flush while a request runs
            time.sleep(0.5)
    print("bench: warning: policy cache not flushed (server kept busy)", file=sys.stderr)
    return False


async def run(addr: str, policy_url: str | None, widths: list[int], methods: list[str], problems: list[str],
              step_tokens: int, max_tokens: int, max_depth: int, seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        # Warm-up (first calls on a fresh CPU engine are slow): not measured.
        await stub.Search(search_pb2.SearchRequest(problem="warm up", config=search_pb2.SearchConfig(
            method="rebase", width=4, max_step_tokens=step_tokens, max_tokens=max_tokens, max_depth=2)), timeout=600)
        for width in widths:
            for pi, problem in enumerate(problems):
                for method in methods:
                    flushed = await asyncio.to_thread(flush_policy_cache, policy_url) if policy_url else False
                    config = search_pb2.SearchConfig(method=method, width=width, max_step_tokens=step_tokens,
                                                     max_tokens=max_tokens, max_depth=max_depth, seed=seed + pi)
                    t0 = time.perf_counter()
                    reply = await stub.Search(search_pb2.SearchRequest(problem=problem, config=config), timeout=600)
                    client_wall = time.perf_counter() - t0
                    s = reply.stats
                    rows.append({
                        "width": width, "method": method, "problem": pi,
                        "total_kv_tokens": s.total_kv_tokens, "peak_kv_tokens": s.peak_kv_tokens,
                        "prompt_tokens": s.prompt_tokens, "cached_prompt_tokens": s.cached_prompt_tokens,
                        "generated_tokens": s.generated_tokens, "model_calls": s.model_calls,
                        "selections": s.selections, "depth_reached": s.depth_reached,
                        "wall_seconds": s.wall_seconds, "client_wall_seconds": client_wall,
                        "policy_seconds": s.policy_seconds, "reward_seconds": s.reward_seconds,
                        "selection_seconds": s.selection_seconds, "solver_fallbacks": s.solver_fallbacks,
                        "finished": len(reply.candidates), "cache_flushed": flushed,
                    })
                    print(f"  w{width:<3} {method:<10} p{pi}: KV {s.total_kv_tokens:>7} (peak {s.peak_kv_tokens:>6}) "
                          f"gen {s.generated_tokens:>6} cached {s.cached_prompt_tokens}/{s.prompt_tokens} "
                          f"wall {s.wall_seconds:.2f}s", file=sys.stderr, flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = sorted({(r["width"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for width, method in keys:
        rs = [r for r in rows if r["width"] == width and r["method"] == method]
        wall = sum(r["wall_seconds"] for r in rs)
        overhead = sum(r["wall_seconds"] - r["policy_seconds"] - r["reward_seconds"] for r in rs)
        selection = sum(r["selection_seconds"] for r in rs)
        rpc = sum(r["client_wall_seconds"] - r["wall_seconds"] for r in rs)
        steps = sum(r["selections"] for r in rs)
        prompt = sum(r["prompt_tokens"] for r in rs)
        out.append({
            "width": width, "method": method, "searches": len(rs),
            "mean_total_kv_tokens": statistics.fmean(r["total_kv_tokens"] for r in rs),
            "mean_peak_kv_tokens": statistics.fmean(r["peak_kv_tokens"] for r in rs),
            "cached_ratio": sum(r["cached_prompt_tokens"] for r in rs) / prompt if prompt else 0.0,
            "mean_generated_tokens": statistics.fmean(r["generated_tokens"] for r in rs),
            "mean_wall_seconds": wall / len(rs),
            "generated_tokens_per_second": sum(r["generated_tokens"] for r in rs) / wall if wall else 0.0,
            "overhead_share": overhead / wall if wall else 0.0,
            "selection_share": selection / wall if wall else 0.0,
            "overhead_ms_per_step": 1000 * overhead / steps if steps else 0.0,
            # gRPC + queueing + response conversion as the client sees it, per search.
            "rpc_overhead_ms_per_search": 1000 * rpc / len(rs),
            "mean_depth": statistics.fmean(r["depth_reached"] for r in rs),
        })
    return out


def ratios(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for width in sorted({s["width"] for s in summary}):
        by = {s["method"]: s for s in summary if s["width"] == width}
        if "ets" in by and "rebase" in by:
            out.append({
                "width": width,
                "ets_over_rebase_total_kv": by["ets"]["mean_total_kv_tokens"] / by["rebase"]["mean_total_kv_tokens"],
                "ets_over_rebase_peak_kv": by["ets"]["mean_peak_kv_tokens"] / by["rebase"]["mean_peak_kv_tokens"],
            })
    return out


def markdown(summary: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> str:
    lines = [
        "| width | method | KV total (mean) | KV peak (mean) | engine cached ratio | generated tok | wall s | "
        "gen tok/s | service overhead | of which selection | overhead ms/step | RPC ms/search |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['width']} | {s['method']} | {s['mean_total_kv_tokens']:.0f} | {s['mean_peak_kv_tokens']:.0f} | "
            f"{100 * s['cached_ratio']:.1f}% | {s['mean_generated_tokens']:.0f} | {s['mean_wall_seconds']:.2f} | "
            f"{s['generated_tokens_per_second']:.0f} | {100 * s['overhead_share']:.1f}% | "
            f"{100 * s['selection_share']:.1f}% | {s['overhead_ms_per_step']:.1f} | "
            f"{s['rpc_overhead_ms_per_search']:.1f} |")
    lines.append("")
    for r in ratio_rows:
        lines.append(f"- width {r['width']}: ETS/REBASE KV tokens total {r['ets_over_rebase_total_kv']:.2f}x, "
                     f"peak {r['ets_over_rebase_peak_kv']:.2f}x")
    return "\n".join(lines)


def add_search_size_flags(p: argparse.ArgumentParser, *, problems: int, step_tokens: int, max_tokens: int,
                          max_depth: int) -> None:
    """How many problems and how long each search may run: the flags every stack benchmark
    (this one, load.py, prefix_reuse.py) takes, with its own defaults."""
    p.add_argument("--problems", type=int, default=problems)
    p.add_argument("--step-tokens", type=int, default=step_tokens)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--max-depth", type=int, default=max_depth)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="16,64")
    p.add_argument("--methods", default="ets,rebase,beam,best_of_n")
    add_search_size_flags(p, problems=3, step_tokens=16, max_tokens=160, max_depth=8)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default="bench/results/stack.json")
    p.add_argument("--addr", default=None, help="use a running search service instead of starting the stack")
    p.add_argument("--policy-url", default=None, help="with --addr: the policy server (to flush its cache)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--policy", default="tiny",
                   help="the stack's policy: tiny (the recorded table) or a packaged real model (ets models list)")
    p.add_argument("--prm-type", default="math-shepherd", help="the stack's PRM type (math-shepherd: the tiny PRM)")
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    problems = PROBLEMS[: args.problems]

    stack = None
    started = time.perf_counter()
    try:
        if args.addr:
            addr, policy_url = args.addr, args.policy_url
        else:
            from ets.testing.stack import StackConfig, start_stack

            work = Path(args.work_dir or tempfile.mkdtemp(prefix="ets-bench-"))
            print(f"bench: starting the stack in {work}", file=sys.stderr, flush=True)
            # Width 64 with long prefixes needs a larger KV pool than the CPU default.
            stack = start_stack(StackConfig(work_dir=work, max_concurrent=1, policy_max_total_tokens=32768,
                                            policy=args.policy, prm_type=args.prm_type))
            addr, policy_url = stack.search_addr, stack.policy_url
            print(f"bench: stack up in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rows = asyncio.run(run(addr, policy_url, widths, methods, problems, args.step_tokens, args.max_tokens,
                               args.max_depth, args.seed))
        bench_seconds = time.perf_counter() - t0
    finally:
        if stack is not None:
            stack.stop()
    summary = summarise(rows)
    ratio_rows = ratios(summary)
    report = {
        "command": "python bench/stack.py " + " ".join(argv),
        "settings": {"widths": widths, "methods": methods, "problems": len(problems), "step_tokens": args.step_tokens,
                     "max_tokens": args.max_tokens, "max_depth": args.max_depth, "seed": args.seed},
        "bench_seconds": bench_seconds, "summary": summary, "ets_over_rebase": ratio_rows, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown(summary, ratio_rows))
    print(f"\nbench: {len(rows)} searches in {bench_seconds:.0f}s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
