"""The exact early stop on the real CPU stack: where it stops, is the answer the full search's, and
how many tokens does it save?

    python -m ets.testing.stack --work-dir DIR run -- \\
        python bench/early_stop.py bench/data/arith_easy.jsonl --methods ets,rebase --widths 4,8 \\
            --problems 6 --real-widths 8 --out bench/results/early_stop.json

CPU SGLang does not honour per-request seeds, so an early-stopped search and a full one draw
different trees, and comparing their answers would compare two samples, not the rule. So each
(problem, method, width) runs the **full** search once (``early_stop`` off, streamed) and the
early stop is replayed on that very tree: at every depth where the loop checks (each progress
event after the first: the loop went on), the finished candidates so far (the response lists
them in finishing order, with depth, answer and aggregated score) and the remaining width
(``DepthProgress.remaining_width``) go through the service's own rule
(``ets.search.answers.vote_decided``); the first depth where it holds is where the option stops,
its tokens are that event's ``generated_tokens``, and its answer is the vote over that prefix.
That gives, on the same draws: answers identical where it stopped, and tokens saved. At
``--real-widths`` the option also runs for real (``early_stop`` on, a separate draw): it stops,
and what the wall time does, per method.
Results (per search and a summary per method and width) go to ``--out``; a Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ets.api.v1 import search_pb2
from ets.client.search import run_search
from ets.evaluation.evaluate import load_dataset
from ets.evaluation.report import answers_match
from ets.search.answers import equivalent, group_answers, select_answer, vote_decided
from ets.search.loop import Trajectory


def replay(response: search_pb2.SearchResponse, events: Sequence[search_pb2.DepthProgress]) -> dict[str, Any]:
    """Where the early stop would have stopped this (full) search, with what answer and tokens."""
    cands = list(response.candidates)
    voting = response.config.voting
    for event in events:
        if event.depth < 1:
            continue
        done = [c for c in cands if c.depth <= event.depth]
        scores, answers = [c.aggregate_score for c in done], [c.answer for c in done]
        if vote_decided(scores, answers, event.remaining_width, voting, group_answers):
            # The vote over that prefix, as the service would cast it (aggregated scores given).
            trajs = [Trajectory(steps=(f"The answer is {a}" if a else "",), step_scores=(s,), tokens=0,
                                finish_reason="answer", depth=0) for a, s in zip(answers, scores, strict=True)]
            choice = select_answer(trajs, voting=voting, aggregation="last")
            return {"stopped": True, "depth": event.depth, "width_left": event.remaining_width,
                    "generated_tokens": event.generated_tokens, "finished": len(done),
                    "answer": choice.ranking[0].answer if choice.ranking else ""}
    return {"stopped": False, "generated_tokens": response.stats.generated_tokens, "answer": response.answer}


def _summary(response: search_pb2.SearchResponse, wall: float, reference: str) -> dict[str, Any]:
    s = response.stats
    return {"answer": response.answer, "correct": answers_match(response.answer, reference),
            "generated_tokens": s.generated_tokens, "depth_reached": s.depth_reached,
            "stopped_early": s.stopped_early, "width_left": s.width_left, "wall_s": round(wall, 2),
            "total_kv_tokens": s.total_kv_tokens,
            "votes": [(v.answer, v.trajectories, round(v.vote, 3)) for v in response.votes]}


async def one(addr: str, problem: Any, method: str, width: int, early: bool, seed: int) -> dict[str, Any]:
    config = search_pb2.SearchConfig(method=method, width=width, seed=seed, early_stop=early)
    request = search_pb2.SearchRequest(problem=problem.problem, config=config,
                                       request_id=f"es-{method}-{width}-{int(early)}-{problem.id}")
    t0 = time.perf_counter()
    response, events = await run_search(addr, request, timeout=1800, stream=True)
    row: dict[str, Any] = {"problem": problem.id, "method": method, "width": width, "early_stop": early,
                           **_summary(response, time.perf_counter() - t0, problem.answer)}
    if not early:
        r = replay(response, events)
        row["replay"] = r
        # The guarantee: the winning group is the full search's (an equivalent answer).
        row["replay_identical"] = (not r["stopped"]) or equivalent(r["answer"], response.votes[0].answer)
    return row


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for key in sorted({(r["method"], r["width"]) for r in rows}):
        full = [r for r in rows if (r["method"], r["width"]) == key and not r["early_stop"]]
        real = [r for r in rows if (r["method"], r["width"]) == key and r["early_stop"]]
        stopped = [r for r in full if r["replay"]["stopped"]]
        tok_full = sum(r["generated_tokens"] for r in full)
        tok_early = sum(r["replay"]["generated_tokens"] for r in full)
        entry: dict[str, Any] = {
            "method": key[0], "width": key[1], "searches": len(full), "stopped": len(stopped),
            "identical_where_stopped": sum(1 for r in stopped if r["replay_identical"]),
            "tokens_full_mean": round(tok_full / len(full), 1) if full else None,
            "tokens_early_mean": round(tok_early / len(full), 1) if full else None,
            "tokens_saved_share": round(1 - tok_early / tok_full, 3) if tok_full else None,
            "tokens_saved_share_where_stopped": (
                round(1 - sum(r["replay"]["generated_tokens"] for r in stopped)
                      / sum(r["generated_tokens"] for r in stopped), 3) if stopped else None),
            "width_left_mean_where_stopped": (
                round(statistics.mean(r["replay"]["width_left"] for r in stopped), 2) if stopped else None),
            "accuracy_full": f"{sum(r['correct'] for r in full)}/{len(full)}",
        }
        if real:
            entry.update({
                "real_searches": len(real), "real_stopped": sum(r["stopped_early"] for r in real),
                "real_tokens_mean": round(statistics.mean(r["generated_tokens"] for r in real), 1),
                "real_wall_mean_s": round(statistics.mean(r["wall_s"] for r in real), 1),
                "full_wall_mean_s": round(statistics.mean(r["wall_s"] for r in full), 1),
                "accuracy_real": f"{sum(r['correct'] for r in real)}/{len(real)}",
            })
        out.append(entry)
    return out


def markdown(summary: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | width | searches | stopped (replay) | identical where stopped | generated tok full | "
             "early (replay) | saved | saved where stopped | real runs stopped | real tok | wall full / real s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in summary:
        real = (f"{e['real_stopped']}/{e['real_searches']} | {e['real_tokens_mean']} | "
                f"{e['full_wall_mean_s']} / {e['real_wall_mean_s']}" if "real_searches" in e else "- | - | -")
        saved_where = e["tokens_saved_share_where_stopped"]
        lines.append(f"| {e['method']} | {e['width']} | {e['searches']} | {e['stopped']} | "
                     f"{e['identical_where_stopped']}/{e['stopped']} | {e['tokens_full_mean']} | "
                     f"{e['tokens_early_mean']} | {e['tokens_saved_share']:.0%} | "
                     f"{'-' if saved_where is None else f'{saved_where:.0%}'} | {real} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    problems = load_dataset(args.data, limit=args.problems)
    methods = args.methods.split(",")
    widths = [int(w) for w in args.widths.split(",")]
    real_widths = {int(w) for w in args.real_widths.split(",") if w}
    jobs = [(i, p, m, w, early) for i, p in enumerate(problems) for w in widths for m in methods
            for early in ((False, True) if w in real_widths else (False,))]
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    out = Path(args.out)

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "summary": summarise(rows), "searches": rows}, indent=1) + "\n")

    meta = {"data": args.data, "methods": methods, "widths": widths, "real_widths": sorted(real_widths),
            "problems": len(problems), "concurrency": args.concurrency, "load_average_start": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}

    async def worker() -> None:
        while not queue.empty() and time.monotonic() - started < args.max_seconds:
            i, p, m, w, early = queue.get_nowait()
            try:
                row = await one(args.addr, p, m, w, early, args.seed + i)
            except Exception as err:  # noqa: BLE001 - a failed search is recorded, the run goes on
                row = {"problem": p.id, "method": m, "width": w, "early_stop": early, "error": repr(err)}
                print(f"early_stop: {row}", file=sys.stderr)
            else:
                rows.append(row)
                print(f"early_stop: {m} w{w} {'early' if early else 'full'} {p.id}: answer {row['answer']!r}, "
                      f"{row['generated_tokens']} tok, {row['wall_s']} s"
                      + (f", replay stop {row['replay']}" if not early else ""), file=sys.stderr, flush=True)
            write()

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    meta["load_average_end"] = os.getloadavg()
    meta["wall_s"] = round(time.monotonic() - started, 1)
    meta["jobs_planned"], meta["jobs_done"] = len(jobs), len(rows)
    write()
    print(markdown(summarise(rows)))


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench/early_stop.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="JSONL problems (ets eval's format)")
    parser.add_argument("--addr", default=os.environ.get("ETS_SEARCH_ADDR", "localhost:50051"))
    parser.add_argument("--methods", default="ets,rebase")
    parser.add_argument("--widths", default="4,8")
    parser.add_argument("--real-widths", default="8", help="widths where early_stop also runs for real")
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=720, help="start no search after this long")
    parser.add_argument("--out", default="bench/results/early_stop.json")
    asyncio.run(main_async(parser.parse_args(list(argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
