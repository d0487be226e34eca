"""``ets eval --preset math500-reference`` end to end on the real CPU stack (issue 27): SmolLM2-135M
behind SGLang, the reward server, ``ets serve``; the command as a user runs it, on the first MATH-500
problems at width 2.

What it checks is the pipeline, not the paper: the plan printed before the run and the estimate
after the first problem; one report with every field the reproduction table needs (accuracy with
its interval, logical KV mean and peak, the paired REBASE/ETS KV ratio with its interval, prefix
reuse, tokens, wall time, the paired differences against REBASE and against best-of-N, the
throughput of ETS and REBASE through the search service, the plot); resume (a second run over
more problems redoes none of the finished searches and draws no sample twice); and that the
methods of a problem shared their samples (one paired store). SmolLM2-135M answers close to none
of MATH-500 (its accuracy here is near zero), so accuracy is not asserted. On this stack the
preset's Llemma model types cannot run: the policy model type and the PRM are the stack's
(``smollm2-instruct``, ``arithmetic``), given as flags that override the preset, with short budgets;
every other setting (temperature 1.0, softmax temperature 0.2, lambda_c 1.0, the width preset's
lambda_s, weighted majority) is the preset's.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from ets.testing.stack import Stack, StackConfig, start_stack

pytestmark = [pytest.mark.sglang, pytest.mark.stack, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 2


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory: pytest.TempPathFactory, sglang_servers: Any, smollm2: Path) -> Iterator[Stack]:
    sglang_servers.stop_all()  # the real engine holds ~1.5 GB and the CPU
    policy = sglang_servers.get(smollm2)
    stack = start_stack(StackConfig(work_dir=tmp_path_factory.mktemp("preset-stack"), policy_model=smollm2,
                                    max_concurrent=4), policy_url=policy.url)
    try:
        yield stack
    finally:
        stack.stop()
        sglang_servers.stop(policy)


def _eval(stack: Stack, out: Path, limit: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ets.cli", "eval", "--preset", "math500-reference", "--out-dir", str(out),
         "--limit", str(limit), "--widths", str(WIDTH), "--concurrency", "3", "--no-progress",
         "--policy-url", stack.policy_url, "--reward-addr", stack.reward_addr, "--addr", stack.search_addr,
         "--policy-model-type", "smollm2-instruct", "--prm-type", "arithmetic",
         "--max-step-tokens", "48", "--max-tokens", "288", "--max-depth", "4", "--timeout", "900",
         "--throughput-widths", str(WIDTH), "--throughput-searches", "2", "--throughput-concurrency", "2",
         "--throughput-rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=2000)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _store_samples(path: Path) -> int:
    return sum(1 for row in _lines(path) if row["kind"] == "sample")


def test_the_preset_runs_end_to_end_resumes_and_pairs_the_methods(real_stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "math500"
    first = _eval(real_stack, out, limit=1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "plan: 1 problems x 3 configurations = 3 searches (0 already done, 3 to run, 3 at a time)" in first.stderr
    assert f"width {WIDTH}: rebase, ets, best_of_n; at most {WIDTH * 288} sampled tokens per search" in first.stderr
    assert "estimate: the first 3 searches took" in first.stderr
    searches = _lines(out / "searches.jsonl")
    samples_after_first = _store_samples(out / "store.jsonl")
    assert len(searches) == 3 and not [r["error"] for r in searches if r["error"]]

    # Resume over two problems: the first problem's three searches are not run again.
    second = _eval(real_stack, out, limit=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "plan: 2 problems x 3 configurations = 6 searches (3 already done, 3 to run, 3 at a time)" in second.stderr
    assert "(2 levels already done)" in second.stderr  # nor the throughput levels (ETS, REBASE)
    searches = _lines(out / "searches.jsonl")
    assert len(searches) == 6 and len({(r["label"], r["width"], r["id"]) for r in searches}) == 6
    assert searches[:3] == _lines(out / "searches.jsonl")[:3]
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["preset"]["name"] == "math500-reference" and report["preset"]["version"] == 1
    assert report["problems"] == 2 and report["dataset"] == "bench/data/math500.jsonl"

    # Paired: the methods of a problem drew from one store; the store holds each sample once.
    for pid in {r["id"] for r in searches}:
        rs = [r for r in searches if r["id"] == pid]
        assert sum(r["samples_drawn"] for r in rs) <= sum(r["samples_requested"] for r in rs) - 2 * WIDTH, rs
    assert _store_samples(out / "store.jsonl") == sum(r["samples_drawn"] for r in searches) >= samples_after_first
    # The preset's settings reached the searches (the flags override only types and budgets).
    for r in searches:
        c = r["resolved_config"]
        assert (c["temperature"], c["softmax_temperature"], c["lambda_c"], c["voting"]) == \
            (1.0, 0.2, 1.0, "weighted_majority")
        assert (c["policy_model_type"], c["prm_type"], c["max_tokens"]) == ("smollm2-instruct", "arithmetic", 288)

    # One report: per width and method, what the reproduction table shows.
    summary = {s["label"]: s for s in report["summary"]}
    assert set(summary) == {"rebase", "ets", "best_of_n"}
    for s in summary.values():
        assert s["width"] == WIDTH and s["problems"] == 2 and s["errors"] == 0
        assert 0 <= s["accuracy_ci_low"] <= s["accuracy"] <= s["accuracy_ci_high"] <= 1
        assert s["mean_total_kv_tokens"] > 0 and s["max_peak_kv_tokens"] >= s["mean_peak_kv_tokens"] > 0
        assert s["mean_generated_tokens"] > 0 and s["mean_wall_seconds"] > 0 and 0 < s["cache_reuse"] <= 1
    vs_rebase = {c["label"]: c for c in report["paired_vs_rebase"]}
    assert set(vs_rebase) == {"ets", "best_of_n"}
    ets = vs_rebase["ets"]
    assert ets["problems"] == 2 and ets["kv_ratio_total_ci"][0] <= ets["kv_ratio_total"] <= ets["kv_ratio_total_ci"][1]
    assert "accuracy_difference_ci" in ets and "mcnemar_p" in ets
    vs_bon = {c["label"]: c for c in report["paired_vs_best_of_n"]}
    assert set(vs_bon) == {"ets", "rebase"} and all(c["problems"] == 2 for c in vs_bon.values())
    throughput = {t["method"]: t for t in report["throughput"]["summary"]}
    assert set(throughput) == {"ets", "rebase"}
    assert all(t["width"] == WIDTH and t["searches"] == 2 and t["searches_per_min"] > 0 for t in throughput.values())
    assert throughput["ets"]["ratio_to_first"] > 0  # ETS's searches/min over REBASE's
    table = (out / "report.md").read_text()
    assert "Against best-of-N" in table and "Throughput through the search service" in table
    assert (out / "accuracy_kv.png").read_bytes()[:4] == b"\x89PNG"
