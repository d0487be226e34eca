"""Metrics on the real stack: a real Prometheus scrapes the search service and answers queries
for throughput and prefix-cache reuse; the exposition passes ``promtool check metrics``; the
per-search counters agree with the responses."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pytest

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.testing.stack import Stack
from service_fixtures import start_prometheus
from tools import http_get, metric

# The first test of a session also pays for starting the stack (minutes on a loaded CPU).
pytestmark = [pytest.mark.sglang, pytest.mark.stack, pytest.mark.timeout(1200)]


def _run_searches(addr: str, n: int, method: str = "rebase") -> list[search_pb2.SearchResponse]:
    out = []
    with grpc.insecure_channel(addr) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        for i in range(n):
            config = search_pb2.SearchConfig(method=method, width=6, max_step_tokens=12, max_tokens=96, max_depth=4,
                                             seed=i)
            out.append(stub.Search(search_pb2.SearchRequest(problem=f"What is {i} + 7?", config=config), timeout=180))
    return out


def test_counters_match_responses_and_promtool_passes(search_stack: Stack) -> None:
    before = http_get(search_stack.search_metrics_url)
    replies = _run_searches(search_stack.search_addr, 2, method="dvts")
    after = http_get(search_stack.search_metrics_url)
    for name, field in [("ets_search_generated_tokens_total", "generated_tokens"),
                        ("ets_search_prompt_tokens_total", "prompt_tokens"),
                        ("ets_search_cached_prompt_tokens_total", "cached_prompt_tokens"),
                        ("ets_search_kv_tokens_total", "total_kv_tokens"),
                        ("ets_search_model_calls_total", "model_calls"),
                        ("ets_search_selections_total", "selections")]:
        delta = metric(after, name, method="dvts") - metric(before, name, method="dvts")
        assert delta == sum(getattr(r.stats, field) for r in replies), name
    assert metric(after, "ets_search_searches_total", method="dvts", outcome="ok", api="grpc") - \
        metric(before, "ets_search_searches_total", method="dvts", outcome="ok", api="grpc") == 2
    # One selection-KV observation per selection, summing to the searches' total KV tokens.
    count = metric(after, "ets_search_selection_kv_tokens_count", method="dvts") - \
        metric(before, "ets_search_selection_kv_tokens_count", method="dvts")
    total = metric(after, "ets_search_selection_kv_tokens_sum", method="dvts") - \
        metric(before, "ets_search_selection_kv_tokens_sum", method="dvts")
    assert count == sum(r.stats.selections for r in replies)
    assert total == sum(r.stats.total_kv_tokens for r in replies)
    assert metric(after, "ets_search_upstream_up", upstream="policy") == 1
    assert metric(after, "ets_search_upstream_up", upstream="reward") == 1
    check = subprocess.run(["promtool", "check", "metrics"], input=after, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_scrapes_throughput_and_cache_reuse(search_stack: Stack, tmp_path: Path) -> None:
    target = search_stack.search_metrics_url.removeprefix("http://").removesuffix("/metrics")
    prom = start_prometheus(tmp_path / "prom", [target])
    try:
        def up() -> bool:
            res = prom.query('up{job="ets-search"}')["data"]["result"]
            return bool(res) and res[0]["value"][1] == "1"

        deadline = time.monotonic() + 30
        while not up():
            assert time.monotonic() < deadline, "prometheus never scraped the search service"
            time.sleep(0.5)
        _run_searches(search_stack.search_addr, 3)
        time.sleep(3)  # a few more scrapes after the searches
        throughput = prom.query("sum(rate(ets_search_generated_tokens_total[1m]))")
        assert throughput["status"] == "success"
        assert float(throughput["data"]["result"][0]["value"][1]) > 0
        reuse = prom.query("sum(ets_search_cached_prompt_tokens_total) / sum(ets_search_prompt_tokens_total)")
        value = float(reuse["data"]["result"][0]["value"][1])
        assert 0.0 < value <= 1.0
        p95 = prom.query("histogram_quantile(0.95, sum by (le) (rate(ets_search_search_duration_seconds_bucket[1m])))")
        assert p95["data"]["result"], p95
    finally:
        prom.stop()
