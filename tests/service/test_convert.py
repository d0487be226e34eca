"""Proto <-> config conversion: unset fields keep server defaults, bad values name the field."""
from __future__ import annotations

import dataclasses

import pytest

from ets.api.v1 import search_pb2
from ets.search.config import SearchConfig
from ets.search.loop import DepthReport, SearchResult, SearchStats
from ets.service import convert, request
from ets.search.pipeline import ServedSearch


def _resolve(message: search_pb2.SearchConfig, defaults: SearchConfig) -> SearchConfig:
    """What the server does with a request's config: its overrides over the defaults, validated."""
    return request.resolve_config(convert.config_overrides(message), defaults)


def test_unset_fields_take_server_defaults() -> None:
    defaults = SearchConfig().replace(width=8, max_step_tokens=16, max_tokens=64)
    config = _resolve(search_pb2.SearchConfig(), defaults)
    assert config == defaults


def test_set_fields_override_including_zero_values() -> None:
    defaults = SearchConfig()
    msg = search_pb2.SearchConfig(method="rebase", width=4, lambda_c=0.0, seed=0, temperature=0.7)
    config = _resolve(msg, defaults)
    assert (config.method, config.width, config.lambda_c, config.seed, config.temperature) == ("rebase", 4, 0.0, 0, 0.7)
    # Untouched fields still the defaults.
    assert config.max_tokens == defaults.max_tokens and config.voting == defaults.voting


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (search_pb2.SearchConfig(width=0), "config.width"),
        (search_pb2.SearchConfig(width=1_000_000), "config.width"),
        (search_pb2.SearchConfig(lambda_c=-1.0), "config.lambda_c"),
        (search_pb2.SearchConfig(lambda_s=-0.5), "config.lambda_s"),
        (search_pb2.SearchConfig(method="mcts"), "config.method"),
        (search_pb2.SearchConfig(aggregation="median"), "config.aggregation"),
        (search_pb2.SearchConfig(max_step_tokens=0), "config.max_step_tokens"),
        (search_pb2.SearchConfig(policy_model_type="gpt"), "config.policy_model_type"),
    ],
)
def test_bad_config_names_field(msg: search_pb2.SearchConfig, field: str) -> None:
    with pytest.raises(request.RequestError) as info:
        _resolve(msg, SearchConfig())
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


@pytest.mark.parametrize("problem", ["", "   \n\t"])
def test_empty_problem_rejected(problem: str) -> None:
    with pytest.raises(request.RequestError) as info:
        request.validate_problem(problem)
    assert info.value.field == "problem"


def test_resolved_config_round_trips() -> None:
    config = SearchConfig().replace(width=64, seed=7)
    msg = convert.config_to_proto(config)
    # Every field is set in the echo (lambda_s and beam_keep resolved from the width preset).
    assert msg.HasField("lambda_s") and msg.lambda_s == pytest.approx(1.4)
    assert msg.beam_keep == 8
    back = _resolve(msg, SearchConfig())
    assert back == dataclasses.replace(config.resolved())


def test_every_message_the_core_fills_matches_its_dataclass() -> None:
    """Statistics, depth progress, candidates, votes and the config: the proto and the core's
    dataclass name the same fields (the import guard's check, shown to catch a new statistic)."""
    assert all(convert.contract_drift(m, c) == "" for m, c in convert.CONTRACTS)
    assert {m.DESCRIPTOR.name for m, _ in convert.CONTRACTS} == {
        "SearchConfig", "SearchStats", "DepthProgress", "Candidate", "AnswerVote"}

    @dataclasses.dataclass
    class GrownStats(SearchStats):
        new_counter: int = 0

    drift = convert.contract_drift(search_pb2.SearchStats, GrownStats)
    assert "only in the core ['new_counter']" in drift


def test_statistics_reach_the_proto_field_by_field() -> None:
    stats = SearchStats(total_kv_tokens=7, solver_time_limits=2, token_budget_hit=True, stopped_early=True,
                        width_left=3, wall_seconds=1.0)
    result = SearchResult(trajectories=[], stats=stats, config=SearchConfig())
    served = ServedSearch(config=SearchConfig(), result=result, answer="", candidates=[], best_index=None,
                          wall_seconds=2.5)
    out = convert.response_to_proto(served, "r").stats
    assert (out.total_kv_tokens, out.solver_time_limits, out.token_budget_hit, out.stopped_early, out.width_left) \
        == (7, 2, True, True, 3)
    assert out.wall_seconds == 2.5  # the service's wall time, root and vote included
    progress = DepthReport(depth=1, frontier_size=4, kept_candidates=2, kv_tokens=90, remaining_width=3,
                           finished=1, elapsed_seconds=0.5, generated_tokens=40)
    assert convert.progress_to_proto(progress).generated_tokens == 40
