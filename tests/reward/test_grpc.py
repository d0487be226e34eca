"""The reward server's gRPC surface over real loopback: embeddings, bad input, health, reflection,
metrics, client retries, CLI startup errors and SIGTERM. The PRM runs on the transformers backend
here (no SGLang needed); the SGLang backend is covered in test_reward_server.py.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ets.api.v1 import reward_pb2, reward_pb2_grpc
from ets.engine.process import free_port
from ets.healthcheck import check
from ets.retry import RetryPolicy
from ets.reward.client import RewardClient, RewardError, RewardUnavailable
from ets.search.interfaces import ScoredTrajectory
from reward_fixtures import ThreadedRewardServer, reward_config

MAX_BATCH = 16


@pytest.fixture(scope="module")
def server(reward_servers: Callable[..., ThreadedRewardServer],
           tiny_model_factory: Callable[[str], Path]) -> ThreadedRewardServer:
    return reward_servers(reward_config(tiny_model_factory("math-shepherd"), "math-shepherd", "transformers",
                                        max_batch_size=MAX_BATCH))


def _traj(question: str = "What is 2 + 2?",
          steps: tuple[str, ...] = ("2 + 2 = 4", "The answer is 4")) -> reward_pb2.Trajectory:
    return reward_pb2.Trajectory(question=question, steps=list(steps))


async def test_embeddings_are_normalised_and_semantic(server: ThreadedRewardServer) -> None:
    texts = [
        "We add the two numbers to get the total.",
        "Adding both numbers gives us the sum.",
        "The triangle's angles are measured in degrees.",
    ]
    async with RewardClient(server.address) as client:
        vectors = await client.embed(texts)
        info = await client.info()
        assert (await client.embed([])).shape == (0, 384)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert info.embedding_dim == 384
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2 and sims[0, 1] > sims[1, 2] + 0.2


async def test_score_through_client(server: ThreadedRewardServer) -> None:
    trajs = [ScoredTrajectory("What is 2 + 2?", ["2 + 2 = 4", "The answer is 4"]),
             ScoredTrajectory("What is 3 * 3?", ["3 * 3 = 9"])]
    async with RewardClient(server.address) as client:
        full = await client.score(trajs)
        last = await client.score_last_steps(trajs)
        # More trajectories than the server's max_batch_size: the client splits them.
        many = await client.score_last_steps(trajs * MAX_BATCH)
    assert [len(s) for s in full] == [2, 1]
    assert all(0.0 <= x <= 1.0 for s in full for x in s)
    assert last == pytest.approx([s[-1] for s in full], abs=1e-6)
    assert many == pytest.approx(last * MAX_BATCH, abs=1e-6)


async def test_empty_steps_are_scored_at_their_boundary(server: ThreadedRewardServer) -> None:
    # A policy may stop right at its delimiter: the empty step still gets its own score.
    trajs = [ScoredTrajectory("What is 2 + 2?", ["2 + 2 = 4", "", "The answer is 4"]),
             ScoredTrajectory("What is 2 + 2?", ["  "])]
    async with RewardClient(server.address) as client:
        full = await client.score(trajs)
        last = await client.score_last_steps(trajs)
        nonempty = await client.score([ScoredTrajectory("What is 2 + 2?", ["2 + 2 = 4", "The answer is 4"])])
    assert [len(s) for s in full] == [3, 1]
    assert all(0.0 <= x <= 1.0 for s in full for x in s)
    assert last == pytest.approx([full[0][-1], full[1][0]], abs=1e-6)
    # The step before the empty one sees the same prefix either way (scores are causal).
    assert full[0][0] == pytest.approx(nonempty[0][0], abs=1e-5)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (reward_pb2.ScoreRequest(), "trajectories"),
        (reward_pb2.ScoreRequest(trajectories=[_traj(question="  ")]), "trajectories[0].question"),
        (reward_pb2.ScoreRequest(trajectories=[_traj(), _traj(steps=())]), "trajectories[1].steps"),
        (reward_pb2.ScoreRequest(trajectories=[_traj()] * (MAX_BATCH + 1)), "trajectories"),
        (reward_pb2.ScoreRequest(trajectories=[_traj()], prm_type="orm"), "prm_type"),
        (reward_pb2.ScoreRequest(trajectories=[_traj()], prm_type="qwen-prm"), "prm_type"),
        (reward_pb2.ScoreRequest(trajectories=[_traj(steps=("word " * 5000,))]), "trajectories[0]"),
        (reward_pb2.EmbedRequest(), "texts"),
        (reward_pb2.EmbedRequest(texts=["a"] * (MAX_BATCH + 1)), "texts"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(server: ThreadedRewardServer, request_: object,
                                                              field: str) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        method = stub.Score if isinstance(request_, reward_pb2.ScoreRequest) else stub.Embed
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await method(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}:"), err.value.details()
    assert "Traceback" not in (err.value.details() or "")


async def test_health_reflection_and_metrics(server: ThreadedRewardServer) -> None:
    assert await asyncio.to_thread(check, server.address) == "SERVING"
    assert await asyncio.to_thread(check, server.address, "ets.api.v1.RewardService") == "SERVING"
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [r async for r in stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="ets.api.v1.RewardService"),
        ]))]
        # Make sure the counters below have something to count.
        reward = reward_pb2_grpc.RewardServiceStub(channel)
        await reward.Score(reward_pb2.ScoreRequest(trajectories=[_traj(), _traj()]), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError):
            await reward.Score(reward_pb2.ScoreRequest(), timeout=30)
        await reward.Embed(reward_pb2.EmbedRequest(texts=["x", "y", "z"]), timeout=30)
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"ets.api.v1.RewardService", "grpc.health.v1.Health"} <= services
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the reward.proto descriptor

    text = await asyncio.to_thread(lambda: urllib.request.urlopen(server.metrics_url, timeout=10).read().decode())
    for series in (
        'ets_reward_requests_total{code="OK",method="Score"}',
        'ets_reward_requests_total{code="INVALID_ARGUMENT",method="Score"}',
        'ets_reward_errors_total{code="INVALID_ARGUMENT",method="Score"}',
        'ets_reward_requests_total{code="OK",method="Embed"}',
        'ets_reward_request_seconds_bucket{le="0.005",method="Score"}',
        'ets_reward_request_items_bucket{le="2.0",method="Score"}',
        'ets_reward_model_batch_items_count{model="prm"}',
        'ets_reward_model_batch_items_count{model="embedder"}',
        'ets_reward_prm_tokens_total{kind="prompt"}',
        "ets_reward_backend_up 1.0",
        "ets_reward_scored_steps_total",
        "ets_reward_prm_restarts_total 0.0",
    ):
        assert series in text, series


async def test_client_raises_reward_unavailable_after_bounded_retries() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    client = RewardClient(address, retry=RetryPolicy(max_retries=2, initial_backoff_s=0.05), timeout_s=5)
    try:
        with pytest.raises(RewardUnavailable) as err:
            await client.score_last_steps([ScoredTrajectory("q", ["s"])])
    finally:
        await client.close()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "after 3 attempts" in str(err.value)


async def test_client_does_not_retry_invalid_argument(server: ThreadedRewardServer) -> None:
    async with RewardClient(server.address, retry=RetryPolicy(max_retries=4)) as client:
        with pytest.raises(RewardError) as err:
            await client.score([ScoredTrajectory("", ["s"])])
    assert not isinstance(err.value, RewardUnavailable)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _reward_serve(env_overrides: dict[str, str], *args: str, **popen: object) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", ETS_DEVICE="cpu", ETS_REWARD_HOST="127.0.0.1", **env_overrides)
    return subprocess.Popen([sys.executable, "-m", "ets.cli", "reward-serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"ETS_PRM_TYPE": "orm", "ETS_PRM_BACKEND": "transformers"}, "ETS_PRM_TYPE"),
        ({"ETS_PRM_TYPE": "qwen-prm", "ETS_PRM_BACKEND": "sglang"}, "ETS_PRM_BACKEND"),
        ({"ETS_PRM_TYPE": "math-shepherd", "ETS_PRM_BACKEND": "vllm"}, "ETS_PRM_BACKEND"),
        ({"ETS_PRM_TYPE": "arithmetic", "ETS_PRM_BACKEND": "sglang"}, "ETS_PRM_BACKEND"),
        ({"ETS_PRM_TYPE": "judge", "ETS_PRM_BACKEND": "transformers", "ETS_PRM_JUDGE_NEXT_TURN": "Correct?"},
         "ETS_PRM_JUDGE_NEXT_TURN"),
        ({"ETS_PRM_TYPE": "math-shepherd", "ETS_PRM_BACKEND": "transformers", "ETS_REWARD_PORT": "x"},
         "ETS_REWARD_PORT"),
        ({"ETS_PRM_TYPE": "math-shepherd", "ETS_PRM_BACKEND": "sglang", "ETS_PRM_HOST": "0.0.0.0 --port 1"},
         "ETS_PRM_HOST"),
    ],
)
def test_cli_refuses_bad_configuration_naming_the_setting(env: dict[str, str], field: str,
                                                          tiny_model_factory: Callable[[str], Path]) -> None:
    kind = "qwen-prm" if env["ETS_PRM_TYPE"] == "qwen-prm" else "math-shepherd"
    proc = _reward_serve({"ETS_PRM_MODEL": str(tiny_model_factory(kind)), "ETS_REWARD_PORT": "0",
                          "ETS_REWARD_METRICS_PORT": "0", **env})
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, (out, err)
    message = err.decode()
    assert f"{field}:" in message and "Traceback" not in message, message


def test_sigterm_stops_gracefully(tmp_path: Path, tiny_model_factory: Callable[[str], Path]) -> None:
    ready = tmp_path / "ready"
    proc = _reward_serve({"ETS_PRM_MODEL": str(tiny_model_factory("qwen-prm")), "ETS_PRM_TYPE": "qwen-prm",
                          "ETS_PRM_BACKEND": "transformers", "ETS_REWARD_PORT": "0",
                          "ETS_REWARD_METRICS_PORT": "0", "ETS_REWARD_GRACE_S": "60"},
                         "--ready-file", str(ready))
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() or not ready.read_text().strip():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "reward server never wrote its ready file"
            time.sleep(0.2)
        port, metrics_port = (int(x) for x in ready.read_text().split())
        while check(f"127.0.0.1:{port}") != "SERVING":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            reply = stub.Score(reward_pb2.ScoreRequest(trajectories=[_traj()]), timeout=30)
            assert len(reply.results[0].scores) == 2
            # A call in flight when SIGTERM lands still completes within the grace period: a heavy
            # one (long trajectories, seconds on this CPU), signalled once the server reports it in flight.
            heavy = _traj(steps=tuple(f"step {k}: " + "we check the sum of numbers plus the total " * 12
                                      for k in range(8)))
            future = stub.Score.future(reward_pb2.ScoreRequest(trajectories=[heavy] * 8), timeout=120)
            metrics = f"http://127.0.0.1:{metrics_port}/metrics"
            while "ets_reward_inflight_requests 1.0" not in urllib.request.urlopen(metrics, timeout=5).read().decode():
                assert not future.done(), "the heavy call finished before it was seen in flight"
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            assert len(future.result().results) == 8
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
