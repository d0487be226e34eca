"""The search service process on its own (no policy or reward running): it starts anyway and
reports NOT_SERVING, refuses bad input with INVALID_ARGUMENT naming the field, answers
UNAVAILABLE naming the dead upstream, serves reflection (grpcurl) and valid Prometheus
metrics, and exits cleanly on SIGTERM."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ets.api.v1 import search_pb2, search_pb2_grpc
from service_fixtures import ServeProcess
from tools import free_port, tool

SERVICE = "ets.api.v1.SearchService"


@pytest.fixture(scope="module")
def lone_serve(serve_factory: Callable[..., ServeProcess]) -> ServeProcess:
    """``ets serve`` whose policy and reward addresses have nothing listening."""
    return serve_factory(policy_url=f"http://127.0.0.1:{free_port()}", reward_addr=f"127.0.0.1:{free_port()}")


def _search(addr: str, request: search_pb2.SearchRequest, timeout: float = 30) -> search_pb2.SearchResponse:
    with grpc.insecure_channel(addr) as channel:
        return search_pb2_grpc.SearchServiceStub(channel).Search(request, timeout=timeout)


def test_starts_without_upstreams_and_reports_not_serving(lone_serve: ServeProcess) -> None:
    with grpc.insecure_channel(lone_serve.addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    metrics = lone_serve.metrics()
    assert 'ets_search_upstream_up{upstream="policy"} 0.0' in metrics
    assert 'ets_search_upstream_up{upstream="reward"} 0.0' in metrics
    # The CLI probe used by container health checks agrees.
    probe = subprocess.run([sys.executable, "-m", "ets.cli", "health", lone_serve.addr], capture_output=True,
                           text=True, timeout=30)
    assert probe.returncode == 1 and "NOT_SERVING" in probe.stdout


@pytest.mark.parametrize(
    ("problem", "config", "field"),
    [
        ("", {}, "problem"),
        ("  \n ", {}, "problem"),
        ("2+2?", {"width": 0}, "config.width"),
        ("2+2?", {"width": 100_000_000}, "config.width"),
        ("2+2?", {"lambda_c": -1.0}, "config.lambda_c"),
        ("2+2?", {"lambda_s": -0.1}, "config.lambda_s"),
        ("2+2?", {"method": "mcts"}, "config.method"),
        ("2+2?", {"voting": "loudest"}, "config.voting"),
        ("2+2?", {"max_step_tokens": 500, "max_tokens": 100}, "config.max_step_tokens"),
        ("2+2?", {"prm_type": "oracle"}, "config.prm_type"),
    ],
)
def test_bad_input_is_invalid_argument_naming_field(lone_serve: ServeProcess, problem: str,
                                                    config: dict[str, Any], field: str) -> None:
    request = search_pb2.SearchRequest(problem=problem, config=search_pb2.SearchConfig(**config))
    with pytest.raises(grpc.RpcError) as info:
        _search(lone_serve.addr, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(field + ":"), info.value.details()


def test_stream_bad_input_is_invalid_argument(lone_serve: ServeProcess) -> None:
    with grpc.insecure_channel(lone_serve.addr) as channel:
        stream = search_pb2_grpc.SearchServiceStub(channel).SearchStream(
            search_pb2.SearchRequest(problem="x", config=search_pb2.SearchConfig(width=0)), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("config.width:")


def test_dead_policy_is_unavailable_naming_it(lone_serve: ServeProcess) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _search(lone_serve.addr, search_pb2.SearchRequest(problem="What is 2 + 3?"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = info.value.details() or ""
    assert details.startswith("policy server unavailable:") and "127.0.0.1" not in details, details


def test_reflection_only_client_grpcurl(lone_serve: ServeProcess) -> None:
    grpcurl = tool("grpcurl")
    listed = subprocess.run([grpcurl, "-plaintext", lone_serve.addr, "list"], capture_output=True, text=True,
                            timeout=30, check=True).stdout.split()
    assert SERVICE in listed and "grpc.health.v1.Health" in listed
    described = subprocess.run([grpcurl, "-plaintext", lone_serve.addr, "describe", "ets.api.v1.SearchConfig"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
    assert "lambda_s" in described and "softmax_temperature" in described
    # A call built from reflection alone: the server's INVALID_ARGUMENT comes back through grpcurl.
    bad = subprocess.run([grpcurl, "-plaintext", "-d", json.dumps({"problem": "x", "config": {"width": 0}}),
                          lone_serve.addr, f"{SERVICE}/Search"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "config.width" in bad.stderr
    health = subprocess.run([grpcurl, "-plaintext", "-d", "{}", lone_serve.addr, "grpc.health.v1.Health/Check"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(health)["status"] == "NOT_SERVING"


def test_metrics_exposition_passes_promtool_and_counts_outcomes(lone_serve: ServeProcess) -> None:
    with pytest.raises(grpc.RpcError):
        _search(lone_serve.addr, search_pb2.SearchRequest(problem="", config=search_pb2.SearchConfig(method="beam")))
    text = lone_serve.metrics()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'ets_search_searches_total{api="grpc",method="beam",outcome="invalid_argument"}' in text
    for name in ("ets_search_search_duration_seconds", "ets_search_generated_tokens_total",
                 "ets_search_cached_prompt_tokens_total", "ets_search_selection_kv_tokens",
                 "ets_search_searches_in_flight", "ets_search_searches_queued",
                 "ets_search_policy_call_duration_seconds", "ets_search_reward_call_errors_total"):
        assert f"# HELP {name} " in text, name


def test_sigterm_stops_promptly(serve_factory: Callable[..., ServeProcess]) -> None:
    serve = serve_factory(policy_url=f"http://127.0.0.1:{free_port()}", reward_addr=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    serve.proc._popen.send_signal(signal.SIGTERM)
    code = serve.proc._popen.wait(timeout=15)
    assert code == 0, serve.proc.log_tail()
    assert time.monotonic() - started < 10
    assert "stopped" in serve.proc.log_tail()
