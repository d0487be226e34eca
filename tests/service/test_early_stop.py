"""The early stop through the service: the gRPC and OpenAI requests set it like any search field,
the response says it stopped and with how much width, the vote is in the response, the metrics
count it. In-process server over scripted upstreams (the guarantee itself: test_search_early_stop)."""
from __future__ import annotations

from typing import AsyncIterator

import grpc
import httpx
import pytest

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.client.search import build_parser, config_from_args, format_response
from ets.service.server import SearchServer
from ets.testing.inprocess import serving
from ets.testing.upstreams import EARLY_STOP_SCRIPT, ScriptedPolicy, ScriptedUpstreams, TableScorer
from tools import free_port

PROBLEM = "What is 5 + 3?"
# EARLY_STOP_SCRIPT at width 6: three "8"s (0.9) and three open steps at depth 1 (undecided: 2.7
# vs 3 left); depth 2 adds two "8"s and one step: 4.5 vs 1 left, decided; the full search would go
# to depth 3.
SCORES = {"The answer is 8": 0.9, "The answer is 3": 1.0}


@pytest.fixture()
async def server() -> AsyncIterator[SearchServer]:
    upstreams = ScriptedUpstreams(ScriptedPolicy(EARLY_STOP_SCRIPT), TableScorer(SCORES))
    async with serving(upstreams, openai_port=free_port()) as srv:
        yield srv


async def _search(srv: SearchServer, **config: object) -> search_pb2.SearchResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        request = search_pb2.SearchRequest(problem=PROBLEM, config=search_pb2.SearchConfig(
            method="rebase", width=6, **config))  # type: ignore[arg-type]
        return await stub.Search(request, timeout=10)


def _early_stops(srv: SearchServer) -> tuple[float, float]:
    reg = srv.metrics.registry
    return (reg.get_sample_value("ets_search_early_stops_total", {"method": "rebase"}) or 0.0,
            reg.get_sample_value("ets_search_early_stop_width_left_total", {"method": "rebase"}) or 0.0)


async def test_grpc_option_stats_votes_and_metrics(server: SearchServer) -> None:
    full = await _search(server)
    assert not full.stats.stopped_early and not full.config.early_stop and full.stats.depth_reached == 3
    early = await _search(server, early_stop=True)
    assert early.config.early_stop and early.stats.stopped_early and early.stats.width_left == 1
    assert early.answer == full.answer == "8"
    assert early.stats.depth_reached == 2 and early.stats.generated_tokens < full.stats.generated_tokens
    assert [(v.answer, v.trajectories) for v in early.votes] == [("8", 5)]
    assert early.votes[0].vote == pytest.approx(4.5) and early.votes[0].best_score == pytest.approx(0.9)
    assert [(v.answer, v.trajectories) for v in full.votes] == [("8", 5), ("3", 1)]
    assert _early_stops(server) == (1.0, 1.0)
    text = format_response(early)
    assert "vote (weighted_majority): '8': 5 trajectories, summed score 4.5 (best 0.9)" in text
    assert "stopped early (vote decided), 1 width left" in text
    assert "runner-up '3': 1 trajectory, summed score 1 (best 1)" in format_response(full)


def test_cli_flag_is_a_boolean() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["q", "--early-stop", "true"])).early_stop is True
    assert not config_from_args(parser.parse_args(["q", "--early-stop", "off"])).early_stop
    with pytest.raises(SystemExit):
        parser.parse_args(["q", "--early-stop", "maybe"])


async def test_openai_body_header_and_bad_value(server: SearchServer) -> None:
    assert server.openai is not None
    url = f"http://127.0.0.1:{server.openai.port}/v1/chat/completions"
    body = {"model": "rebase", "messages": [{"role": "user", "content": PROBLEM}], "ets": {"width": 6}}
    async with httpx.AsyncClient(timeout=10) as client:
        on = (await client.post(url, json={**body, "ets": {"width": 6, "early_stop": True}})).json()
        assert on["ets"]["config"]["early_stop"] is True
        assert on["ets"]["stats"]["stopped_early"] is True and on["ets"]["stats"]["width_left"] == 1
        assert on["ets"]["votes"][0] == {"answer": "8", "trajectories": 5, "vote": pytest.approx(4.5),
                                         "best_score": pytest.approx(0.9)}
        header = (await client.post(url, json=body, headers={"X-ETS-Early-Stop": "1"})).json()
        assert header["ets"]["stats"]["stopped_early"] is True
        off = (await client.post(url, json=body)).json()
        assert off["ets"]["stats"]["stopped_early"] is False and off["ets"]["config"]["early_stop"] is False
        bad = await client.post(url, json={**body, "ets": {"width": 6, "early_stop": "yes"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "ets.early_stop"
        # The policy by its served name or by its path; responses use the served name.
        models = (await client.get(f"http://127.0.0.1:{server.openai.port}/v1/models")).json()
        assert models["data"][0]["id"] == "scripted-policy-model"
        for name in ("scripted-policy-model", "/models/scripted-policy-model"):
            reply = (await client.post(url, json={**body, "model": name})).json()
            assert reply["model"] == "scripted-policy-model", reply
        wrong = await client.post(url, json={**body, "model": "other"})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    assert _early_stops(server)[0] == 2.0


async def test_bench_replay_matches_the_option_on_the_same_tree(server: SearchServer) -> None:
    # bench/early_stop.py replays the rule on a full search's stream; on a deterministic tree the
    # replay must stop where the option stops, with its tokens and answer.
    import importlib.util
    from pathlib import Path

    from ets.client.search import run_search

    spec = importlib.util.spec_from_file_location("bench_early_stop", Path(__file__).parents[2] / "bench/early_stop.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    replay = bench.replay

    addr = f"127.0.0.1:{server.port}"
    config = search_pb2.SearchConfig(method="rebase", width=6)
    full, events = await run_search(addr, search_pb2.SearchRequest(problem=PROBLEM, config=config), timeout=10,
                                    stream=True)
    config.early_stop = True
    early, _ = await run_search(addr, search_pb2.SearchRequest(problem=PROBLEM, config=config), timeout=10)
    r = replay(full, events)
    assert r == {"stopped": True, "depth": early.stats.depth_reached, "width_left": early.stats.width_left,
                 "generated_tokens": early.stats.generated_tokens, "finished": len(early.candidates),
                 "answer": early.answer}
