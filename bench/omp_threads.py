"""OpenMP threads of a CPU SGLang engine: OMP_NUM_THREADS=1 against PyTorch's default (issue 15).

    python bench/omp_threads.py [--model smollm2-135m-instruct] [--rounds 5] [--out bench/results/omp_threads.json]

Starts two policy engines of the same model with the project's CPU recipe (``ets.engine.launcher``),
one with ``OMP_NUM_THREADS=1`` and one with the variable unset (the default: PyTorch then uses
one thread per core), and sends both the same requests, alternating which goes first each round,
one engine busy at a time (the idle one sleeps: ``--sleep-on-idle``). Two workloads per round,
each timed end to end: ``batch``: one ``/generate`` of 8 prompts (one shared 200-token prefix,
distinct suffixes) x 48 new tokens, as a search depth sends them; ``single``: one prompt x 48
tokens (decode latency at batch 1). ``ignore_eos`` keeps the token counts equal. Reports the
median seconds per workload and engine, the median of the paired ratios (default / one thread;
above 1: one thread is faster) and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def post(url: str, payload: dict[str, Any], timeout: float = 600.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
    # /generate answers JSON; SGLang's /flush_cache answers a plain-text sentence.
    return json.loads(body) if resp.headers.get_content_type() == "application/json" else body.decode()


def workloads(prefix_tokens: int = 200, new_tokens: int = 48, batch_size: int = 8,
              vocab_hi: int = 5000) -> dict[str, dict[str, Any]]:
    """``batch``: ``batch_size`` prompts sharing a ``prefix_tokens`` prefix (distinct 8-token
    suffixes) x ``new_tokens``; ``single``: one prompt (60% of the prefix) x ``new_tokens``."""
    prefix = [(17 * i + 3) % vocab_hi + 100 for i in range(prefix_tokens)]
    batch = [prefix + [(31 * k + j) % vocab_hi + 100 for j in range(8)] for k in range(batch_size)]
    sp = {"max_new_tokens": new_tokens, "temperature": 0.7, "ignore_eos": True}
    return {"batch": {"input_ids": batch, "sampling_params": sp},
            "single": {"input_ids": [prefix[: max(1, prefix_tokens * 3 // 5)]], "sampling_params": sp}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a packaged model (ets models list)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefix-tokens", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="bench/results/omp_threads.json")
    args = p.parse_args(argv)

    from ets.engine.launcher import LaunchConfig, build_command
    from ets.engine.process import ServerProcess, free_port
    from ets.models import packaged_model, prepare_model

    model = prepare_model(packaged_model(args.model), None, log=True)
    cores = os.cpu_count() or 1
    # None: the variable removed from the engine's environment (the default being measured).
    variants: dict[str, str | None] = {"omp1": "1", "default": None}
    work = Path(tempfile.mkdtemp(prefix="ets-omp-"))
    procs: dict[str, ServerProcess] = {}
    urls: dict[str, str] = {}
    try:
        for name, threads in variants.items():
            port = free_port("127.0.0.1")
            cmd = build_command(LaunchConfig(model_path=str(model), host="127.0.0.1", port=port, device="cpu",
                                             random_seed=0))
            if threads is None:
                cmd.env.pop("OMP_NUM_THREADS", None)
            else:
                cmd.env["OMP_NUM_THREADS"] = threads
            procs[name] = ServerProcess.start(cmd, url=f"http://127.0.0.1:{port}", log_path=work / f"{name}.log",
                                              name=name)
            urls[name] = f"http://127.0.0.1:{port}"
        for proc in procs.values():
            proc.wait_healthy(timeout=300)
        loads = {"before": [round(x, 2) for x in os.getloadavg()]}
        work_items = workloads(args.prefix_tokens, args.new_tokens, args.batch_size)
        for name in urls:  # warm-up, not timed
            post(urls[name] + "/generate", work_items["batch"])
        times: dict[str, dict[str, list[float]]] = {w: {n: [] for n in urls} for w in work_items}
        names = list(urls)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for w, payload in work_items.items():
                for name in order:
                    post(urls[name] + "/flush_cache", {})
                    t = time.perf_counter()
                    post(urls[name] + "/generate", payload)
                    times[w][name].append(time.perf_counter() - t)
            print(f"omp: round {r + 1}: " + ", ".join(f"{w} {n} {times[w][n][-1]:.2f}s" for w in times for n in names),
                  file=sys.stderr, flush=True)
        loads["after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        for proc in procs.values():
            proc.stop(timeout=20.0)
    one, many = names
    summary: dict[str, dict[str, Any]] = {}
    for w in times:
        ratios = [b / a for a, b in zip(times[w][one], times[w][many], strict=True)]
        summary[w] = {"median_s": {n: statistics.median(times[w][n]) for n in names},
                      f"median_ratio_{many}_over_{one}": statistics.median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios)}
    report = {"command": "python bench/omp_threads.py " + " ".join(argv), "model": args.model, "cores": cores,
              "rounds": args.rounds,
              "workload": {"prefix_tokens": args.prefix_tokens, "new_tokens": args.new_tokens,
                           "batch_size": args.batch_size}, "load_average": loads, "times_s": times, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("| workload | OMP_NUM_THREADS=1 median s | unset (default) median s | paired ratio default/1 (min-max) |")
    print("|---|---:|---:|---|")
    for w, s in summary.items():
        r = s[f"median_ratio_{many}_over_{one}"]
        print(f"| {w} | {s['median_s'][one]:.2f} | {s['median_s'][many]:.2f} | {r:.2f}x "
              f"({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) |")
    print(f"load average {loads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
