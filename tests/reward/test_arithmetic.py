"""The ``arithmetic`` PRM type: equations found and checked in hand-written steps, the score
mapping, the configuration rules of the model-free ``rules`` backend, the type served by a
real reward server over gRPC (with the embedder still served for coverage), and a search request
naming it through the real search service (tiny policy on SGLang CPU).
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import pytest

from ets.api.v1 import reward_pb2, reward_pb2_grpc, search_pb2, search_pb2_grpc
from ets.healthcheck import check
from ets.reward.client import RewardClient
from ets.reward.rules import SCORE_NONE, SCORE_RIGHT, SCORE_WRONG, find_equations, score_steps
from ets.errors import SettingError
from ets.reward.settings import RewardServerConfig
from ets.search.interfaces import ScoredTrajectory
from ets.testing.stack import wait_grpc_serving
from reward_fixtures import ThreadedRewardServer, reward_config
from service_fixtures import ServeProcess

# (step text, verdict of each equation found in it, in order).
EQUATIONS: list[tuple[str, list[bool]]] = [
    ("3 + 5 = 8", [True]),
    ("3 + 5 = 9", [False]),
    ("So she has 12 - 4 = 8 apples left.", [True]),
    ("He pays 7 * 6 = 43 dollars.", [False]),
    # GSM8K's own style: the annotation and the visible equation are both checked.
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.", [True, True]),
    ("She makes 9 * 2 = $<<9*2=19>>19 every day.", [False, False]),
    # Chains: every adjacent pair of sides must agree.
    ("2 * 3 = 6 + 4 = 10", [False]),
    ("(2 + 3) * 4 = 20 = 5 * 4", [True]),
    # Money, thousands separators, x / × / ÷ / LaTeX operators, percent, decimals, powers.
    ("$1,200 + $300 = $1,500", [True]),
    ("80,000 * 1.5 = 120,000", [True]),
    ("3 x 4 = 12 and 3x4 = 13", [True, False]),
    ("6 × 7 = 42, then 42 ÷ 6 = 8", [True, False]),
    (r"$\frac{3}{4} \times 8 = 6$ and $10 \div 4 = 2.5$", [True, True]),
    ("80 * 50% = 40", [True]),
    ("2^3 = 8 and 2 ** 4 = 15", [True, False]),
    ("1.5 * 4 = 6.0", [True]),
    # A result rounded to the digits it shows is right; beyond half a unit of them it is not.
    ("10 / 3 = 3.33", [True]),
    ("100 / 3 = 30", [False]),
    ("7 / 2 = 3", [False]),
    ("3 - 5 = -2", [True]),
    ("-3 + 5 = 2", [True]),
    # Markdown: bullets and bold markers are not operators; line breaks end an equation.
    ("**Step 1:** 3 * 4 = 12", [True]),
    ("- 3 + 4 = 7\n- 2 * 5 = 11", [True, False]),
    # Nothing checkable: words cut the operand off, no operator, algebra, division by zero.
    ("5 apples - 3 = 2", []),
    ("50% of 80 = 40", []),
    ("8 = 8", []),
    ("2x = 8", []),
    ("1 / 0 = 5", []),
    ("The answer is 8.", []),
    ("Total = 4 * 3 = 12 apples.", [True]),
]


@pytest.mark.parametrize(("text", "verdicts"), EQUATIONS)
def test_equations_found_and_checked(text: str, verdicts: list[bool]) -> None:
    assert [eq.correct for eq in find_equations(text)] == verdicts, find_equations(text)


def test_step_scores_judge_the_solution_so_far() -> None:
    assert (SCORE_WRONG, SCORE_NONE, SCORE_RIGHT) == (0.1, 0.5, 0.9)
    assert score_steps(["Tom has 3 apples.", "He buys 5 more: 3 + 5 = 8.", "The answer is 8."]) == [0.5, 0.9, 0.9]
    # A wrong equation makes that step and every later one low, whatever follows.
    assert score_steps(["3 + 5 = 9", "9 * 2 = 18", "The answer is 18."]) == [0.1, 0.1, 0.1]
    assert score_steps(["3 + 5 = 8", "8 * 2 = 17", "The answer is 17."]) == [0.9, 0.1, 0.1]
    assert score_steps(["We add them.", ""]) == [0.5, 0.5]
    assert score_steps([]) == []


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prm_type": "arithmetic", "prm_backend": "sglang"}, "ETS_PRM_BACKEND"),
        ({"prm_type": "arithmetic", "prm_backend": "transformers"}, "ETS_PRM_BACKEND"),
        ({"prm_type": "math-shepherd", "prm_backend": "rules", "prm_model": "/models/prm"}, "ETS_PRM_TYPE"),
        ({"prm_type": "arithmetic", "prm_backend": "rules", "prm_model": "/models/prm"}, "ETS_PRM_MODEL"),
        ({"prm_type": "judge", "prm_backend": "transformers"}, "ETS_PRM_MODEL"),
    ],
)
def test_rules_backend_configuration_names_the_setting(overrides: dict[str, str], field: str) -> None:
    with pytest.raises(SettingError) as err:
        RewardServerConfig(device="cpu", **overrides).validate()  # type: ignore[arg-type]
    assert err.value.field == field


@pytest.fixture(scope="module")
def arithmetic_server(reward_servers: Callable[..., ThreadedRewardServer]) -> ThreadedRewardServer:
    return reward_servers(reward_config("", "arithmetic", "rules"))  # type: ignore[arg-type]


async def test_served_by_the_reward_server(arithmetic_server: ThreadedRewardServer) -> None:
    right = ScoredTrajectory("Tom has 3 apples and buys 5 more. How many?",
                             ["He buys 5 more: 3 + 5 = 8.", "So 8 * 1 = 8 apples.", "The answer is 8."])
    wrong = ScoredTrajectory(right.question, ["He buys 5 more: 3 + 5 = 9.", "The answer is 9."])
    unchecked = ScoredTrajectory(right.question, ["He buys some more apples."])
    async with RewardClient(arithmetic_server.address) as client:
        info = await client.info()
        full = await client.score([right, wrong, unchecked], prm_type="arithmetic")
        last = await client.score_last_steps([right, wrong, unchecked])
        vectors = await client.embed(["3 + 5 = 8", "We add five apples to three."])
    assert (info.prm_type, info.prm_backend, info.prm_model) == ("arithmetic", "rules", "")
    assert info.embedding_dim == vectors.shape[1] == 384
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)
    assert full == [pytest.approx([0.9, 0.9, 0.9]), pytest.approx([0.1, 0.1]), pytest.approx([0.5])]
    assert last == pytest.approx([0.9, 0.1, 0.5])
    assert await asyncio.to_thread(check, arithmetic_server.address) == "SERVING"


async def test_other_prm_type_requested_is_invalid_argument(arithmetic_server: ThreadedRewardServer) -> None:
    request = reward_pb2.ScoreRequest(trajectories=[reward_pb2.Trajectory(question="q", steps=["1 + 1 = 2"])],
                                      prm_type="judge")
    async with grpc.aio.insecure_channel(arithmetic_server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Score(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("prm_type:")


@pytest.mark.sglang
def test_search_service_scores_with_arithmetic_end_to_end(
    arithmetic_server: ThreadedRewardServer, serve_factory: Callable[..., ServeProcess], sglang_servers: Any,
    tiny_policy_model: Path,
) -> None:
    """A search request naming prm_type=arithmetic passes the search service's validation and is
    scored by the rules backend; one naming judge reaches this server and is refused by it."""
    policy = sglang_servers.get(tiny_policy_model)
    serve = serve_factory(policy_url=policy.url, reward_addr=arithmetic_server.address, name="search-arith")
    wait_grpc_serving(serve.proc, serve.addr, timeout=120)
    config = search_pb2.SearchConfig(method="ets", width=4, max_step_tokens=12, max_tokens=96, max_depth=3, seed=3,
                                     prm_type="arithmetic")
    with grpc.insecure_channel(serve.addr) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        response = stub.Search(search_pb2.SearchRequest(problem="What is 3 + 5?", config=config), timeout=300)
        config.prm_type = "judge"
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(search_pb2.SearchRequest(problem="What is 3 + 5?", config=config), timeout=300)
    assert response.config.prm_type == "arithmetic" and response.candidates
    scores = [s for c in response.candidates for s in c.step_scores]
    assert scores and all(any(s == pytest.approx(v) for v in (SCORE_WRONG, SCORE_NONE, SCORE_RIGHT)) for s in scores)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prm_type" in (err.value.details() or "")
