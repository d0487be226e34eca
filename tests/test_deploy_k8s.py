"""Kubernetes manifests: every overlay built with `kubectl kustomize`, validated with
`kubernetes-validate --strict` (core/apps/... schemas) and, for the ServiceMonitor/PodMonitor,
against the prometheus-operator CRD schema as shipped on PyPI by
`cloudcoil-models-prometheus-operator` (models generated from the operator's v0.80 CRDs; pinned
in requirements/dev.txt), closed so that unknown fields are rejected as
`kubectl apply --validate=strict` would. Plus the deployment rules of issue #5:
GPUs, probes, security contexts, resources, network policies, the router's real CLI.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
from tools import tool
import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ["gpu", "cpu", "scale-out"]




def kustomize(path: Path) -> list[dict[str, Any]]:
    res = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(ROOT / "k8s/overlays" / request.param)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def validate_strict(docs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(path)],
                          capture_output=True, text=True, timeout=300)


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """Close every object schema that lists its properties (strict validation)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

    schema = _closed(getattr(monitoring_v1, kind).model_json_schema(by_alias=True, mode="validation"))
    # metadata is validated by the API server's ObjectMeta, not by the CRD.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(doc["kind"]).iter_errors(doc)]


def containers(deploy: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deploy["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


# --- schema validation -------------------------------------------------------------------------

def test_overlay_validates_strict(overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    name, docs = overlay
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    res = validate_strict(core, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_monitors_validate_against_prometheus_operator_crds(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    monitors = [d for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
    assert {d["kind"] for d in monitors} == {"ServiceMonitor", "PodMonitor"}
    for doc in monitors:
        assert crd_errors(doc) == [], doc["metadata"]["name"]


def test_validators_reject_bad_manifests(tmp_path: Path) -> None:
    docs = kustomize(ROOT / "k8s/overlays/gpu")
    deploy = copy.deepcopy(by_kind(docs, "Deployment")["search"])
    deploy["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["prot"] = 1
    assert validate_strict([deploy], tmp_path).returncode != 0
    monitor = copy.deepcopy(next(d for d in docs if d["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert crd_errors(monitor)
    monitor["spec"]["endpoints"][0] = {"port": "metrics", "scheme": "gopher"}
    assert crd_errors(monitor)


# --- deployment rules --------------------------------------------------------------------------

def test_every_container_is_non_root_with_resources(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    for deploy in by_kind(docs, "Deployment").values():
        pod = deploy["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in containers(deploy):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]


def test_gpu_engines_and_probes() -> None:
    docs = kustomize(ROOT / "k8s/overlays/gpu")
    deploys = by_kind(docs, "Deployment")
    for name in ("policy", "reward"):
        pod = deploys[name]["spec"]["template"]["spec"]
        assert pod["runtimeClassName"] == "nvidia"
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        c = pod["containers"][0]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 == c["resources"]["limits"]["nvidia.com/gpu"]
        startup = c["startupProbe"]
        # Model download + load: at least 10 minutes before the first successful probe.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
        assert c["readinessProbe"] and c["livenessProbe"]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "ets-models"}} in pod["volumes"]
    policy = deploys["policy"]["spec"]["template"]["spec"]["containers"][0]
    assert policy["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "grpc" in deploys["reward"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    search = deploys["search"]["spec"]["template"]["spec"]["containers"][0]
    assert "grpc" in search["startupProbe"]
    # Readiness through the OpenAI-compatible port's /health (same upstream readiness as gRPC health).
    assert search["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
    assert {"name": "openai", "containerPort": 8000} in search["ports"]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "search")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["openai"] == 8000
    assert "nvidia.com/gpu" not in str(search["resources"])
    assert by_kind(docs, "HorizontalPodAutoscaler")["search"]["spec"]["scaleTargetRef"]["name"] == "search"
    assert by_kind(docs, "PodDisruptionBudget")["search"]["spec"]["minAvailable"] == 1
    assert "ets-models" in by_kind(docs, "PersistentVolumeClaim")
    # Images resolved by the overlay, never :latest.
    for deploy in deploys.values():
        for c in containers(deploy):
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]


def test_cpu_overlay_has_no_gpu_and_builds_tiny_models() -> None:
    docs = kustomize(ROOT / "k8s/overlays/cpu")
    assert "nvidia" not in yaml.safe_dump_all(docs)
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["ETS_DEVICE"] == "cpu"
    deploys = by_kind(docs, "Deployment")
    for name, model in (("policy", "/models/tiny-policy"), ("reward", "/models/tiny-prm")):
        init = deploys[name]["spec"]["template"]["spec"]["initContainers"][0]
        assert "tiny-model" in " ".join(init.get("command", []) + init["args"]) and model in " ".join(init["args"])


def test_configmap_search_defaults_are_a_valid_search_config(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    from ets.config import SearchConfig

    name, docs = overlay
    data = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ets-config"))["data"]
    SearchConfig.from_env(environ=data).validate()
    # The hashed ConfigMap name is the one every Deployment reads.
    for deploy in by_kind(docs, "Deployment").values():
        for c in containers(deploy):
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}


def test_network_policies_only_search_reaches_model_servers(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    policies = by_kind(docs, "NetworkPolicy")
    # Scale-out: the router, and the search pods for /tokenize (the router has none).
    front = ["policy-router", "search"] if name == "scale-out" else ["search"]
    for target, clients in (("policy", front), ("reward", ["search"])):
        rules = policies[target]["spec"]["ingress"]
        from_pods = [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                     for r in rules for p in r.get("from", []) if "podSelector" in p]
        assert from_pods == clients
        assert all(r.get("from") for r in rules), "no rule open to every source"


def test_scale_out_router_uses_real_sglang_router_flags() -> None:
    from sglang_router.router_args import RouterArgs

    docs = kustomize(ROOT / "k8s/overlays/scale-out")
    deploys = by_kind(docs, "Deployment")
    assert deploys["policy"]["spec"]["replicas"] > 1
    router = deploys["policy-router"]["spec"]["template"]["spec"]["containers"][0]
    assert router["command"] == ["python", "-m", "sglang_router.launch_router"]
    parser = argparse.ArgumentParser()
    RouterArgs.add_cli_args(parser)
    args = [a.replace("$(POD_NAMESPACE)", "ets") for a in router["args"]]
    parsed = RouterArgs.from_cli_args(parser.parse_args(args))
    assert parsed.policy == "cache_aware" and parsed.service_discovery
    # A width-256 depth (256 single-sample requests) stays on its replica.
    assert parsed.balance_abs_threshold >= 256
    policy_labels = deploys["policy"]["spec"]["template"]["metadata"]["labels"]
    assert parsed.selector.items() <= policy_labels.items()
    assert parsed.service_discovery_port == 30000
    # The `policy` Service (the search service's ETS_POLICY_URL) now fronts the router.
    svc = by_kind(docs, "Service")["policy"]["spec"]["selector"]
    assert svc.items() <= deploys["policy-router"]["spec"]["template"]["metadata"]["labels"].items()
    role = by_kind(docs, "Role")["policy-router"]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"])
    # The search service's policy client runs in routed mode (tests/test_deploy_router.py):
    # ETS_POLICY_ENGINE_URL names a Service of the engines themselves, for tokenization.
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ets-config"))
    engine_url = config["data"]["ETS_POLICY_ENGINE_URL"]
    engine_svc = by_kind(docs, "Service")[engine_url.split("//")[1].split(":")[0]]["spec"]
    assert engine_svc["selector"].items() <= policy_labels.items()
    assert [p["port"] for p in engine_svc["ports"]] == [int(engine_url.rsplit(":", 1)[1])]
