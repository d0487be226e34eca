"""How the live upstreams classify failures: by the clients' exception classes, into a bounded
metric reason and UNAVAILABLE / INVALID_ARGUMENT naming the upstream; each call timed once."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from ets.search.config import ConfigError
from ets.policy.client import PolicyRequestError, PolicyServerError, PolicyUnavailable
from ets.reward.client import RewardError, RewardUnavailable
from ets.service.metrics import SearchMetrics
from ets.service.status import UpstreamRejected, UpstreamUnavailable
from ets.service.upstreams import LiveUpstreams, policy_failure, reason, reward_failure
from tools import free_port


@pytest.mark.parametrize(("err", "label"), [
    (PolicyRequestError("context length", 400), "rejected"),
    (PolicyServerError("boom", 500), "server_error"),
    (PolicyUnavailable("refused"), "unavailable"),
    (RewardUnavailable(grpc.StatusCode.UNAVAILABLE, "down"), "unavailable"),
    (RewardError(grpc.StatusCode.INVALID_ARGUMENT, "prm_type"), "invalid_argument"),
    (TimeoutError(), "timeout"),
    (ConnectionRefusedError(), "unavailable"),
    (ValueError("not json"), "bad_response"),
    (KeyError("x"), "error"),
])
def test_reason_labels_by_class(err: BaseException, label: str) -> None:
    assert reason(err) == label


def test_failures_name_the_upstream() -> None:
    rejected = policy_failure("http://p:1", PolicyRequestError("prompt too long", 400))
    assert isinstance(rejected, UpstreamRejected) and str(rejected).startswith("policy server rejected the request")
    down = policy_failure("http://p:1", PolicyUnavailable("refused"))
    assert isinstance(down, UpstreamUnavailable) and str(down).startswith("policy server unavailable at http://p:1")
    wrong_prm = reward_failure("r:2", RewardError(grpc.StatusCode.INVALID_ARGUMENT, "prm_type: serving x"))
    assert isinstance(wrong_prm, UpstreamRejected) and "prm_type: serving x" in str(wrong_prm)
    gone = reward_failure("r:2", RewardUnavailable(grpc.StatusCode.UNAVAILABLE, "after 5 attempts"))
    assert isinstance(gone, UpstreamUnavailable) and str(gone).startswith("reward server unavailable at r:2")


async def test_each_call_is_timed_and_counted_once() -> None:
    metrics = SearchMetrics(process_metrics=False)
    up = LiveUpstreams("http://127.0.0.1:1", "127.0.0.1:1", metrics=metrics)

    async def refused() -> None:
        raise PolicyUnavailable("connection refused")

    with pytest.raises(UpstreamUnavailable):
        with up.policy_call("generate"):
            await refused()

    async def bad_config() -> None:
        raise ConfigError("policy_model_type", "needs a chat template")

    with pytest.raises(ConfigError):  # the request's own fault: passed through, not an upstream error
        with up.policy_call("tokenize"):
            await bad_config()
    r = metrics.registry
    assert r.get_sample_value("ets_search_policy_call_errors_total", {"reason": "unavailable"}) == 1
    assert r.get_sample_value("ets_search_policy_call_duration_seconds_count", {"call": "generate"}) == 1
    assert r.get_sample_value("ets_search_policy_call_duration_seconds_count", {"call": "tokenize"}) == 1
    assert sum(s.value for m in r.collect() if m.name == "ets_search_policy_call_errors"
               for s in m.samples if s.name.endswith("_total")) == 1


async def test_probe_reports_why_each_upstream_is_down() -> None:
    up = LiveUpstreams(f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                       metrics=SearchMetrics(process_metrics=False))
    try:
        errors = await asyncio.wait_for(up.probe(), 30)
    finally:
        await up.close()
    assert errors["policy"] and errors["reward"] and errors["reward"].startswith("UNAVAILABLE")
