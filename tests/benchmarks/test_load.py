"""The load benchmark's pure parts (bench/load.py): percentiles, SGLang metrics parsing, level summary."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import load as load_bench

# An excerpt of SGLang 0.5.23's /metrics as the CPU policy engine served it (two label sets for
# one counter: SGLang labels cached tokens by cache source).
SGLANG_METRICS = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="/m/smollm2",pp_rank="0",tp_rank="0"} 7.0
# HELP sglang:kv_used_tokens Number of actively used token slots in the KV cache pool.
# TYPE sglang:kv_used_tokens gauge
sglang:kv_used_tokens{engine_type="unified",model_name="/m/smollm2",pp_rank="0",tp_rank="0"} 1234.0
sglang:kv_evictable_tokens{engine_type="unified",model_name="/m/smollm2",pp_rank="0",tp_rank="0"} 566.0
sglang:token_usage{engine_type="unified",model_name="/m/smollm2",pp_rank="0",tp_rank="0"} NaN
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{cache_source="device",model_name="/m/smollm2"} 900.0
sglang:cached_tokens_total{cache_source="host",model_name="/m/smollm2"} 100.0
sglang:prompt_tokens_total{model_name="/m/smollm2"} 1.25e3
# TYPE sglang:queue_time_seconds histogram
sglang:queue_time_seconds_bucket{le="0.1",model_name="/m/smollm2"} 3.0
sglang:queue_time_seconds_bucket{le="+Inf",model_name="/m/smollm2"} 4.0
sglang:queue_time_seconds_sum{model_name="/m/smollm2"} 0.75
sglang:queue_time_seconds_count{model_name="/m/smollm2"} 4.0
ets_search_queue_wait_seconds_sum 2.5
"""


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(3)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.uniform(0, 100) for _ in range(n)]
        for q in (0, 1, 50, 95, 99, 100):
            assert load_bench.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_edges() -> None:
    assert load_bench.percentile([], 50) is None
    assert load_bench.percentile([4.0], 99) == 4.0
    assert load_bench.percentile([1, 2, 3, 4], 50) == 2.5  # interpolated, order of input irrelevant
    assert load_bench.percentile([4, 3, 2, 1], 50) == 2.5
    with pytest.raises(ValueError, match="q"):
        load_bench.percentile([1.0], 101)


def test_parse_metrics_sums_label_sets_and_skips_nan_comments_and_buckets() -> None:
    m = load_bench.parse_metrics(SGLANG_METRICS)
    assert m["sglang:num_running_reqs"] == 7.0
    assert m["sglang:cached_tokens_total"] == 1000.0  # device + host
    assert m["sglang:prompt_tokens_total"] == 1250.0
    assert m["sglang:queue_time_seconds_sum"] == 0.75 and m["sglang:queue_time_seconds_count"] == 4.0
    assert "sglang:token_usage" not in m  # NaN: absent
    assert not any(k.endswith("_bucket") for k in m)
    assert m["ets_search_queue_wait_seconds_sum"] == 2.5  # unlabelled series


def test_parse_metrics_keeps_only_named_series() -> None:
    m = load_bench.parse_metrics(SGLANG_METRICS, ["sglang:kv_used_tokens", "sglang:queue_time_seconds_bucket"])
    assert m == {"sglang:kv_used_tokens": 1234.0, "sglang:queue_time_seconds_bucket": 7.0}


def test_summarise_level_uses_deltas_gauges_and_statuses() -> None:
    ok = [load_bench.Outcome("ets", i, start_s=0.0, end_s=10.0 * (i + 1), status="OK", correct=i == 0, run_s=5.0,
                             generated_tokens=100, prompt_tokens=200, cached_prompt_tokens=150,
                             total_kv_tokens=300, peak_kv_tokens=120) for i in range(3)]
    failed = load_bench.Outcome("ets", 3, start_s=1.0, end_s=2.0, status="RESOURCE_EXHAUSTED")
    before = {"sglang:generation_tokens_total": 1000.0, "sglang:prompt_tokens_total": 500.0,
              "sglang:cached_tokens_total": 100.0, "sglang:evicted_tokens_total": 0.0}
    after = {"sglang:generation_tokens_total": 1300.0, "sglang:prompt_tokens_total": 1100.0,
             "sglang:cached_tokens_total": 550.0, "sglang:evicted_tokens_total": 40.0,
             "sglang:max_total_num_tokens": 8192.0}
    samples = [{"sglang:num_running_reqs": 2.0, "sglang:kv_used_tokens": 100.0, "sglang:kv_evictable_tokens": 50.0},
               {"sglang:num_running_reqs": 6.0, "sglang:kv_used_tokens": 300.0, "sglang:kv_evictable_tokens": 10.0}]
    wait = "ets_search_queue_wait_seconds"
    s = load_bench.summarise_level(ok + [failed], 20.0, before, after, samples,
                                   {f"{wait}_sum": 1.0, f"{wait}_count": 2.0},
                                   {f"{wait}_sum": 4.0, f"{wait}_count": 5.0})
    assert s["ok"] == 3 and s["errors"] == {"RESOURCE_EXHAUSTED": 1} and s["correct"] == 1
    assert s["span_s"] == 30.0 and s["searches_per_min"] == pytest.approx(6.0)
    assert s["latency_p50_s"] == 20.0 and s["latency_p99_s"] == pytest.approx(29.8)
    assert s["queue_wait_mean_s"] == pytest.approx(1.0)  # 3 s over 3 searches
    assert s["engine_gen_tokens_per_s"] == pytest.approx(10.0)  # 300 tokens in 30 s
    assert s["engine_cached_ratio"] == pytest.approx(0.75) and s["search_cached_ratio"] == pytest.approx(0.75)
    assert s["running_reqs"] == {"mean": 4.0, "max": 6.0}
    assert s["kv_held_max_tokens"] == 310.0 and s["kv_used_max_share"] == pytest.approx(300 / 8192)
    assert s["evicted_tokens"] == 40.0
    table = load_bench.markdown([{"concurrency": 4, "label": "ets", "summary": s}])
    assert "| 4 | ets | 3 | 6.00 |" in table


def test_ratios_pair_methods_at_each_concurrency() -> None:
    def level(c: int, label: str, spm: float, kv: float) -> dict[str, object]:
        return {"concurrency": c, "label": label, "summary": {"searches_per_min": spm, "mean_total_kv_tokens": kv}}

    rows = [level(1, "ets", 3.0, 500.0), level(1, "rebase", 2.0, 1000.0), level(2, "ets", 4.0, 400.0)]
    assert load_bench.ratios(rows, "ets", "rebase") == [
        {"concurrency": 1, "throughput_ratio": 1.5, "kv_total_ratio": 2.0}]
