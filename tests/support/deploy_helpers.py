"""Helpers the deployment tests share: the Grafana dashboard's metric names, the series a /metrics
page exports, podman with the environment scripts/containers.sh sets up, and the Kubernetes
overlays rendered by ``kubectl kustomize``."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tools import tool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/ets.json"
# Metric names in PromQL: ours and SGLang's (labels and functions never carry these prefixes).
METRIC_RE = re.compile(r"\b(ets_[a-z0-9_]+|sglang:[a-z0-9_]+)")
CONTAINERS = ROOT / "scripts/containers.sh"
OVERLAYS = ["gpu", "gpu-operators", "cpu", "scale-out", "gpu-tls"]


def dashboard_metric_names() -> dict[str, set[str]]:
    """Panel title -> metric names its queries use."""
    dash = json.loads(DASHBOARD.read_text())
    out: dict[str, set[str]] = {}
    for panel in dash["panels"]:
        names = set()
        for target in panel["targets"]:
            names |= set(METRIC_RE.findall(target["expr"]))
        out[panel["title"]] = names
    return out


def exported_names(metrics_text: str) -> set[str]:
    """Series names a /metrics page exports: sample names, plus the declared family names (a
    labelled counter that never fired yet has HELP/TYPE but no sample)."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            names.add(name)
            if kind.strip() == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            if kind.strip() == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def podman_env() -> dict[str, str]:
    out = subprocess.run([str(CONTAINERS), "env"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ)
    for assignment in out.replace("export ", "").split():
        key, _, value = assignment.partition("=")
        env[key] = value
    return env


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env())
    if check:
        assert res.returncode == 0, f"podman {' '.join(args)}: {res.stderr[-2000:]}"
    return res


def kustomize(path: Path) -> list[dict[str, Any]]:
    res = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
