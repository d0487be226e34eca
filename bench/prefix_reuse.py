"""The KV the engine holds: SGLang's prefix reuse per request against the sharable prefix (issue 15, section 4).

    python bench/prefix_reuse.py --policy-url URL --reward-addr HOST:PORT [--methods ets,rebase,beam,dvts]
        [--width 16] [--problems 3] [--concurrency 1] [--prefill-min-shared 2] [--out bench/results/prefix_reuse.json]
    python bench/prefix_reuse.py ... --fanout-ab REPS [--fanout-tokens 1]     # the root fan-out alone, prefill off/on

Runs the search core in-process (``ets.search.loop.run_search``, the service's own generator and
reward client) against a live policy engine and reward server, and records every engine request
of every search: its prompt ids, the sampled ids and the engine's ``prompt_tokens`` /
``cached_tokens`` (SGLang: the prefix length its radix cache matched when the request was first
prefilled, ``schedule_batch.py``: ``req.cached_tokens += pre_len - req.already_computed``).

*Sharable* tokens of a request: the longest prefix of its prompt that some earlier request of the
same search already put in the engine's KV (an earlier request's prompt, or its prompt plus its
sampled ids but the last one, whose KV is never computed), at most the prompt length minus one
(the engine always computes the last prompt token to get the next token's logits). Earlier means
sent earlier: a previous depth, or earlier in the same batched call (SGLang's lpm scheduler
defers in-batch duplicates of an uncached prefix until the first is cached). So the engine could
serve every sharable token from cache; ``cached / sharable`` is how much of that it did, and
``sharable / prompt`` is the ceiling of the usual "cached / prompt" ratio.

The search's generator is the service's own, prefill-first rule included (``--prefill-min-shared``,
``ets.policy.generator``; 0 turns it off for the control): its prefill-only requests are recorded
like any other (no output ids; they put their whole prompt in the engine), and their prompt tokens
count in every ratio.

The policy's cache is flushed before each search (``--concurrency 1``: one search at a time, so the
figures are the search's own); with ``--concurrency K`` K searches of different problems run at
once, as ``ets eval --concurrency`` runs them, and share the engine's pool. During each search
the engine's KV pool is sampled every 0.3 s from its /metrics (``sglang:kv_used_tokens``: held by
running requests; ``kv_evictable_tokens``: cached, unreferenced; ``token_usage``; SGLang updates
these gauges when the scheduler logs stats: every prefill batch and every ``decode_log_interval``
decode steps) and reported as peak and time-mean next to the search's logical KV peak and total.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load as load_bench  # the sibling benchmark: metrics helpers
from stack import add_search_size_flags  # the sibling benchmarks' search-size flags
from ets.search.config import SearchConfig
from ets.policy.client import PolicyClient
from ets.policy.generator import PREFILL_MIN_SHARED, SGLangStepGenerator, tokenize_root
from ets.search.loop import run_search


# ---- pure part ---------------------------------------------------------------------------------

class TokenTrie:
    """Token-id sequences; ``match(ids)`` is the longest prefix of ``ids`` present."""

    def __init__(self) -> None:
        self.root: dict[int, Any] = {}

    def insert(self, ids: Sequence[int]) -> None:
        node = self.root
        for t in ids:
            node = node.setdefault(t, {})

    def match(self, ids: Sequence[int]) -> int:
        node, n = self.root, 0
        for t in ids:
            nxt = node.get(t)
            if nxt is None:
                break
            node, n = nxt, n + 1
        return n


@dataclass
class Request:
    """One engine request of a search: sent in call ``call`` at position ``index``."""

    call: int
    index: int
    prompt: tuple[int, ...]
    output: tuple[int, ...]
    prompt_tokens: int
    cached_tokens: int
    sharable: int = 0


def assign_sharable(requests: Sequence[Request]) -> None:
    """Set ``sharable`` on each request (module docstring), in the order the requests were sent."""
    seen = TokenTrie()
    for r in sorted(requests, key=lambda r: (r.call, r.index)):
        r.sharable = min(max(len(r.prompt) - 1, 0), seen.match(r.prompt))
        seen.insert(r.prompt)
        if len(r.output) > 1:
            seen.insert(r.prompt + r.output[:-1])


def reuse_summary(requests: Sequence[Request]) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in requests)
    cached = sum(r.cached_tokens for r in requests)
    sharable = sum(r.sharable for r in requests)
    short = [r for r in requests if r.cached_tokens < r.sharable]
    return {
        "requests": len(requests), "prompt_tokens": prompt, "cached_tokens": cached, "sharable_tokens": sharable,
        "cached_over_prompt": cached / prompt if prompt else None,
        "sharable_over_prompt": sharable / prompt if prompt else None,
        "cached_over_sharable": cached / sharable if sharable else None,
        "requests_short": len(short), "tokens_short": sum(r.sharable - r.cached_tokens for r in short),
        # Misses of the first request of a call (the engine saw it first) vs later ones.
        "short_by_position": {"first_of_call": sum(1 for r in short if r.index == 0),
                              "later_in_call": sum(1 for r in short if r.index > 0)},
        "cached_above_sharable": sum(1 for r in requests if r.cached_tokens > r.sharable),
    }


def occupancy(samples: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """Peak and mean of the engine's KV pool over one search's gauge samples: ``used`` (slots held
    by running requests), ``held`` (used + evictable: every slot not free, the radix cache
    included) and ``token_usage`` (SGLang's own used / pool ratio)."""
    samples = load_bench.with_kv_held(samples)
    out: dict[str, float | None] = {}
    for key, gauge in (("used", "sglang:kv_used_tokens"), ("held", load_bench.KV_HELD),
                       ("token_usage", "sglang:token_usage")):
        summary = load_bench.gauge_summary(samples, gauge)
        out[f"{key}_peak"], out[f"{key}_mean"] = summary["max"], summary["mean"]
    return out


# ---- live part -----------------------------------------------------------------------------------

# The engine's pool gauges sampled during a search (load.py's set plus SGLang's own used count).
GAUGES = tuple(load_bench.ENGINE_GAUGES) + ("sglang:num_used_tokens",)


class RecordingClient(PolicyClient):
    """The policy client, recording every request of every ``generate`` call (the generator's
    prefill-only requests included) with the engine's own per-request numbers."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.requests: list[Request] = []
        self.calls = 0

    async def generate(self, prompts: Sequence[Sequence[int]], params: Any, **kw: Any) -> Any:
        out = await super().generate(prompts, params, **kw)
        call, self.calls = self.calls, self.calls + 1
        i = 0
        for prompt, samples in zip(prompts, out, strict=True):
            for smp in samples:
                self.requests.append(Request(call, i, tuple(prompt), tuple(smp.output_ids), int(smp.prompt_tokens),
                                             int(smp.cached_tokens)))
                i += 1
        return out


async def one_search(policy_url: str, reward: Any, problem: Any, method: str, args: argparse.Namespace,
                     seed: int) -> dict[str, Any]:
    config = SearchConfig(method=method, width=args.width, temperature=0.7, max_step_tokens=args.step_tokens,
                          max_tokens=args.max_tokens, max_depth=args.max_depth, seed=seed,
                          policy_model_type=args.policy_model_type, prm_type=args.prm_type)
    # One client per search: its record is this search's engine requests only.
    async with RecordingClient(policy_url) as rec:
        return await _one_search(policy_url, reward, rec, problem, method, args, config)


async def _one_search(policy_url: str, reward: Any, rec: RecordingClient, problem: Any, method: str,
                      args: argparse.Namespace, config: SearchConfig) -> dict[str, Any]:
    root = await tokenize_root(rec, problem.problem, config.policy_model_type)
    generator = SGLangStepGenerator(rec, config.policy_model_type, prefill_min_shared=args.prefill_min_shared)
    samples: list[dict[str, float]] = []
    done = asyncio.Event()
    t0 = time.perf_counter()

    async def sampler() -> None:
        while not done.is_set():
            snap = await asyncio.to_thread(load_bench.scrape, f"{policy_url}/metrics", GAUGES, 5.0)
            if snap:
                snap["t"] = time.perf_counter() - t0
                samples.append(snap)
            try:
                await asyncio.wait_for(done.wait(), 0.3)
            except TimeoutError:
                pass

    before = await asyncio.to_thread(load_bench.scrape, f"{policy_url}/metrics", load_bench.ENGINE_COUNTERS)
    task = asyncio.create_task(sampler())
    result = await run_search(root, config, generator, reward)
    done.set()
    await task
    after = await asyncio.to_thread(load_bench.scrape, f"{policy_url}/metrics", load_bench.ENGINE_COUNTERS)
    assign_sharable(rec.requests)
    eng = load_bench.delta(after, before)
    occ = occupancy(samples)
    st = result.stats
    return {
        "method": method, "problem": problem.id, "width": args.width, "prefill_min_shared": args.prefill_min_shared,
        "logical_kv_total": st.total_kv_tokens, "logical_kv_peak": st.peak_kv_tokens,
        "generated_tokens": st.generated_tokens, "depth": st.depth_reached, "wall_s": st.wall_seconds,
        # The search's own stats count the prefill requests too (folded into samples): they
        # must equal the sum over the recorded engine requests.
        "stats_prompt_tokens": st.prompt_tokens, "stats_cached_prompt_tokens": st.cached_prompt_tokens,
        "engine_prompt_tokens": eng.get("sglang:prompt_tokens_total", 0.0),
        "engine_cached_tokens": eng.get("sglang:cached_tokens_total", 0.0),
        "prefill_requests": sum(1 for r in rec.requests if not r.output),
        "engine_kv_used_max": occ["used_peak"], "engine_kv_held_max": occ["held_peak"],
        "engine_kv": occ,
        "engine_evicted_tokens": eng.get("sglang:evicted_tokens_total", 0.0),
        "engine_retracted": eng.get("sglang:num_retracted_requests_total", 0.0),
        "reuse": reuse_summary(rec.requests),
        "requests": [[r.call, r.index, len(r.prompt), r.prompt_tokens, r.cached_tokens, r.sharable]
                     for r in rec.requests],
        "kv_samples": [[round(s["t"], 2), s.get("sglang:kv_used_tokens"), s.get("sglang:kv_evictable_tokens"),
                        s.get("sglang:token_usage")] for s in samples],
    }


async def run(args: argparse.Namespace, report: dict[str, Any], out: Path) -> None:
    from ets.evaluation.evaluate import load_dataset
    from ets.reward.client import RewardClient

    problems = load_dataset(args.data, limit=args.problems)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    jobs = [(p, m) for p in problems for m in methods]
    reward = RewardClient(args.reward_addr)
    try:
        for start in range(0, len(jobs), args.concurrency):
            batch = jobs[start:start + args.concurrency]
            await asyncio.to_thread(load_bench.flush_policy_cache, args.policy_url)
            rows = await asyncio.gather(*(one_search(args.policy_url, reward, p, m, args,
                                                     seed=11 + problems.index(p)) for p, m in batch))
            for row in rows:
                row["concurrency"] = args.concurrency
                report["searches"].append(row)
                u = row["reuse"]
                print(f"reuse: {row['method']:<10} {row['problem']:<10} cached/prompt "
                      f"{u['cached_over_prompt']:.3f}  sharable/prompt {u['sharable_over_prompt']:.3f}  "
                      f"cached/sharable {u['cached_over_sharable']:.3f}  short {u['requests_short']}/"
                      f"{u['requests']} ({u['tokens_short']} tok)  evicted {row['engine_evicted_tokens']:.0f}  "
                      f"KV logical peak {row['logical_kv_peak']} engine held max {row['engine_kv_held_max']}",
                      file=sys.stderr, flush=True)
            out.write_text(json.dumps(report, indent=1))
    finally:
        await reward.close()


async def fanout_ab(args: argparse.Namespace, report: dict[str, Any], out: Path) -> None:
    """Where the prefill pays: the root fan-out alone (``--width`` samples of each problem's root,
    ``--fanout-tokens`` new tokens each), prefill off and on in alternating order, the policy's
    cache flushed before each; wall time of the whole expand and cached prompt tokens."""
    from ets.evaluation.evaluate import load_dataset
    from ets.search.interfaces import ExpandRequest, StepParams

    problems = load_dataset(args.data, limit=args.problems)
    rows = report.setdefault("fanout_ab", [])
    async with RecordingClient(args.policy_url) as client:
        for rep in range(args.fanout_ab):
            for problem in problems:
                root = await tokenize_root(client, problem.problem, args.policy_model_type)
                modes = (0, PREFILL_MIN_SHARED) if rep % 2 == 0 else (PREFILL_MIN_SHARED, 0)
                for mode in modes:
                    await asyncio.to_thread(load_bench.flush_policy_cache, args.policy_url)
                    gen = SGLangStepGenerator(client, args.policy_model_type, prefill_min_shared=mode)
                    t0 = time.perf_counter()
                    [steps] = await gen.expand([ExpandRequest(root.prompt_ids, args.width)],
                                               StepParams(args.fanout_tokens, 0.7))
                    wall = time.perf_counter() - t0
                    rows.append({"rep": rep, "problem": problem.id, "prefill": bool(mode), "wall_s": wall,
                                 "root_tokens": len(root.prompt_ids), "width": args.width,
                                 "new_tokens": args.fanout_tokens,
                                 "prompt_tokens": sum(x.prompt_tokens for x in steps),
                                 "cached_tokens": sum(x.cached_tokens for x in steps)})
                    print(f"fanout: {problem.id} prefill {'on ' if mode else 'off'} {wall:.3f}s "
                          f"cached {rows[-1]['cached_tokens']}/{rows[-1]['prompt_tokens']}", file=sys.stderr,
                          flush=True)
                    out.write_text(json.dumps(report, indent=1))
    summary = {}
    for mode in (False, True):
        rs = [r for r in rows if r["prefill"] is mode]
        summary["on" if mode else "off"] = {
            "n": len(rs), "median_wall_s": statistics.median(r["wall_s"] for r in rs),
            "cached_tokens": sum(r["cached_tokens"] for r in rs), "prompt_tokens": sum(r["prompt_tokens"] for r in rs)}
    report["fanout_ab_summary"] = summary


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def summarise(searches: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = {(s["concurrency"], s.get("prefill_min_shared", 0), s["method"]) for s in searches}
    for key in sorted(keys):
        rs = [s for s in searches if (s["concurrency"], s.get("prefill_min_shared", 0), s["method"]) == key]
        prompt = sum(s["reuse"]["prompt_tokens"] for s in rs)
        cached = sum(s["reuse"]["cached_tokens"] for s in rs)
        sharable = sum(s["reuse"]["sharable_tokens"] for s in rs)
        kv = [s.get("engine_kv") or {} for s in rs]
        out.append({"concurrency": key[0], "prefill_min_shared": key[1], "method": key[2], "searches": len(rs),
                    "cached_over_prompt": cached / prompt if prompt else None,
                    "sharable_over_prompt": sharable / prompt if prompt else None,
                    "cached_over_sharable": cached / sharable if sharable else None,
                    "worst_cached_over_sharable": min(s["reuse"]["cached_over_sharable"] or 0 for s in rs),
                    "evicted_tokens": sum(s["engine_evicted_tokens"] for s in rs),
                    "mean_logical_kv_peak": statistics.fmean(s["logical_kv_peak"] for s in rs),
                    "mean_logical_kv_total": statistics.fmean(s["logical_kv_total"] for s in rs),
                    "mean_engine_kv_held_max": statistics.fmean(s["engine_kv_held_max"] or 0 for s in rs),
                    # Per search: the peak and the time-mean of the pool gauges; here their means.
                    "engine_kv_used_peak": _mean([k.get("used_peak") for k in kv]),
                    "engine_kv_used_mean": _mean([k.get("used_mean") for k in kv]),
                    "engine_kv_held_peak": _mean([k.get("held_peak") for k in kv]),
                    "engine_kv_held_mean": _mean([k.get("held_mean") for k in kv]),
                    "engine_token_usage_peak": _mean([k.get("token_usage_peak") for k in kv])})
    return out


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.0f}"


def table(summary: Sequence[dict[str, Any]]) -> str:
    rows = ["| concurrency | prefill | method | searches | cached / prompt | sharable / prompt | cached / sharable "
            "(worst) | evicted tok | logical KV peak / total | engine KV used peak / mean | "
            "engine KV held peak / mean |",
            "|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for s in summary:
        rows.append(
            f"| {s['concurrency']} | {'on' if s['prefill_min_shared'] else 'off'} | {s['method']} | {s['searches']} | "
            f"{_fmt(s['cached_over_prompt'], True)} | {_fmt(s['sharable_over_prompt'], True)} | "
            f"{_fmt(s['cached_over_sharable'], True)} ({_fmt(s['worst_cached_over_sharable'], True)}) | "
            f"{s['evicted_tokens']:.0f} | {s['mean_logical_kv_peak']:.0f} / {s['mean_logical_kv_total']:.0f} | "
            f"{_fmt(s.get('engine_kv_used_peak'))} / {_fmt(s.get('engine_kv_used_mean'))} | "
            f"{_fmt(s.get('engine_kv_held_peak'))} / {_fmt(s.get('engine_kv_held_mean'))} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy-url", required=True)
    p.add_argument("--reward-addr", required=True)
    p.add_argument("--methods", default="ets,rebase,beam,dvts")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--data", default="bench/data/arith_easy.jsonl")
    add_search_size_flags(p, problems=3, step_tokens=64, max_tokens=320, max_depth=6)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--policy-model-type", default="smollm2-instruct")
    p.add_argument("--prm-type", default="arithmetic")
    p.add_argument("--prefill-min-shared", type=int, default=PREFILL_MIN_SHARED,
                   help="the generator's prefill-first threshold (0: off, the control)")
    p.add_argument("--out", default="bench/results/prefix_reuse.json")
    p.add_argument("--fanout-ab", type=int, default=0, metavar="REPS",
                   help="instead of searches: time the root fan-out with the prefill off and on, REPS rounds "
                        "(added to --out's report)")
    p.add_argument("--fanout-tokens", type=int, default=1, help="new tokens per sample in --fanout-ab")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": "python bench/prefix_reuse.py " + " ".join(argv),
                              "load_average_start": load_bench.load_average(), "searches": []}
    if args.fanout_ab:
        report = json.loads(out.read_text()) if out.exists() else report
        report["fanout_command"] = "python bench/prefix_reuse.py " + " ".join(argv)
        report["fanout_load_average_start"] = load_bench.load_average()
        asyncio.run(fanout_ab(args, report, out))
        report["fanout_load_average_end"] = load_bench.load_average()
        out.write_text(json.dumps(report, indent=1))
        print(json.dumps(report["fanout_ab_summary"], indent=1))
        return 0
    asyncio.run(run(args, report, out))
    report["load_average_end"] = load_bench.load_average()
    report["summary"] = summarise(report["searches"])
    out.write_text(json.dumps(report, indent=1))
    print(table(report["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
