"""Fault benchmark: searches under load while a replica is lost, replaced or restarted.

    .venv/bin/python bench/faults.py [--policy tiny|smollm2-135m-instruct] [--searches 64] [--method ets]
        [--width 8] [--deadline 120] [--fault-after 5] [--scenarios baseline,a,b,c,d] [--out bench/results/faults.json]

Real processes on loopback: two SGLang CPU policy engines behind sglang-router 0.3.2 (cache-aware;
the search service in routed mode, tokenizing on engine 1), two reward servers (rules backend,
arithmetic PRM, MiniLM embedder) that the search service balances over with gRPC round_robin
(``ipv4:A,B``), and ``ets serve`` over them. Per scenario one wave of ``--searches`` concurrent
searches (``--method``, ``--width``; the stack's budgets for the policy) with a ``--deadline`` each;
mid-search (``--fault-after`` seconds in, and once half the searches have had a depth expanded):

- baseline: nothing happens (the latencies the others are compared with, same run);
- a: policy engine 2 SIGKILLed, then started again on its port;
- b: reward server 2 SIGKILLed (its process group), then started again;
- c: graceful replacement: policy engine 2 SIGTERMed (SGLang drains) and started again, then
  reward server 2 SIGTERMed (NOT_SERVING, drain) and started again;
- d: the single-replica stack (one engine, no router, one reward server) with its only policy
  engine SIGKILLed and started again.

Reports per scenario: searches OK / failed by status, p50 / p99 latency, the retries the search
service spent (``ets_search_upstream_retries_total``), prefix reuse (cached / prompt tokens of the
engines, ``ets_search_cached_prompt_tokens_total`` / ``ets_search_prompt_tokens_total``), each
search's own reuse before and after the fault (its streamed ``DepthProgress`` token counts, split at
the moment of the fault; the baseline is split at the same moment), how long
the restarted process took to serve, and whether any process of the run is left once it stops.
Writes JSON (``--out``) and prints a Markdown table (docs/operations.md).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.engine.launcher import LaunchConfig
from ets.engine.process import ServerProcess, free_port, wait_gone
from ets.engine.procfs import descendants
from ets.testing.stack import (
    REAL_POLICY_SEARCH_ENV, TINY, TINY_POLICY_SEARCH_ENV, default_embedder, resolve_policy, tiny_model,
    wait_grpc_serving, StackConfig,
)

PROBLEMS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "A box holds 12 pencils. How many pencils are in 4 boxes?",
    "A train travels 60 miles per hour for 3 hours. How far does it travel?",
    "Mia had 50 dollars and spent 18 dollars on a book. How much money does she have left?",
]
HOST = "127.0.0.1"


@dataclass
class Run:
    """The processes of one scenario's stack, each restartable by name."""

    work: Path
    starters: dict[str, Callable[[], ServerProcess]] = field(default_factory=dict)
    procs: dict[str, ServerProcess] = field(default_factory=dict)
    search_addr: str = ""
    metrics_url: str = ""

    def start(self, name: str, starter: Callable[[], ServerProcess]) -> ServerProcess:
        self.starters[name] = starter
        self.procs[name] = starter()
        return self.procs[name]

    def restart(self, name: str) -> ServerProcess:
        self.procs[name].stop(timeout=30)
        self.procs[name] = self.starters[name]()
        return self.procs[name]

    def stop(self) -> list[str]:
        """Stop everything (search first); what is left of any group afterwards."""
        groups = {p.pgid for p in self.procs.values()}
        for proc in reversed(list(self.procs.values())):
            proc.stop(timeout=30)
        return wait_gone(groups, timeout=5)


def _policy(run: Run, name: str, model: Path, port: int) -> None:
    launch = LaunchConfig(model_path=str(model), host=HOST, port=port, device="cpu", random_seed=0)
    run.start(name, lambda: ServerProcess.launch(launch, log_path=run.work / f"{name}.log", name=name))


def _reward(run: Run, name: str, port: int) -> None:
    metrics = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", ETS_DEVICE="cpu", ETS_REWARD_HOST=HOST, ETS_PRM_BACKEND="rules",
               ETS_PRM_TYPE="arithmetic", ETS_EMBEDDER_MODEL=default_embedder(), ETS_REWARD_PORT=str(port),
               ETS_REWARD_METRICS_PORT=str(metrics), ETS_REWARD_GRACE_S="60", ETS_REWARD_DRAIN_DELAY_S="3")
    run.start(name, lambda: ServerProcess.start([sys.executable, "-m", "ets.cli", "reward-serve"], env=env,
                                                url=f"http://{HOST}:{metrics}", log_path=run.work / f"{name}.log",
                                                name=name))


def start_run(work: Path, model: Path, model_type: str, search_env: dict[str, str], replicas: int) -> Run:
    run = Run(work)
    engines = [free_port() for _ in range(replicas)]
    rewards = [free_port() for _ in range(replicas)]
    for i, port in enumerate(engines, 1):
        _policy(run, f"policy-{i}", model, port)
    for i, port in enumerate(rewards, 1):
        _reward(run, f"reward-{i}", port)
    for i in range(1, replicas + 1):
        run.procs[f"policy-{i}"].wait_healthy(timeout=900)
        wait_grpc_serving(run.procs[f"reward-{i}"], f"{HOST}:{rewards[i - 1]}", 600)
    env = dict(os.environ, **search_env, ETS_SEARCH_POLICY_MODEL_TYPE=model_type, ETS_SEARCH_PRM_TYPE="arithmetic",
               ETS_REWARD_ADDR="ipv4:" + ",".join(f"{HOST}:{p}" for p in rewards))
    if replicas > 1:
        router_port = free_port()
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(router_port),
                "--policy", "cache_aware", "--balance-abs-threshold", "256",
                "--worker-urls", *(f"http://{HOST}:{p}" for p in engines)]
        router = run.start("router", lambda: ServerProcess.start(argv, url=f"http://{HOST}:{router_port}",
                                                                 log_path=work / "router.log", name="router"))
        router.wait_healthy(timeout=120)
        env.update(ETS_POLICY_URL=f"http://{HOST}:{router_port}", ETS_POLICY_ENGINE_URL=f"http://{HOST}:{engines[0]}")
    else:
        env["ETS_POLICY_URL"] = f"http://{HOST}:{engines[0]}"
    port, metrics = free_port(), free_port()
    run.search_addr, run.metrics_url = f"{HOST}:{port}", f"http://{HOST}:{metrics}/metrics"
    argv = [sys.executable, "-m", "ets.cli", "serve", "--host", HOST, "--port", str(port), "--metrics-port",
            str(metrics), "--openai-port", "0", "--max-concurrent", "64", "--max-queued", "64"]
    search = run.start("search", lambda: ServerProcess.start(argv, env=env, url=f"http://{HOST}:{metrics}",
                                                             log_path=work / "search.log", name="search"))
    wait_grpc_serving(search, run.search_addr, 300)
    return run


def _counter(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def _metrics(run: Run) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(run.metrics_url, timeout=10).read().decode()
    return {k: _counter(text, f"ets_search_{k}_total") for k in
            ("upstream_retries", "prompt_tokens", "cached_prompt_tokens")}


@dataclass
class Outcome:
    """One search of a wave: its status, latency, and its prompt / cached prompt tokens so far at
    each depth report and at the end (``(monotonic time, prompt, cached)``, streamed)."""

    code: str
    seconds: float
    tokens: list[tuple[float, int, int]]

    def reuse_split(self, at: float) -> tuple[float | None, float | None]:
        """This search's prefix reuse (cached / prompt tokens) of the calls sent before ``at`` and
        of those sent after it (None where it sent none)."""
        if self.code != "OK" or not self.tokens:
            return None, None
        split = max([(0.0, 0, 0), *(t for t in self.tokens if t[0] <= at)])
        end = self.tokens[-1]
        prompt_after, cached_after = end[1] - split[1], end[2] - split[2]
        return (split[2] / split[1] if split[1] else None,
                cached_after / prompt_after if prompt_after else None)


@dataclass
class Shape:
    """What each search of a wave asks for."""

    method: str = "ets"
    width: int = 8
    deadline_s: float = 120.0


async def _search(stub: Any, i: int, shape: Shape, expanded: set[int]) -> Outcome:
    """One streamed search; adds ``i`` to ``expanded`` once its first expansion was reported."""
    start = time.monotonic()
    request = search_pb2.SearchRequest(problem=PROBLEMS[i % len(PROBLEMS)], request_id=f"f{i}",
                                       config=search_pb2.SearchConfig(method=shape.method, width=shape.width, seed=i))
    tokens: list[tuple[float, int, int]] = []
    try:
        async for event in stub.SearchStream(request, timeout=shape.deadline_s):
            if event.HasField("progress"):
                tokens.append((time.monotonic(), event.progress.prompt_tokens, event.progress.cached_prompt_tokens))
                if event.progress.prompt_tokens:
                    expanded.add(i)
            elif event.HasField("result"):
                stats = event.result.stats
                tokens.append((time.monotonic(), stats.prompt_tokens, stats.cached_prompt_tokens))
        code = "OK"
    except grpc.aio.AioRpcError as err:
        code = err.code().name
    return Outcome(code, time.monotonic() - start, tokens)


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)
    return {"n": len(values), "p10": round(values[int(0.1 * (len(values) - 1))], 3),
            "median": round(statistics.median(values), 3), "mean": round(statistics.fmean(values), 3)}


def _fault(run: Run, scenario: str) -> dict[str, float]:
    """Inject the scenario's fault (blocking; run in a thread); seconds until each restart served."""
    took: dict[str, float] = {}

    def replace(name: str, sig: int) -> None:
        t0 = time.monotonic()
        proc = run.procs[name]
        if sig == signal.SIGKILL:
            os.killpg(proc.pgid, sig)  # the whole engine, no goodbye
        else:
            os.kill(proc.pid, sig)  # what a container runtime sends PID 1
        if sig == signal.SIGTERM:  # graceful: let it drain and exit by itself first
            proc._popen.wait(timeout=120)
        new = run.restart(name)
        if name.startswith("policy"):
            new.wait_healthy(timeout=900)
        else:
            wait_grpc_serving(new, _reward_addr(new), 600)
        took[f"{name} {signal.Signals(sig).name} -> serving s"] = round(time.monotonic() - t0, 1)

    if scenario == "a":
        replace("policy-2", signal.SIGKILL)
    elif scenario == "b":
        replace("reward-2", signal.SIGKILL)
    elif scenario == "c":
        replace("policy-2", signal.SIGTERM)
        replace("reward-2", signal.SIGTERM)
    elif scenario == "d":
        replace("policy-1", signal.SIGKILL)
    return took


def _reward_addr(proc: ServerProcess) -> str:
    env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    port = next(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"ETS_REWARD_PORT="))
    return f"{HOST}:{port}"


async def wave(run: Run, scenario: str, searches: int, shape: Shape, fault_after: float) -> dict[str, Any]:
    before = _metrics(run)
    expanded: set[int] = set()
    async with grpc.aio.insecure_channel(run.search_addr) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        started = time.monotonic()
        tasks = [asyncio.ensure_future(_search(stub, i, shape, expanded)) for i in range(searches)]
        # Mid-search whatever the machine's load: at least --fault-after seconds in, and once half
        # the searches have had a depth expanded (so they hold prefixes on the engines).
        await asyncio.sleep(fault_after)
        while len(expanded) < searches / 2 and not all(t.done() for t in tasks):
            await asyncio.sleep(0.5)
        fault_at = time.monotonic()  # the baseline splits its searches at the same moment
        expanded_at_fault = len(expanded)
        took = await asyncio.to_thread(_fault, run, scenario) if scenario != "baseline" else {}
        results: list[Outcome] = await asyncio.gather(*tasks)
    after = _metrics(run)
    codes: dict[str, int] = {}
    for out in results:
        codes[out.code] = codes.get(out.code, 0) + 1
    seconds = sorted(out.seconds for out in results)
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    splits = [out.reuse_split(fault_at) for out in results]
    return {"scenario": scenario, "searches": searches, "statuses": codes,
            "fault_at_s": round(fault_at - started, 1), "expanded_at_fault": expanded_at_fault,
            "p50_s": round(statistics.median(seconds), 1),
            "p99_s": round(seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))], 1),
            "retries": int(after["upstream_retries"] - before["upstream_retries"]),
            "prefix_reuse": round((after["cached_prompt_tokens"] - before["cached_prompt_tokens"]) / prompt, 3)
            if prompt else None, "restarts": took,
            # Per search: the reuse of its own calls before the fault and after it (a search whose
            # steps keep landing on the engine holding its prefix keeps its reuse after the loss).
            "search_reuse_before_fault": _quantiles([b for b, _ in splits if b is not None]),
            "search_reuse_after_fault": _quantiles([a for _, a in splits if a is not None])}


def _split_cell(row: dict[str, Any]) -> str:
    cells = []
    for key in ("search_reuse_before_fault", "search_reuse_after_fault"):
        q = row.get(key)
        cells.append(f"{q['median']} ({q['p10']})" if q else "-")
    return " / ".join(cells)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default=TINY, help="tiny (random weights) or a packaged real model")
    p.add_argument("--searches", type=int, default=64)
    p.add_argument("--method", default="ets")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--deadline", type=float, default=120.0)
    p.add_argument("--fault-after", type=float, default=5.0)
    p.add_argument("--scenarios", default="baseline,a,b,c,d")
    p.add_argument("--out", type=Path, default=Path("bench/results/faults.json"))
    args = p.parse_args(argv)
    shape = Shape(args.method, args.width, args.deadline)
    # SIGTERM unwinds like Ctrl-C, so the finally below stops every process the run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scenarios = args.scenarios.split(",")
    work = Path(tempfile.mkdtemp(prefix="ets-faults-"))
    cfg = StackConfig(work_dir=work, policy=args.policy)
    folder, model_type = resolve_policy(cfg)
    model = folder or tiny_model(work, "policy")
    search_env = TINY_POLICY_SEARCH_ENV if args.policy == TINY else REAL_POLICY_SEARCH_ENV
    rows = []
    for replicas, names in ((2, [s for s in scenarios if s != "d"]), (1, [s for s in scenarios if s == "d"])):
        if not names:
            continue
        run = start_run(work / f"r{replicas}", model, model_type, dict(search_env), replicas)
        try:
            if replicas == 1:
                names = ["baseline-1", *names]
            for name in names:
                row = asyncio.run(wave(run, name.split("-")[0] if name.startswith("baseline") else name,
                                       args.searches, shape, args.fault_after))
                row["scenario"], row["replicas"] = name, replicas
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            row_left = run.stop()
            me = {p.pid for p in descendants(os.getpid())}
            for row in rows:
                if row["replicas"] == replicas:
                    row["left_after_stop"] = row_left + sorted(str(p) for p in me)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"policy": args.policy, "searches": args.searches, "method": args.method,
                                    "width": args.width, "deadline_s": args.deadline,
                                    "fault_after_s": args.fault_after, "rows": rows}, indent=1))
    print("| scenario | replicas | OK / failed (by status) | p50 s | p99 s | retries | prefix reuse "
          "| per-search reuse before / after the fault (median, p10) | restart to serving | left after stop |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        failed = {k: v for k, v in r["statuses"].items() if k != "OK"}
        print(f"| {r['scenario']} | {r['replicas']} | {r['statuses'].get('OK', 0)} / {sum(failed.values())} "
              f"{failed or ''} "
              f"| {r['p50_s']} | {r['p99_s']} | {r['retries']} | {r['prefix_reuse']} | {_split_cell(r)} | "
              f"{'; '.join(f'{k} {v}' for k, v in r['restarts'].items()) or '-'} | {len(r['left_after_stop'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
