"""Searches per minute of methods at one configuration, through the search service (closed loop).

Owns ``measure`` (for each width, ``rounds`` rounds of each method in turn, so machine drift hits
every method alike; a round runs ``searches`` searches with ``concurrency`` clients, each starting
its next search when its last one finishes, over the problems in order) and ``summarise`` (per
width and method: completed searches over the summed round time, latency, logical KV, errors;
and each method's ratio to the first method per width). This is ``bench/load.py``'s closed loop
at one concurrency, run by ``ets eval --preset`` against the same stack right after its
evaluation, so the table's searches/min come from the same settings on the same hardware. The
evaluation's own wall times cannot serve: over the paired sample store, a method replays samples
another already drew.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ets.evaluation.report import ProblemResult


@dataclass
class Level:
    """One round of one method at one width."""

    width: int
    method: str
    round: int
    concurrency: int
    searches: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    total_kv_tokens: list[int] = field(default_factory=list)
    generated_tokens: int = 0

    @property
    def key(self) -> tuple[int, str, int]:
        return self.width, self.method, self.round


# (problem index, method, width) -> a finished search (errors reported in ``ProblemResult.error``).
RunOne = Callable[[int, str, int], Any]


async def run_level(level: Level, count: int, problems: int, run_one: RunOne) -> Level:
    """``count`` searches of ``level.method`` at ``level.width``, ``level.concurrency`` at a time
    (closed loop), problems taken in order (cycled)."""
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            result: ProblemResult = await run_one(i % problems, level.method, level.width)
            level.latencies.append(time.perf_counter() - t0)
            if result.error:
                level.errors += 1
                continue
            level.searches += 1
            level.total_kv_tokens.append(result.total_kv_tokens)
            level.generated_tokens += result.generated_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(level.concurrency)))
    level.seconds = time.perf_counter() - started
    return level


async def measure(run_one: RunOne, problems: int, methods: Sequence[str], widths: Sequence[int], *,
                  concurrency: int, searches: int, rounds: int, done: Sequence[dict[str, Any]] = (),
                  on_level: Callable[[Level], None] | None = None) -> list[Level]:
    """Every (width, round, method) level not in ``done`` (rows of ``as_row``), in that order."""
    skip = {(d["width"], d["method"], d["round"]) for d in done}
    out = []
    for width in widths:
        for r in range(rounds):
            for method in methods:
                level = Level(width, method, r, concurrency)
                if level.key in skip:
                    continue
                await run_level(level, searches, problems, run_one)
                out.append(level)
                if on_level is not None:
                    on_level(level)
    return out


def as_row(level: Level) -> dict[str, Any]:
    return {"width": level.width, "method": level.method, "round": level.round, "concurrency": level.concurrency,
            "searches": level.searches, "errors": level.errors, "seconds": level.seconds,
            "latencies": level.latencies, "total_kv_tokens": level.total_kv_tokens,
            "generated_tokens": level.generated_tokens}


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per width and method (pooled over rounds): searches/min = completed / summed round time,
    latency mean and p50, logical KV mean, generated tokens/s, errors; ``ratio_to_first``: this
    method's searches/min over the first method's at that width, with each round's ratio."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    order: list[str] = []
    for row in rows:
        groups.setdefault((row["width"], row["method"]), []).append(row)
        if row["method"] not in order:
            order.append(row["method"])
    out = []
    for (width, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        seconds = sum(r["seconds"] for r in rs)
        done = sum(r["searches"] for r in rs)
        lat = [x for r in rs for x in r["latencies"]]
        kv = [x for r in rs for x in r["total_kv_tokens"]]
        out.append({
            "width": width, "method": method, "rounds": len(rs), "concurrency": rs[0]["concurrency"],
            "searches": done, "errors": sum(r["errors"] for r in rs), "seconds": seconds,
            "searches_per_min": 60 * done / seconds if seconds else 0.0,
            "round_searches_per_min": [60 * r["searches"] / r["seconds"] if r["seconds"] else 0.0 for r in rs],
            "latency_mean_s": statistics.fmean(lat) if lat else 0.0,
            "latency_p50_s": statistics.median(lat) if lat else 0.0,
            "mean_total_kv_tokens": statistics.fmean(kv) if kv else 0.0,
            "generated_tokens_per_s": sum(r["generated_tokens"] for r in rs) / seconds if seconds else 0.0,
        })
    for row in out:
        first = next(r for r in out if r["width"] == row["width"] and r["method"] == order[0])
        base = first["searches_per_min"]
        row["ratio_to_first"] = row["searches_per_min"] / base if base else 0.0
        row["round_ratios"] = [a / b if b else 0.0 for a, b in
                               zip(row["round_searches_per_min"], first["round_searches_per_min"], strict=False)]
    return out


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    first = rows[0]["method"]
    lines = [f"| width | method | concurrency | searches (errors) | searches/min | vs {first} (per round) "
             "| latency mean / p50 s | logical KV mean | generated tok/s |",
             "|---:|---|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        lines.append(f"| {r['width']} | {r['method']} | {r['concurrency']} | {r['searches']} ({r['errors']}) "
                     f"| {r['searches_per_min']:.2f} | {r['ratio_to_first']:.2f}x ({rounds}) "
                     f"| {r['latency_mean_s']:.1f} / {r['latency_p50_s']:.1f} | {r['mean_total_kv_tokens']:.0f} "
                     f"| {r['generated_tokens_per_s']:.1f} |")
    return "\n".join(lines)
