"""The reward server's two PRM backends agree, through gRPC, over real SGLang CPU servers.

For every PRM type SGLang can serve (math-shepherd and rlhflow via ``token_ids_logprob``, llemma
via ``return_hidden_states`` and the LM head's mean row) the same trajectories are scored by a
reward server attached to a real SGLang PRM server and by one on the in-process transformers
backend: two independent paths over the same tiny PRM, per step within 1e-2. qwen-prm is not
served by SGLang 0.5.23; its transformers path is checked against a direct forward pass in
test_reward_adapters.py. Also: an attached SGLang PRM that dies gives UNAVAILABLE while the
reward server stays up (recovery after a crash: test_reward_supervisor.py).
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

from ets.api.v1 import reward_pb2, reward_pb2_grpc
from ets.engine.process import ServerProcess, free_port
from ets.healthcheck import check
from ets.retry import RetryPolicy
from ets.reward.backends.sglang_backend import HIDDEN_STATES_FLAG
from ets.reward.client import RewardClient
from ets.search.interfaces import ScoredTrajectory
from reward_fixtures import ThreadedRewardServer, reward_config

pytestmark = pytest.mark.sglang

SGLANG_KINDS = ("math-shepherd", "rlhflow", "llemma")

CASES = [
    ScoredTrajectory("What is 3 + 5?", ["Step 1: we add the numbers", "Step 2: so 3 + 5 = 8", "The answer is 8"]),
    ScoredTrajectory("What is 3 + 5?", ["Step 1: we add the numbers", "Step 2: so 3 + 5 = 9"]),
    ScoredTrajectory("Compute the sum of 17 and 25.", ["17 + 25 = 42", "The answer is 42"]),
    ScoredTrajectory("Let x = 4. What is 2x?", ["2x = 8"]),
    ScoredTrajectory("A long question about the total of each value we get when we check the numbers?",
                     ["first we verify each value", "then the sum of numbers plus the total",
                      "so the final result is 12", "check because the answer is 12"]),
]


@pytest.fixture(scope="module")
def prm_servers(sglang_servers: object,
                tiny_model_factory: Callable[[str], Path]) -> Iterator[Callable[[str], ServerProcess]]:
    """``get(kind)``: a real SGLang CPU server for the tiny PRM of ``kind`` (llemma's with hidden
    states enabled); stopped at module end so later modules stay under the server cap."""
    started: list[ServerProcess] = []

    def get(kind: str) -> ServerProcess:
        extra = (HIDDEN_STATES_FLAG,) if kind == "llemma" else ()
        proc = sglang_servers.get(tiny_model_factory(kind), extra_args=extra)  # type: ignore[attr-defined]
        started.append(proc)
        return proc

    try:
        yield get
    finally:
        for proc in started:
            sglang_servers.stop(proc)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", SGLANG_KINDS)
async def test_sglang_and_transformers_backends_agree(
    kind: str, prm_servers: Callable[[str], ServerProcess], reward_servers: Callable[..., ThreadedRewardServer],
    tiny_model_factory: Callable[[str], Path],
) -> None:
    model = tiny_model_factory(kind)
    prm = prm_servers(kind)
    via_sglang = reward_servers(reward_config(model, kind, "sglang", prm_url=prm.url))
    via_transformers = reward_servers(reward_config(model, kind, "transformers"))
    async with RewardClient(via_sglang.address) as a, RewardClient(via_transformers.address) as b:
        assert (await a.info()).prm_backend == "sglang" and (await b.info()).prm_backend == "transformers"
        full_a, full_b = await a.score(CASES, prm_type=kind), await b.score(CASES, prm_type=kind)
        last_a, last_b = await a.score_last_steps(CASES), await b.score_last_steps(CASES)
        # Repeating the call hits SGLang's prefix cache (question and earlier steps) and must not
        # change a score.
        again = await a.score(CASES)
    flat: list[float] = []
    for case, sa, sb, la, lb, ag in zip(CASES, full_a, full_b, last_a, last_b, again, strict=True):
        assert len(sa) == len(sb) == len(case.steps)
        assert sa == pytest.approx(sb, abs=1e-2), (kind, case.question)
        assert all(0.0 <= x <= 1.0 for x in sa + sb)
        assert la == pytest.approx(sa[-1], abs=1e-3) and lb == pytest.approx(sb[-1], abs=1e-3)
        assert la == pytest.approx(lb, abs=1e-2)
        assert ag == pytest.approx(sa, abs=1e-3)
        flat += sa
    # Steps 1 of the first two cases are the same text after the same question: same score.
    assert full_a[0][0] == pytest.approx(full_a[1][0], abs=1e-3)
    # The tiny PRMs are shaped so scores spread: agreement is not 0.5 == 0.5.
    assert max(flat) - min(flat) > 0.2, flat


async def test_sglang_backend_reports_prefix_cache_reuse(
    prm_servers: Callable[[str], ServerProcess], reward_servers: Callable[..., ThreadedRewardServer],
    tiny_model_factory: Callable[[str], Path],
) -> None:
    model = tiny_model_factory("math-shepherd")
    server = reward_servers(reward_config(model, "math-shepherd", "sglang", prm_url=prm_servers("math-shepherd").url))
    parent = reward_pb2.Trajectory(question="What is 12 + 30? Think about the numbers.", steps=["12 + 30 = 42"])
    child = reward_pb2.Trajectory(question=parent.question, steps=[*parent.steps, "The answer is 42"])
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        first = await stub.Score(reward_pb2.ScoreRequest(trajectories=[parent], last_step_only=True), timeout=60)
        second = await stub.Score(reward_pb2.ScoreRequest(trajectories=[child], last_step_only=True), timeout=60)
    assert first.prompt_tokens > 0
    # The child's prompt starts with the parent's, which SGLang still holds.
    assert second.cached_tokens >= first.prompt_tokens - 1


async def test_attached_prm_unreachable_is_unavailable_server_stays_up(
    reward_servers: Callable[..., ThreadedRewardServer], tiny_model_factory: Callable[[str], Path],
) -> None:
    """Attached to a URL where no PRM answers (not started yet, or died): NOT_SERVING, Score is
    UNAVAILABLE (not INTERNAL, no hang), Embed and Info still work. Recovery after a PRM crash is
    in test_reward_supervisor.py (the supervisor restarts it)."""
    model = tiny_model_factory("math-shepherd")
    server = reward_servers(reward_config(model, "math-shepherd", "sglang", prm_url=f"http://127.0.0.1:{free_port()}"),
                            wait_backend=False)
    request = reward_pb2.ScoreRequest(trajectories=[reward_pb2.Trajectory(question="q", steps=["s"])])
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        assert await asyncio.to_thread(check, server.address) == "NOT_SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Score(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len((await stub.Embed(reward_pb2.EmbedRequest(texts=["a b"]), timeout=30)).embeddings) == 1
        assert (await stub.Info(reward_pb2.InfoRequest(), timeout=10)).prm_backend == "sglang"
    async with RewardClient(server.address, retry=RetryPolicy(max_retries=1, initial_backoff_s=0.05)) as client:
        from ets.reward.client import RewardUnavailable

        with pytest.raises(RewardUnavailable):
            await client.score_last_steps([ScoredTrajectory("q", ["s"])])
