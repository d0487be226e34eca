"""Benchmark PRM scoring the way the search calls it: newest-step scores, depth after depth.

    .venv/bin/python bench/reward_scoring.py [--width 16] [--depth 6] [--rounds 3]
        [--out bench/results/reward_scoring.json]

Builds the tiny math-shepherd PRM, starts a real SGLang CPU server for it, and scores ``width``
trajectories of one question whose step count grows by one per depth (each call scores every
trajectory's newest step, as the search does after an expansion). Variants:
- ``sglang``: the reward server's SGLang backend (``logprob_start_len`` at the score position, so
  the question and earlier steps come from SGLang's prefix cache);
- ``sglang-no-reuse``: the same requests with ``logprob_start_len`` 0 (the naive way: with
  ``return_logprob`` SGLang then recomputes every prompt in full);
- ``transformers``: the in-process backend (no prefix cache; recomputes every prompt);
- ``grpc+sglang``: the ``sglang`` variant through a real reward server and ``RewardClient``.
Per variant: wall seconds for all depths (median over rounds), newest-step scores per second,
PRM prompt tokens and the share SGLang served from its cache. SGLang's cache is flushed before
every round. Prints a Markdown table and writes JSON. CPU numbers on a shared 2-core machine are
noisy: compare variants within one run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

WORDS = ("we add the numbers then multiply each value so the total is check because sum of first "
         "second result equals plus minus times").split()


def make_steps(width: int, depth: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[f"Step {d + 1}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 24)))
             + f" = {rng.randint(1, 99)}" for d in range(depth)] for _ in range(width)]


def flush(url: str) -> None:
    """Empty SGLang's prefix cache. It refuses (400) while a request runs, e.g. a /health probe's
    one-token generation, so retry briefly."""
    for attempt in range(50):
        try:
            req = urllib.request.Request(f"{url}/flush_cache", method="POST", data=b"")
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
            return
        except urllib.error.HTTPError as err:
            if err.code != 400 or attempt == 49:
                raise
            time.sleep(0.1)


async def run_backend(backend: Any, question: str, steps: list[list[str]], depth: int) -> dict[str, float]:
    start = time.perf_counter()
    prompt = cached = 0
    for d in range(1, depth + 1):
        encoded = [backend.adapter.encode(question, s[:d]) for s in steps]
        out = await backend.score(encoded, last_step_only=True)
        prompt += out.prompt_tokens
        cached += out.cached_tokens
    return {"seconds": time.perf_counter() - start, "prompt_tokens": prompt, "cached_tokens": cached}


async def run_grpc(address: str, question: str, steps: list[list[str]], depth: int) -> dict[str, float]:
    from ets.api.v1 import reward_pb2, reward_pb2_grpc
    import grpc

    start = time.perf_counter()
    prompt = cached = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for d in range(1, depth + 1):
            reply = await stub.Score(reward_pb2.ScoreRequest(
                trajectories=[reward_pb2.Trajectory(question=question, steps=s[:d]) for s in steps],
                last_step_only=True), timeout=600)
            prompt += reply.prompt_tokens
            cached += reply.cached_tokens
    return {"seconds": time.perf_counter() - start, "prompt_tokens": prompt, "cached_tokens": cached}


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ets.engine.launcher import LaunchConfig
    from ets.engine.process import free_port, start_server
    from ets.engine.supervisor import EngineSupervisor
    from ets.reward.backends import PrmBackend
    from ets.reward.backends.sglang_backend import SglangBackend
    from ets.reward.backends.transformers_backend import TransformersBackend
    from ets.reward.server import RewardServer
    from ets.reward.settings import RewardServerConfig
    from ets.reward.embedder import default_embedder_model
    from ets.testing.tiny_models import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    model = make_tiny_model(work / "math-shepherd", "math-shepherd")
    question = "A baker makes 7 trays of 9 cookies and sells 20 of them. How many cookies remain at the end of the day?"
    steps = make_steps(args.width, args.depth, args.seed)
    prm = start_server(LaunchConfig(model_path=str(model), host="127.0.0.1", port=free_port(), device="cpu",
                                    random_seed=0), log_path=work / "prm.log", name="bench-prm", timeout=600)
    rows: list[dict[str, Any]] = []
    try:
        backends: dict[str, PrmBackend] = {
            "sglang": SglangBackend(str(model), "math-shepherd", EngineSupervisor(url=prm.url, name="PRM")),
            "sglang-no-reuse": SglangBackend(str(model), "math-shepherd", EngineSupervisor(url=prm.url, name="PRM"),
                                             reuse_prefix=False),
            "transformers": TransformersBackend(str(model), "math-shepherd", max_batch_items=args.width),
        }
        for b in backends.values():
            await b.start()
        server = RewardServer(RewardServerConfig(
            prm_model=str(model), prm_type="math-shepherd", prm_backend="sglang", prm_url=prm.url, device="cpu",
            host="127.0.0.1", port=0, metrics_port=0, embedder_model=default_embedder_model(),
            max_batch_size=max(args.width, 1)))
        await server.start()
        try:
            # Warm-up (first calls on a fresh CPU engine are slow): not measured.
            for b in backends.values():
                await run_backend(b, question, steps[:2], 1)
            variants = [*backends, "grpc+sglang"]
            results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for v in variants:
                    await asyncio.to_thread(flush, prm.url)
                    if v == "grpc+sglang":
                        results[v].append(await run_grpc(f"127.0.0.1:{server.port}", question, steps, args.depth))
                    else:
                        results[v].append(await run_backend(backends[v], question, steps, args.depth))
            calls = args.width * args.depth
            for v in variants:
                secs = statistics.median(r["seconds"] for r in results[v])
                prompt = results[v][-1]["prompt_tokens"]
                cached = results[v][-1]["cached_tokens"]
                rows.append({"variant": v, "width": args.width, "depth": args.depth, "seconds": round(secs, 3),
                             "scores_per_s": round(calls / secs, 1), "prompt_tokens": prompt,
                             "cached_tokens": cached, "cached_share": round(cached / prompt, 3) if prompt else 0.0,
                             "rounds": [round(r["seconds"], 3) for r in results[v]]})
        finally:
            await server.stop(grace=1.0)
            for b in backends.values():
                await b.close()
    finally:
        prm.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/reward_scoring.json")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print("| variant | width x depth | seconds (median) | newest-step scores/s | PRM prompt tokens "
          "| served from cache |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['cached_share']:.0f}%" if r["variant"] != "transformers" else "n/a"
        print(f"| {r['variant']} | {r['width']} x {r['depth']} | {r['seconds']:.2f} | {r['scores_per_s']:.0f} | "
              f"{r['prompt_tokens']} | {share} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
