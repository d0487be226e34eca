"""Kubernetes manifests for replicas and graceful drain (issue 26), on every overlay as rendered by
``kubectl kustomize`` (schema validation of the same documents: tests/deployment/test_k8s.py):

- the search service reaches the reward replicas through gRPC's client-side balancing: its
  ``ETS_REWARD_ADDR`` is a ``dns:///`` target naming a headless Service over the reward pods;
- readiness off first: policy and reward pods sleep in preStop (still serving while they leave the
  Service), and their grace period covers preStop, the drain and the longest call;
- rollouts keep serving capacity where there is more than one replica (the scale-out overlay):
  surge, never take a replica away first, and a disruption budget per engine kind.
"""
from __future__ import annotations

from typing import Any

import pytest

from deploy_helpers import OVERLAYS, ROOT, by_kind, env_of, kustomize

# The search service's reward call timeout (ets.reward.client.RewardClient's timeout_s): the longest reward call.
LONGEST_REWARD_CALL_S = 60.0


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return kustomize(ROOT / "k8s/overlays" / request.param)


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    return next(d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ets-config"))


def test_search_balances_over_a_headless_service_of_the_reward_pods(docs: list[dict[str, Any]]) -> None:
    from ets.reward.client import SERVICE_CONFIG

    target = _config(docs)["ETS_REWARD_ADDR"]
    assert target.startswith("dns:///"), target
    host, port = target.removeprefix("dns:///").rsplit(":", 1)
    service = by_kind(docs, "Service")[host]["spec"]
    assert service["clusterIP"] == "None"  # headless: DNS answers every pod's address
    assert int(port) in [p["port"] for p in service["ports"]]
    reward_pod = by_kind(docs, "Deployment")["reward"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= reward_pod.items()
    assert '"round_robin"' in SERVICE_CONFIG and '"healthCheckConfig"' in SERVICE_CONFIG


def test_engines_drain_readiness_first_within_their_grace(docs: list[dict[str, Any]]) -> None:
    deploys = by_kind(docs, "Deployment")
    for name in ("policy", "reward"):
        pod = deploys[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop >= 5, name
        if name == "reward":
            env = env_of(container)
            drain, grace = float(env["ETS_REWARD_DRAIN_DELAY_S"]), float(env["ETS_REWARD_GRACE_S"])
            assert drain > 0 and grace >= LONGEST_REWARD_CALL_S
            assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + grace + 10
        else:
            # SGLang drains on SIGTERM (polling every 5 s); a 256-token step at 10 tokens/s is 26 s.
            assert pod["terminationGracePeriodSeconds"] >= pre_stop + 30 + 5 + 10


def test_scale_out_rollouts_keep_capacity() -> None:
    docs = kustomize(ROOT / "k8s/overlays/scale-out")
    deploys = by_kind(docs, "Deployment")
    budgets = by_kind(docs, "PodDisruptionBudget")
    claims = by_kind(docs, "PersistentVolumeClaim")
    for name in ("policy", "reward"):
        spec = deploys[name]["spec"]
        assert spec["replicas"] >= 2, name
        assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
        budget = budgets[name]["spec"]
        assert budget["maxUnavailable"] == 1 < spec["replicas"]
        assert budget["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        # Replicas (and a surge pod) on several nodes share the model volume.
        assert claims[f"ets-models-{name}"]["spec"]["accessModes"] == ["ReadWriteMany"]
