"""Helpers the deployment tests share: the Grafana dashboard's metric names, the series a /metrics
page exports, and podman with the environment scripts/containers.sh sets up."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/ets.json"
# Metric names in PromQL: ours and SGLang's (labels and functions never carry these prefixes).
METRIC_RE = re.compile(r"\b(ets_[a-z0-9_]+|sglang:[a-z0-9_]+)")
CONTAINERS = ROOT / "scripts/containers.sh"


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
