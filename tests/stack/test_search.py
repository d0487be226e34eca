"""The whole stack on loopback: SGLang policy + reward server (SGLang PRM, MiniLM embedder) +
``ets serve``. Every method returns a well-formed result; the stream's per-depth events add up
to the final statistics; the service is usable from reflection alone (grpcurl), from the CLI and
from ``ets eval``."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.testing.stack import Stack
from service_fixtures import REPO
from tools import small as _small, tool

# The first test of a session also pays for starting the stack (minutes on a loaded CPU).
pytestmark = [pytest.mark.sglang, pytest.mark.stack, pytest.mark.timeout(1200)]

METHODS = ("ets", "rebase", "beam", "dvts", "best_of_n")
FINISH = {"answer", "eos", "max_tokens", "max_depth"}
PROBLEM = "Tom has 3 apples and buys 5 more. How many apples does he have now?"


def small(method: str, width: int = 4, **extra: object) -> search_pb2.SearchConfig:
    return _small(method, width, **{"seed": 3, **extra})  # seeded: reruns give the same trees


def search(addr: str, config: search_pb2.SearchConfig, problem: str = PROBLEM,
           timeout: float = 180) -> search_pb2.SearchResponse:
    with grpc.insecure_channel(addr) as channel:
        return search_pb2_grpc.SearchServiceStub(channel).Search(
            search_pb2.SearchRequest(problem=problem, config=config, request_id="t"), timeout=timeout)


def check_well_formed(response: search_pb2.SearchResponse, method: str, width: int) -> None:
    assert response.request_id == "t"
    assert response.config.method == method and response.config.width == width
    # Resolved config echoes the defaults the server filled in.
    assert response.config.max_tokens == 96 and response.config.HasField("lambda_s")
    cands = response.candidates
    assert 1 <= len(cands) <= width
    for c in cands:
        assert c.finish_reason in FINISH
        assert c.depth >= 1 and len(c.step_scores) == c.depth
        assert all(0.0 <= s <= 1.0 for s in c.step_scores)
        assert c.tokens > 0 and c.text
        if c.finish_reason != "max_tokens":
            assert c.tokens <= 96
    best = response.best
    assert any(best == c for c in cands)
    assert best.aggregate_score == pytest.approx(max(c.aggregate_score for c in cands)) or response.answer
    if response.answer:
        assert best.answer
    s = response.stats
    assert s.selections >= 1 and s.depth_reached >= 1
    assert 0 < s.peak_kv_tokens <= s.total_kv_tokens
    assert s.model_calls >= len(cands)
    assert s.generated_tokens > 0 and s.prompt_tokens > 0
    assert 0 <= s.cached_prompt_tokens <= s.prompt_tokens
    # The loop's parts run one after another inside the service's wall time.
    assert s.wall_seconds >= s.policy_seconds + s.reward_seconds + s.selection_seconds - 1e-3
    assert s.policy_seconds > 0 and s.reward_seconds > 0


@pytest.mark.parametrize("method", METHODS)
def test_each_method_returns_well_formed_result(search_stack: Stack, method: str) -> None:
    width = 4
    response = search(search_stack.search_addr, small(method, width))
    check_well_formed(response, method, width)


def test_prefix_cache_is_reused_across_depths(search_stack: Stack) -> None:
    # Width 8 and 4 depths: children re-send their parents' prefixes, which the engine caches.
    response = search(search_stack.search_addr, small("rebase", 8))
    s = response.stats
    assert s.depth_reached >= 2, "a one-depth search cannot show reuse"
    assert s.cached_prompt_tokens > 0
    # Unset fields came from the server's defaults (ETS_SEARCH_* of the stack fixture).
    default = search(search_stack.search_addr, search_pb2.SearchConfig(method="rebase"))
    assert default.config.width == 4 and default.config.max_step_tokens == 12


@pytest.mark.parametrize("method", ["ets", "best_of_n"])
def test_stream_events_match_result(search_stack: Stack, method: str) -> None:
    request = search_pb2.SearchRequest(problem=PROBLEM, config=small(method, 6), request_id="t")
    with grpc.insecure_channel(search_stack.search_addr) as channel:
        events = list(search_pb2_grpc.SearchServiceStub(channel).SearchStream(request, timeout=180))
    assert events and events[-1].HasField("result")
    progress = [e.progress for e in events[:-1]]
    assert all(e.HasField("progress") for e in events[:-1])
    result = events[-1].result
    s = result.stats
    assert [p.depth for p in progress] == list(range(len(progress)))
    assert len(progress) == s.selections
    assert sum(p.kv_tokens for p in progress) == s.total_kv_tokens
    assert max(p.kv_tokens for p in progress) == s.peak_kv_tokens
    assert progress[0].frontier_size == 1 and progress[0].remaining_width == 6  # the root gets the width
    for a, b in itertools.pairwise(progress):
        assert b.elapsed_seconds >= a.elapsed_seconds
        assert b.finished >= a.finished and b.remaining_width <= a.remaining_width
        # Width is spent only by finished trajectories.
        assert a.remaining_width - b.remaining_width == b.finished - a.finished
    for p in progress:
        assert 0 <= p.kept_candidates <= p.frontier_size
    assert progress[-1].finished <= len(result.candidates)
    check_well_formed(result, method, 6)
    if method == "best_of_n":
        # No pruning: every live trajectory gets exactly one child per depth.
        assert all(p.kept_candidates == p.frontier_size for p in progress)


def test_reflection_only_client_runs_a_search(search_stack: Stack) -> None:
    body = {"problem": PROBLEM, "config": {"method": "rebase", "width": 3, "max_depth": 3}, "request_id": "grpcurl"}
    done = subprocess.run([tool("grpcurl"), "-plaintext", "-max-time", "180", "-d", json.dumps(body),
                           search_stack.search_addr, "ets.api.v1.SearchService/Search"],
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)  # grpcurl prints the proto's own field names
    assert reply["request_id"] == "grpcurl"
    assert reply["config"]["method"] == "rebase" and reply["config"]["width"] == 3
    assert 1 <= len(reply["candidates"]) <= 3
    assert int(reply["stats"]["total_kv_tokens"]) > 0 and int(reply["stats"]["generated_tokens"]) > 0
    health = subprocess.run([tool("grpcurl"), "-plaintext", "-d", '{"service": "ets.api.v1.SearchService"}',
                             search_stack.search_addr, "grpc.health.v1.Health/Check"],
                            capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(health.stdout)["status"] == "SERVING"


def _ets(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ets.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_cli_search_text_and_json(search_stack: Stack) -> None:
    text = _ets("search", PROBLEM, "--addr", search_stack.search_addr, "--method", "ets", "--width", "4",
                "--stream", "--seed", "5")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "answer:" in out and "candidates (" in out and "KV tokens (logical)" in out
    assert "depth  0:" in out  # streamed progress lines
    js = _ets("search", PROBLEM, "--addr", search_stack.search_addr, "--method", "beam", "--width", "4", "--json")
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["config"]["method"] == "beam" and data["stats"]["selections"] >= 1
    bad = _ets("search", PROBLEM, "--addr", search_stack.search_addr, "--width", "0", "--retries", "0")
    assert bad.returncode == 1 and "INVALID_ARGUMENT: config.width" in bad.stderr


def test_eval_over_sample_dataset(search_stack: Stack, tmp_path: Path) -> None:
    """Methods x widths plus an ETS sweep point, through the real service; then ``--resume`` with
    one more problem runs only that problem's searches."""
    out, plot, md = tmp_path / "eval.json", tmp_path / "acc_vs_kv.png", tmp_path / "table.md"
    common = ("--addr", search_stack.search_addr, "--methods", "ets,rebase", "--widths", "2,4",
              "--sweep", "cluster_distance=0.5", "--sweep-widths", "4", "--concurrency", "4", "--seed", "5",
              "--out", str(out), "--no-progress")
    done = _ets("eval", str(REPO / "bench" / "data" / "gsm8k_sample.jsonl"), "--limit", "2", *common,
                "--plot", str(plot), "--markdown", str(md), timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["problems"] == 2 and report["complete"] and report["seed"] == 5
    summary = {(s["label"], s["width"]): s for s in report["summary"]}
    swept = "ets[cluster_distance=0.5]"
    assert set(summary) == {("ets", 2), ("ets", 4), ("rebase", 2), ("rebase", 4), (swept, 4)}
    for s in summary.values():
        assert s["problems"] == 2 and s["errors"] == 0
        assert 0.0 <= s["accuracy_ci_low"] <= s["accuracy"] <= s["accuracy_ci_high"] <= 1.0
        assert s["mean_total_kv_tokens"] >= s["mean_peak_kv_tokens"] > 0
        assert 0.0 <= s["cache_reuse"] <= 1.0 and 0.0 < s["kept_share"] <= 1.0
        assert s["accuracy"] <= s["oracle_accuracy"] or s["accuracy"] == 0.0
    rows = report["results"]
    assert len(rows) == 10 and all(not math.isnan(r["wall_seconds"]) for r in rows)
    # Every configuration of a problem ran with that problem's seed; the sweep's value reached the service.
    assert {(r["id"], r["seed"]) for r in rows} == {("s1", 5), ("s2", 6)}
    assert all(r["resolved_config"]["cluster_distance"] == pytest.approx(0.5) for r in rows if r["label"] == swept)
    assert {c["label"] for c in report["ets_vs_rebase"]} == {"ets", swept}
    assert plot.read_bytes()[:4] == b"\x89PNG" and f"| {swept} | 4 | 2 |" in md.read_text()
    # --resume: the first two problems' searches are reused, only the third problem's run.
    again = _ets("eval", str(REPO / "bench" / "data" / "gsm8k_sample.jsonl"), "--limit", "3", *common, "--resume",
                 timeout=600)
    assert again.returncode == 0, again.stderr
    report = json.loads(out.read_text())
    lines = (tmp_path / "eval.jsonl").read_text().splitlines()
    assert len(report["results"]) == 15 and len(lines) == 15
    assert [json.loads(line)["id"] for line in lines[10:]] == ["s3"] * 5
