"""Benchmark how one search depth's expansions are sent to SGLang: repeated prompts vs SGLang's ``n``.

    .venv/bin/python bench/policy_batching.py [--nodes 4] [--n 4] [--prefix 256] [--step 32]
        [--reps 5] [--url URL] [--out bench/results/policy_batching.json]

One depth = ``--nodes`` candidates sharing a ``--prefix``-token root, each with its own
32-token parent step, each expanded into ``--n`` children of ``--step`` tokens (ignore_eos,
so every variant does the same decode work). Variants, each one ``/generate`` call per depth:
- ``repeat``: every sample its own prompt (node ids repeated ``n`` times), ``n = 1`` - what
  ``SGLangStepGenerator`` does (allows a different n per node and distinct per-sample seeds);
- ``sglang_n``: one prompt per node with SGLang's ``n`` (only possible when every node has the
  same n; SGLang first runs one prefix-warmup request per prompt, awaited one after another).
The prefix cache is flushed before each repetition, then the shared root is warmed (as in a
search, where the parents were just generated). Reported per variant: wall time per depth
(median of ``--reps``), prompt tokens the engine prefilled (prompt - cached, from
``/metrics`` deltas, so the hidden warmups of ``sglang_n`` are counted too) and the cached
share. Starts a tiny-policy SGLang CPU server unless ``--url`` is given.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ets.policy.client import PolicyClient, SamplingParams

_METRIC = re.compile(
    r"^(sglang:(?:prompt_tokens_total|cached_tokens_total|generation_tokens_total))\{[^}]*\}\s+([0-9.e+]+)$", re.M)


async def counters(client: PolicyClient) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in _METRIC.findall(await client.metrics_text()):
        out[name] = out.get(name, 0.0) + float(value)
    return out


async def settled_counters(client: PolicyClient, previous: dict[str, float] | None = None) -> dict[str, float]:
    """Counters once they stop moving (the scheduler exports them just after responding)."""
    last = await counters(client)
    for _ in range(20):
        await asyncio.sleep(0.1)
        now = await counters(client)
        if now == last:
            return now
        last = now
    return last


async def one_depth(client: PolicyClient, variant: str, nodes: list[list[int]], n: int, step: int) -> dict[str, Any]:
    params = SamplingParams(max_new_tokens=step, temperature=1.0, ignore_eos=True)
    await client.flush_cache()
    # Warm the parents: in a search they were generated one depth earlier and sit in the cache.
    await client.generate(nodes, SamplingParams(max_new_tokens=1, ignore_eos=True))
    before = await settled_counters(client)
    start = time.perf_counter()
    if variant == "repeat":
        flat = [ids for ids in nodes for _ in range(n)]
        result = await client.generate(flat, params)
        samples = [s for x in result for s in x]
    else:
        result = await client.generate(nodes, params, n=n)
        samples = [s for x in result for s in x]
    wall = time.perf_counter() - start
    after = await settled_counters(client)
    prompt = after.get("sglang:prompt_tokens_total", 0.0) - before.get("sglang:prompt_tokens_total", 0.0)
    cached = after.get("sglang:cached_tokens_total", 0.0) - before.get("sglang:cached_tokens_total", 0.0)
    assert len(samples) == len(nodes) * n
    return {"wall_s": wall, "engine_prompt_tokens": prompt, "engine_cached_tokens": cached,
            "prefilled_tokens": prompt - cached,
            "reported_prompt_tokens": sum(s.prompt_tokens for s in samples),
            "reported_cached_tokens": sum(s.cached_tokens for s in samples)}


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    async with PolicyClient(url, timeout_s=600) as client:
        root = await client.tokenize("Root " + " ".join(str(i % 97) for i in range(args.prefix)))
        root = root[: args.prefix]
        nodes = [root + [(37 * k + j) % 400 + 20 for j in range(32)] for k in range(args.nodes)]
        # One untimed round to warm up kernels and the grammar of the server.
        await one_depth(client, "repeat", nodes, args.n, args.step)
        results: dict[str, list[dict[str, Any]]] = {"repeat": [], "sglang_n": []}
        for _ in range(args.reps):
            for variant in results:
                results[variant].append(await one_depth(client, variant, nodes, args.n, args.step))
    summary = {}
    for variant, runs in results.items():
        summary[variant] = {
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "prefilled_tokens_median": statistics.median(r["prefilled_tokens"] for r in runs),
            "engine_prompt_tokens": runs[-1]["engine_prompt_tokens"],
            "engine_cached_tokens": runs[-1]["engine_cached_tokens"],
            "reported_prompt_tokens": runs[-1]["reported_prompt_tokens"],
            "reported_cached_tokens": runs[-1]["reported_cached_tokens"],
        }
    return {"config": vars(args), "summary": summary, "runs": results}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--prefix", type=int, default=256)
    p.add_argument("--step", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--url")
    p.add_argument("--out", default="bench/results/policy_batching.json")
    args = p.parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        from ets.engine.launcher import LaunchConfig
        from ets.engine.process import free_port, start_server
        from ets.testing.tiny_models import make_tiny_model

        tmp = Path(tempfile.mkdtemp(prefix="ets-bench-policy-"))
        model = make_tiny_model(tmp / "policy", "policy")
        proc = start_server(LaunchConfig(model_path=str(model), host="127.0.0.1", port=free_port(), device="cpu"),
                            log_path=tmp / "policy.log", name="bench-policy", timeout=600)
        url = proc.url
    try:
        report = asyncio.run(run(url, args))
    finally:
        if proc is not None:
            proc.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"nodes={args.nodes} n={args.n} prefix={args.prefix} step={args.step} reps={args.reps}")
    print("| variant | wall per depth (median) | prompt tokens prefilled (engine) | engine prompt / cached tokens "
          "| sum of per-sample prompt / cached |")
    print("|---|---|---|---|---|")
    for variant, s in report["summary"].items():
        print(f"| {variant} | {s['wall_s_median'] * 1000:.0f} ms | {s['prefilled_tokens_median']:.0f} | "
              f"{s['engine_prompt_tokens']:.0f} / {s['engine_cached_tokens']:.0f} | "
              f"{s['reported_prompt_tokens']} / {s['reported_cached_tokens']} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
