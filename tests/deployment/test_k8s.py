"""Kubernetes manifests: every overlay built with `kubectl kustomize`, validated with
`kubernetes-validate --strict` (core/apps/... schemas) and, for the ServiceMonitor/PodMonitor,
against the prometheus-operator CRD schema as shipped on PyPI by
`cloudcoil-models-prometheus-operator` (models generated from the operator's v0.80 CRDs; pinned
in requirements/dev.txt), closed so that unknown fields are rejected as
`kubectl apply --validate=strict` would; the search autoscaler's KEDA ScaledObject likewise
against KEDA's CRD schema from `cloudcoil-models-keda` (KEDA 2.16 CRDs). Plus the deployment
rules: GPUs, probes (started / ready / alive), shutdown timing, security
contexts and read-only roots, resources, default-deny network policies, autoscaling on load,
the router's real CLI and its disruption budget.
"""
from __future__ import annotations

import argparse
import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
from tools import tool
import yaml

from deploy_helpers import OVERLAYS, ROOT, by_kind, env_of, kustomize

# Overlays with the operator-dependent components (k8s/components: gpu-operator, monitoring,
# autoscaling); the rest must apply on a plain cluster with the NVIDIA device plugin (issue 24).
WITH_OPERATORS = {"gpu-operators"}
# API groups only an operator's CRDs provide.
OPERATOR_GROUPS = ("monitoring.coreos.com/", "keda.sh/")



@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(ROOT / "k8s/overlays" / request.param)


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


CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    from cloudcoil.models.keda import v1alpha1 as keda_v1alpha1
    from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

    module = keda_v1alpha1 if kind == "ScaledObject" else monitoring_v1
    schema = _closed(getattr(module, kind).model_json_schema(by_alias=True, mode="validation"))
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
    core = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUPS)]
    res = validate_strict(core, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_operator_objects_are_opt_in(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """Issue 24, finding 7: without the components an overlay needs no operator's CRDs and no
    GPU Operator (RuntimeClass `nvidia`, the nvidia.com/gpu.present label); with them it has all."""
    name, docs = overlay
    crds = sorted(d["kind"] for d in docs if d["apiVersion"].startswith(OPERATOR_GROUPS))
    engines = [by_kind(docs, "Deployment")[n]["spec"]["template"]["spec"] for n in ("policy", "reward")]
    if name in WITH_OPERATORS:
        assert crds == ["PodMonitor", "ScaledObject", "ServiceMonitor"], crds
        assert all(p["runtimeClassName"] == "nvidia" and p["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
                   for p in engines)
    else:
        assert crds == [], crds
        assert not any("runtimeClassName" in p or "nodeSelector" in p for p in engines)


def test_monitors_validate_against_prometheus_operator_crds(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    monitors = [d for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
    if name not in WITH_OPERATORS:
        assert not monitors
        return
    assert {d["kind"] for d in monitors} == {"ServiceMonitor", "PodMonitor"}
    for doc in monitors:
        assert crd_errors(doc) == [], doc["metadata"]["name"]


def test_validators_reject_bad_manifests(tmp_path: Path) -> None:
    docs = kustomize(ROOT / "k8s/overlays/gpu-operators")
    deploy = copy.deepcopy(by_kind(docs, "Deployment")["search"])
    deploy["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["tcpSocket"]["prot"] = 1
    assert validate_strict([deploy], tmp_path).returncode != 0
    monitor = copy.deepcopy(next(d for d in docs if d["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert crd_errors(monitor)
    monitor["spec"]["endpoints"][0] = {"port": "metrics", "scheme": "gopher"}
    assert crd_errors(monitor)
    scaled = copy.deepcopy(by_kind(docs, "ScaledObject")["search"])
    assert crd_errors(scaled) == []
    scaled["spec"]["triggers"][0]["metadataa"] = scaled["spec"]["triggers"][0].pop("metadata")
    assert crd_errors(scaled)
    scaled = copy.deepcopy(by_kind(docs, "ScaledObject")["search"])
    scaled["spec"]["minReplicaCount"] = "two"
    assert crd_errors(scaled)


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
        # The NVIDIA device plugin's resource and taint; the GPU Operator's runtime class and
        # node label only with components/gpu-operator (test_operator_objects_are_opt_in).
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        c = pod["containers"][0]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 == c["resources"]["limits"]["nvidia.com/gpu"]
        startup = c["startupProbe"]
        # Model download + load: an hour before the first successful probe (issue 16, finding 7:
        # 15.8 GB of PRM weights next to the policy's; resumed, not restarted, on a slow link).
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
        assert c["readinessProbe"] and c["livenessProbe"]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": f"ets-models-{name}"}} in pod["volumes"]
    policy = deploys["policy"]["spec"]["template"]["spec"]["containers"][0]
    assert policy["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "grpc" in deploys["reward"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    search = deploys["search"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "openai", "containerPort": 8000} in search["ports"]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "search")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["openai"] == 8000
    assert "nvidia.com/gpu" not in str(search["resources"])
    assert by_kind(docs, "PodDisruptionBudget")["search"]["spec"]["minAvailable"] == 1
    # One ReadWriteOnce volume per engine with the cluster's default class (binds on EBS, PD, Azure
    # Disk); RWO attaches to one node at a time, so the engines never run two pods at once.
    claims = by_kind(docs, "PersistentVolumeClaim")
    for name in ("policy", "reward"):
        claim = claims[f"ets-models-{name}"]["spec"]
        assert claim["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in claim
        assert deploys[name]["spec"]["strategy"] == {"type": "Recreate"}
        assert deploys[name]["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001
    # Images resolved by the overlay, never :latest.
    for deploy in deploys.values():
        for c in containers(deploy):
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]


def test_cpu_overlay_has_no_gpu_and_prepares_its_models() -> None:
    from ets.models import PACKAGED_MODELS

    docs = kustomize(ROOT / "k8s/overlays/cpu")
    assert "nvidia" not in yaml.safe_dump_all(docs)
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["ETS_DEVICE"] == "cpu"
    deploys = by_kind(docs, "Deployment")
    # The real policy, prepared by the init container into the folder the engine serves, with the
    # search service using that model's conventions.
    init = deploys["policy"]["spec"]["template"]["spec"]["initContainers"][0]
    args = init["args"]
    assert args[:2] == ["models", "prepare"] and args[args.index("--cache-dir") + 1] == "/models"
    spec = PACKAGED_MODELS[args[2]]
    assert config["ETS_POLICY_MODEL"] == f"/models/{spec.name}"
    assert config["ETS_SEARCH_POLICY_MODEL_TYPE"] == spec.policy_model_type
    init = deploys["reward"]["spec"]["template"]["spec"]["initContainers"][0]
    assert "python -m ets.testing.tiny_models" in " ".join(init.get("command", []) + init["args"])
    assert "/models/tiny-prm" in " ".join(init["args"])


def test_configmap_search_defaults_are_a_valid_search_config(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    from ets.config import search_defaults_from_env

    name, docs = overlay
    data = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ets-config"))["data"]
    search_defaults_from_env(environ=data)
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
        # Pods of this namespace (the Prometheus peers name their namespace).
        from_pods = [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                     for r in rules for p in r.get("from", []) if "podSelector" in p and "namespaceSelector" not in p]
        assert from_pods == clients
        assert all(r.get("from") for r in rules), "no rule open to every source"


# Kinds that have no namespace (kubectl api-resources --namespaced=false, the ones an overlay may hold).
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                            "RuntimeClass", "PriorityClass", "CustomResourceDefinition", "IngressClass"})


# Where the cluster's Prometheus runs (docs/deployment.md): the one other namespace objects name.
PROMETHEUS_NAMESPACE = "monitoring"


def overlay_images(path: Path) -> set[str]:
    """The images an overlay sets (``images:``), its own and those of the overlays it builds on."""
    kustomization = yaml.safe_load((path / "kustomization.yaml").read_text())
    found = {f"{i['newName']}:{i['newTag']}" for i in kustomization.get("images", [])}
    for resource in kustomization.get("resources", []):
        if (path / resource / "kustomization.yaml").is_file() and "overlays" in (path / resource).resolve().parts:
            found |= overlay_images((path / resource).resolve())
    return found


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    spec = doc.get("spec") or {}
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return spec["template"]["spec"]
    if doc["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec if doc["kind"] == "Pod" else None


def test_every_overlay_renders_into_its_namespace_with_its_images(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """Every namespaced object lands in the overlay's namespace (the Namespace it renders), every
    namespace named inside an object (RoleBinding subjects, PromQL label matchers) is that one,
    and every container image is one the overlay sets: nothing falls back to the `default`
    namespace or to a bare image name that no registry serves (issue #16, finding 3)."""
    name, docs = overlay
    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    assert len(namespaces) == 1, (name, namespaces)
    namespace = namespaces[0]
    wrong = [f"{d['kind']}/{d['metadata']['name']}: {d['metadata'].get('namespace')}" for d in docs
             if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") != namespace]
    assert not wrong, f"{name}: objects outside namespace {namespace}: {wrong}"
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        for subject in binding.get("subjects", []):
            if subject["kind"] == "ServiceAccount":
                assert subject.get("namespace") == namespace, (name, binding["metadata"]["name"], subject)
    text = yaml.safe_dump_all(docs)
    named = set(re.findall(r'namespace="([^"]+)"', text)) | set(re.findall(r"\.([a-z0-9-]+)\.svc\b", text))
    # Besides its own, only the cluster's Prometheus (prometheus-operated.monitoring.svc, KEDA's server).
    assert named <= {namespace, PROMETHEUS_NAMESPACE}, (name, named)
    images = overlay_images(ROOT / "k8s/overlays" / name)
    assert images, name
    used = {(d["kind"], d["metadata"]["name"], c["name"]): c["image"] for d in docs if (pod := pod_spec(d))
            for c in pod.get("initContainers", []) + pod["containers"]}
    assert used, name
    foreign = {k: v for k, v in used.items() if v not in images}
    assert not foreign, f"{name}: images the overlay does not set ({sorted(images)}): {foreign}"


def test_scale_out_router_uses_real_sglang_router_flags() -> None:
    from sglang_router.router_args import RouterArgs

    docs = kustomize(ROOT / "k8s/overlays/scale-out")
    deploys = by_kind(docs, "Deployment")
    assert deploys["policy"]["spec"]["replicas"] > 1
    router = deploys["policy-router"]["spec"]["template"]["spec"]["containers"][0]
    assert router["command"] == ["python", "-m", "sglang_router.launch_router"]
    parser = argparse.ArgumentParser()
    RouterArgs.add_cli_args(parser)
    # $(POD_NAMESPACE) is the pod's own namespace (a fieldRef): the one the router is rendered in.
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in router["env"]
    args = [a.replace("$(POD_NAMESPACE)", deploys["policy-router"]["metadata"]["namespace"]) for a in router["args"]]
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
    # The search service's policy client runs in routed mode (tests/deployment/test_router.py):
    # ETS_POLICY_ENGINE_URL names a Service of the engines themselves, for tokenization.
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ets-config"))
    engine_url = config["data"]["ETS_POLICY_ENGINE_URL"]
    engine_svc = by_kind(docs, "Service")[engine_url.split("//")[1].split(":")[0]]["spec"]
    assert engine_svc["selector"].items() <= policy_labels.items()
    assert [p["port"] for p in engine_svc["ports"]] == [int(engine_url.rsplit(":", 1)[1])]
    # The replicas share the policy's model volume: ReadWriteMany, with the RWX class named.
    claim = by_kind(docs, "PersistentVolumeClaim")["ets-models-policy"]["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"] and claim["storageClassName"]


# --- probes, shutdown, read-only roots, network, autoscaling ------------------------

def test_probes_started_ready_alive() -> None:
    """started = the server listens; ready = its upstreams answer; alive = the process answers.
    Neither service's liveness may follow an engine's health (a slow engine start would kill
    the pod), and the search pods must not crash-loop while a policy loads for 20 minutes."""
    deploys = by_kind(kustomize(ROOT / "k8s/overlays/gpu"), "Deployment")
    search = deploys["search"]["spec"]["template"]["spec"]["containers"][0]
    assert search["startupProbe"]["tcpSocket"]["port"] == "grpc"
    # Ready = upstreams up: gRPC health service "", or the HTTP transport's /health (the same
    # readiness) where the OpenAI port is on.
    ready = search["readinessProbe"]
    assert ready.get("grpc") == {"port": 50051} or ready.get("httpGet", {}).get("path") == "/health", ready
    assert search["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    reward_pod = deploys["reward"]["spec"]["template"]["spec"]
    reward = reward_pod["containers"][0]
    assert reward["startupProbe"]["tcpSocket"]["port"] == "grpc"
    assert reward["readinessProbe"]["grpc"] == {"port": 50052}  # SERVING only while the PRM answers
    assert reward["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    # The reward server gives its PRM engine ETS_PRM_START_TIMEOUT_S, then exits (restart):
    # at least the engines' startup window (model download + load), and the server's own
    # startup window (its embedder) is as long.
    policy = deploys["policy"]["spec"]["template"]["spec"]["containers"][0]
    engine_window = policy["startupProbe"]["periodSeconds"] * policy["startupProbe"]["failureThreshold"]
    assert float(env_of(reward)["ETS_PRM_START_TIMEOUT_S"]) >= engine_window >= 600
    startup = reward["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_search_shutdown_outlasts_preStop_and_grace(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    pod = by_kind(docs, "Deployment")["search"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(env_of(c)["ETS_SEARCH_GRACE_S"])
    # preStop, then SIGTERM: in-flight searches get ETS_SEARCH_GRACE_S, then the clients close.
    assert pre_stop >= 5
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 10
    # Longer than the CPU stack's mean width-64 search (bench/results/stack.json).
    import json
    bench = json.loads((ROOT / "bench/results/stack.json").read_text())
    assert grace > max(r["mean_wall_seconds"] for r in bench["summary"])


def test_every_container_has_a_read_only_root(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    for deploy in by_kind(docs, "Deployment").values():
        pod = deploy["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in containers(deploy):
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, (deploy["metadata"]["name"], c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert set(mounts.values()) <= volumes
            if deploy["metadata"]["name"] in {"policy", "reward"}:
                # Where SGLang writes (seen on the CPU engine): HOME caches, /tmp, the model cache.
                assert {"/home/ets", "/tmp", "/models"} <= set(mounts), (c["name"], mounts)
            elif deploy["metadata"]["name"] == "search":
                assert "/tmp" in mounts


def _peers(rule: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return list(rule.get(key, []))


def test_network_default_deny_and_prometheus_by_label(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    for pol in policies.values():
        for rule in pol["spec"].get("ingress", []):
            for peer in _peers(rule, "from"):
                if "namespaceSelector" in peer:
                    # Never a whole namespace: the Prometheus pods in it, by label.
                    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
                    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
            # A rule open to every source exists only for the search API ports (not metrics).
            if not rule.get("from"):
                assert pol["metadata"]["name"] == "search", pol["metadata"]["name"]
                search = by_kind(docs, "Deployment")["search"]["spec"]["template"]["spec"]["containers"][0]
                api_ports = {p["containerPort"] for p in search["ports"] if p["name"] != "metrics"}
                assert {p["port"] for p in rule["ports"]} <= api_ports
    # Every metrics port the monitors scrape is admitted from the Prometheus pods.
    scraped = {("search", 9091), ("reward", 9092), ("reward", 30001), ("policy", 30000)}
    if name == "scale-out":
        scraped.add(("policy-router", 29000))
    for component, port in scraped:
        rules = policies[component]["spec"]["ingress"]
        assert any(port in {p["port"] for p in r["ports"]} and
                   any("namespaceSelector" in peer for peer in r.get("from", [])) for r in rules), (component, port)


def test_network_egress_allows_each_path(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    policies = by_kind(docs, "NetworkPolicy")
    dns = policies["allow-dns"]["spec"]
    assert dns["podSelector"] == {} and {p["port"] for p in dns["egress"][0]["ports"]} == {53}
    search_to = {(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"], p["port"])
                 for r in policies["search"]["spec"]["egress"] for peer in r["to"] for p in r["ports"]}
    wanted = {("policy", 30000), ("reward", 50052)}
    if name == "scale-out":
        wanted.add(("policy-router", 30000))
        router_to = policies["policy-router"]["spec"]["egress"]
        assert any(peer.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/component": "policy"}
                   for r in router_to for peer in r["to"])
    assert search_to == wanted
    # The hub download: public HTTPS only, and not in the offline CPU overlay.
    if name == "cpu":
        assert "allow-model-download" not in policies
    else:
        hub = policies["allow-model-download"]["spec"]
        assert hub["podSelector"]["matchExpressions"][0]["values"] == ["policy", "reward"]
        assert [p["port"] for p in hub["egress"][0]["ports"]] == [443]
        assert "10.0.0.0/8" in hub["egress"][0]["to"][0]["ipBlock"]["except"]


def test_search_autoscales_on_searches_in_flight_and_queued(overlay: tuple[str, list[dict[str, Any]]],
                                                            tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from ets.service.metrics import SearchMetrics

    name, docs = overlay
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in docs}, "KEDA owns the HPA; two would fight"
    if name not in WITH_OPERATORS:
        assert "ScaledObject" not in {d["kind"] for d in docs}
        return
    scaled = by_kind(docs, "ScaledObject")["search"]
    assert crd_errors(scaled) == []
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "search" and "search" in by_kind(docs, "Deployment")
    assert 2 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    trigger = next(t for t in spec["triggers"] if t["type"] == "prometheus")
    query = trigger["metadata"]["query"]
    declared = set(generate_latest(SearchMetrics().registry).decode().split())
    for metric in ("ets_search_searches_in_flight", "ets_search_searches_queued"):
        assert metric in query and metric in declared, metric
    namespace = scaled["metadata"]["namespace"]
    assert query.count(f'namespace="{namespace}"') == 2, query
    # Valid PromQL, parsed by Prometheus's own parser (promtool, as a recording rule).
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": [{"record": "ets:load", "expr": query}]}]}))
    res = subprocess.run([tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # Scale before searches queue: the per-pod target is below the pod's concurrent slots.
    search = by_kind(docs, "Deployment")["search"]["spec"]["template"]["spec"]["containers"][0]
    assert 0 < float(trigger["metadata"]["threshold"]) <= int(env_of(search)["ETS_MAX_CONCURRENT_SEARCHES"])


def test_scale_out_routers_survive_a_drain_and_front_the_engines() -> None:
    """The wiring the overlay's patches must keep consistent: labels, selectors, budget."""
    docs = kustomize(ROOT / "k8s/overlays/scale-out")
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    router, engines = deployments["policy-router"], deployments["policy"]
    router_labels = router["spec"]["template"]["metadata"]["labels"]
    engine_labels = engines["spec"]["template"]["metadata"]["labels"]
    # The budget covers the router pods, and a drain may evict one while another still serves.
    pdb = by_kind(docs, "PodDisruptionBudget")["policy-router"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= router_labels.items()
    assert 1 <= pdb["minAvailable"] < router["spec"]["replicas"]

    def selects(service: str, labels: dict[str, str]) -> bool:
        return bool(services[service]["spec"]["selector"].items() <= labels.items())

    # ETS_POLICY_URL (Service policy) reaches the routers only; tokenization (policy-engine) the engines only.
    assert selects("policy", router_labels) and not selects("policy", engine_labels)
    assert selects("policy-engine", engine_labels) and not selects("policy-engine", router_labels)
    # The router discovers the engine pods, never itself.
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    key, value = args[args.index("--selector") + 1].split("=")
    assert engine_labels.get(key) == value and router_labels.get(key) != value


def test_reflection_is_off_in_kubernetes(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    from ets.settings import parse_bool

    name, docs = overlay
    data = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ets-config"))["data"]
    assert parse_bool(data["ETS_SEARCH_REFLECTION"]) is False
    assert parse_bool(data["ETS_REWARD_REFLECTION"]) is False


def test_tls_component_mounts_real_settings_and_probes_over_tls(tmp_path: Path) -> None:
    """overlays/gpu-tls (components/tls): the settings it sets are the services' own, each names a
    file of a mounted Secret, and the readiness probe (the kubelet's gRPC probe has no TLS) is a
    TLS health check that passes against a real TLS server with make-tls.sh's certificates."""
    import asyncio

    from grpc_health.v1 import health_pb2

    from ets.reward.settings import RewardServerConfig
    from ets.service.settings import ServiceSettings
    from ets.settings import settings_of
    from tools import free_port

    known = {n for cls in (ServiceSettings, RewardServerConfig) for st in settings_of(cls) for n in st.env_names("")}
    deploys = by_kind(kustomize(ROOT / "k8s/overlays/gpu-tls"), "Deployment")
    tls = tmp_path / "tls"
    assert subprocess.run(["bash", str(ROOT / "scripts/make-tls.sh"), str(tls)], capture_output=True,
                          timeout=60).returncode == 0
    for name, port in (("search", 50051), ("reward", 50052)):
        pod = deploys[name]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"] if m["name"] in secrets}
        assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] in secrets)
        files = {name for name in env_of(c) if name.endswith("_FILE")}
        assert files and files <= known, files - known
        assert {"ETS_SEARCH_TLS_CERT_FILE" if name == "search" else "ETS_REWARD_TLS_CERT_FILE"} <= files
        for var in files:
            directory, _, key = env_of(c)[var].rpartition("/")
            secret = secrets[mounts[directory]]
            assert key in {i["key"] for i in secret.get("items", [{"key": key}])}, (var, secret)
        assert pod["securityContext"]["fsGroup"] == 10001 and all(
            s["defaultMode"] == 0o440 for s in secrets.values())
        probe = c["readinessProbe"]
        assert set(probe) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"exec"}
        assert c["startupProbe"]["tcpSocket"] and c["livenessProbe"]["tcpSocket"]  # unchanged by TLS
        local = free_port()
        argv = [a.replace("/etc/ets/tls/ca.crt", str(tls / "ca.pem")).replace(f"localhost:{port}", f"localhost:{local}")
                for a in probe["exec"]["command"]]

        assert argv[0] == "python"
        argv[0] = sys.executable
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        for status, code in ((serving, 0), (not_serving, 1)):
            assert asyncio.run(tls_health_exit(argv, tls, name, local, status)) == code, (name, status)


async def tls_health_exit(argv: list[str], tls: Path, key: str, port: int, status: int) -> int:
    """Exit code of the probe command ``argv`` against a TLS gRPC health server on ``port``
    (certificate ``{key}.pem`` from ``tls``) whose health service "" reports ``status``."""
    import asyncio

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials(
        [((tls / f"{key}-key.pem").read_bytes(), (tls / f"{key}.pem").read_bytes())]))
    await server.start()
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 60)
    finally:
        await server.stop(0)
