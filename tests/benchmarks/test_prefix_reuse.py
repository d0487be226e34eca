"""The prefix-reuse benchmark's pure parts (bench/prefix_reuse.py): what is sharable (a
prefill-only request counts as having put its prompt in the engine) and the KV pool occupancy
summary of one search's gauge samples."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import prefix_reuse as bench

ROOT = (1, 2, 3, 4, 5)


def test_a_prefill_request_makes_the_whole_fan_out_sharable() -> None:
    reqs = [bench.Request(0, 0, ROOT, (), 5, 0)] + [bench.Request(1, i, ROOT, (7 + i, 9), 5, 4) for i in range(3)]
    reqs.append(bench.Request(2, 0, ROOT + (7, 9), (3,), 7, 6))  # a child: parent ids + its sample
    bench.assign_sharable(reqs)
    assert [r.sharable for r in reqs] == [0, 4, 4, 4, 6]
    s = bench.reuse_summary(reqs)
    assert s["cached_over_sharable"] == 1.0 and s["requests_short"] == 0
    assert s["prompt_tokens"] == 5 + 15 + 7


def test_without_the_prefill_the_batch_duplicates_count_as_short() -> None:
    reqs = [bench.Request(0, i, ROOT, (7 + i,), 5, 0) for i in range(3)]
    bench.assign_sharable(reqs)
    s = bench.reuse_summary(reqs)
    assert [r.sharable for r in reqs] == [0, 4, 4]
    assert s["requests_short"] == 2 and s["short_by_position"] == {"first_of_call": 0, "later_in_call": 2}


def test_occupancy_peaks_and_means() -> None:
    samples = [{"sglang:kv_used_tokens": 10.0, "sglang:kv_evictable_tokens": 0.0, "sglang:token_usage": 0.1},
               {"sglang:kv_used_tokens": 30.0, "sglang:kv_evictable_tokens": 50.0, "sglang:token_usage": 0.3},
               {"sglang:kv_evictable_tokens": 5.0}]
    occ = bench.occupancy(samples)
    assert occ["used_peak"] == 30.0 and occ["used_mean"] == pytest.approx(20.0)
    assert occ["held_peak"] == 80.0 and occ["held_mean"] == pytest.approx(45.0)
    assert occ["token_usage_peak"] == 0.3
    assert bench.occupancy([]) == {k: None for k in occ}
