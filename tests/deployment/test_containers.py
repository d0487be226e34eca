"""The CPU variants of the three images, built with podman on a debootstrapped Debian bookworm
base (scripts/containers.sh), the compose CPU profile brought up with podman-compose, one real
``Search`` answered through it (and the same search through the OpenAI-compatible port), the
stack scraped by a real Prometheus (the host's, with the compose scrape config pointed at the
published ports), the Grafana dashboard's queries checked against those scrapes, and every
container stopped with SIGTERM and torn down.

Slow the first time on a machine (base rootfs and dependency layers, ~10 min); later runs
reuse ETS_CONTAINERS_CACHE (default /var/tmp/ets-containers). Needs root (rootful podman).
Set ETS_DASHBOARD_PNG=path to also render the dashboard from the live Prometheus.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import yaml

from deploy_helpers import CONTAINERS, dashboard_metric_names, exported_names, podman
from tools import free_port, http_get, tool

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TAG = "cpu"
IMAGES = {name: f"localhost/ets-{name}:{TAG}" for name in ("policy", "reward", "search")}
HEALTH_TIMEOUT_S = float(os.environ.get("ETS_TEST_COMPOSE_HEALTH_TIMEOUT_S", "1200"))

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3000)]


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    assert os.geteuid() == 0, "the container test needs root (rootful podman, debootstrap)"
    for name in ("podman", "debootstrap", "runc"):
        tool(name)
    res = subprocess.run([str(CONTAINERS), "build"], capture_output=True, text=True, timeout=2400,
                         env=dict(os.environ, ETS_IMAGE_TAG=TAG))
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    print(res.stdout)
    return IMAGES


class Stack:
    """A compose project of the CPU profile with every host port chosen free."""

    def __init__(self, tmp: Path) -> None:
        self.project = f"etsci{os.getpid()}"
        self.ports = {k: free_port() for k in ("search", "search_openai", "search_metrics", "reward",
                                               "reward_metrics", "prm", "policy")}
        self.env = dict(
            os.environ, ETS_IMAGE_TAG=TAG, ETS_GRAFANA_PASSWORD_FILE="/dev/null",
            ETS_SEARCH_HOST_PORT=str(self.ports["search"]),
            ETS_SEARCH_OPENAI_HOST_PORT=str(self.ports["search_openai"]),
            ETS_SEARCH_METRICS_HOST_PORT=str(self.ports["search_metrics"]),
            ETS_REWARD_HOST_PORT=str(self.ports["reward"]),
            ETS_REWARD_METRICS_HOST_PORT=str(self.ports["reward_metrics"]),
            ETS_PRM_HOST_PORT=str(self.ports["prm"]), ETS_POLICY_HOST_PORT=str(self.ports["policy"]),
        )
        self.tmp = tmp
        self.prometheus: subprocess.Popen[bytes] | None = None
        self.prometheus_url = ""
        self.exit_codes: dict[str, int] = {}

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CONTAINERS), "compose", "-p", self.project, *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        res = podman("ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}",
                     "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}")
        names = res.stdout.split()
        assert len(names) == 1, f"{service}: {names}"
        return names[0]

    def logs(self, service: str, tail: int = 40) -> str:
        try:
            # The services log to stderr, which `podman logs` replays on its own stderr.
            res = podman("logs", "--tail", str(tail), self.container(service), check=False)
            return (res.stdout + res.stderr)[-4000:]
        except AssertionError as err:
            return str(err)

    def wait_healthy(self, services: tuple[str, ...]) -> None:
        """Run each container's HEALTHCHECK until it passes (podman runs none on a timer here)."""
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        pending = list(services)
        while pending and time.monotonic() < deadline:
            for service in list(pending):
                name = self.container(service)
                state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
                assert state in {"running", "created", "starting"}, f"{service} is {state}:\n{self.logs(service)}"
                if podman("healthcheck", "run", name, check=False, timeout=60).returncode == 0:
                    pending.remove(service)
            time.sleep(3)
        assert not pending, "not healthy in time: " + "; ".join(f"{s}:\n{self.logs(s)}" for s in pending)

    def start_prometheus(self) -> None:
        """The host's Prometheus with deploy/prometheus/prometheus.yml, targets -> published ports."""
        cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
        published = {"search:9091": self.ports["search_metrics"], "reward:9092": self.ports["reward_metrics"],
                     "policy:30000": self.ports["policy"], "reward:30001": self.ports["prm"]}
        cfg["global"]["scrape_interval"] = "2s"
        cfg["global"]["scrape_timeout"] = "2s"
        for job in cfg["scrape_configs"]:
            for sc in job["static_configs"]:
                sc["targets"] = [f"127.0.0.1:{published[t]}" for t in sc["targets"]]
        path = self.tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        port = free_port()
        self.prometheus_url = f"http://127.0.0.1:{port}"
        log = open(self.tmp / "prometheus.log", "wb")
        self.prometheus = subprocess.Popen(
            [tool("prometheus"), f"--config.file={path}",
             f"--storage.tsdb.path={self.tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                http_get(f"{self.prometheus_url}/-/ready", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise AssertionError("prometheus did not become ready: " + (self.tmp / "prometheus.log").read_text()[-2000:])

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(http_get(url, timeout=10))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        if self.prometheus is not None:
            self.prometheus.terminate()
            try:
                self.prometheus.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.prometheus.kill()
                self.prometheus.wait()
            self.prometheus = None
        self.compose("down", "-v", "-t", "30", timeout=300)


@pytest.fixture(scope="module")
def stack(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("compose"))
    try:
        res = st.compose("up", "-d")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        st.start_prometheus()
        # search's health is SERVING only once it reached policy and reward itself.
        st.wait_healthy(("policy", "reward", "search"))
        yield st
    finally:
        st.stop()
    leftovers = podman("ps", "-a", "--filter", f"label=com.docker.compose.project={st.project}",
                       "--format", "{{.Names}}").stdout.split()
    assert not leftovers, leftovers


def test_images_are_cpu_variants_with_healthchecks(images: dict[str, str]) -> None:
    for name, image in images.items():
        info = json.loads(podman("image", "inspect", image).stdout)[0]
        cfg = info["Config"]
        assert cfg["User"] == "10001:10001", (name, cfg["User"])
        # Kept only in the docker image format (containers.sh builds with --format docker).
        assert info["Healthcheck"]["Test"][0] == "CMD-SHELL", (name, info.get("Healthcheck"))
        assert cfg["StopSignal"] == "SIGTERM"
        env = dict(e.split("=", 1) for e in cfg["Env"])
        assert not any(k in env for k in ("HF_TOKEN", "GF_SECURITY_ADMIN_PASSWORD"))
        if name != "search":
            assert env["HF_HOME"] == "/models/hf"
    # The search image is slim: the service imports, torch, SGLang and the test support are absent.
    probe = ("import ets.service.server, importlib.util as u; "
             "assert u.find_spec('torch') is None and u.find_spec('sglang') is None "
             "and u.find_spec('ets.testing') is None")
    podman("run", "--rm", "--entrypoint", "python", images["search"], "-c", probe)
    # No model weights baked in: the model cache is empty and no weight files lie outside the
    # installed libraries (which ship small data tables, and the packaged test embedder).
    for name in ("policy", "reward"):
        res = podman("run", "--rm", "--entrypoint", "/bin/sh", images[name], "-c",
                     "ls -A /models; find / -xdev \\( -name '*.safetensors' -o -name 'pytorch_model*.bin' \\) "
                     "-not -path '/opt/venv/lib/*' 2>/dev/null | head -5")
        assert res.stdout.strip() == "", (name, res.stdout)


def test_search_answered_through_compose(stack: Stack) -> None:
    argv = [str(BIN / "ets"), "search", "--addr", f"127.0.0.1:{stack.ports['search']}", "--json",
            "--timeout", "300", "--method", "ets", "--width", "4", "--max-depth", "3", "--seed", "7",
            "What is 2 + 3?"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr + "\n" + stack.logs("search")
    out = json.loads(res.stdout)
    assert out["candidates"], out
    stats = out["stats"]
    assert int(stats["model_calls"]) > 0 and int(stats["generated_tokens"]) > 0
    assert int(stats["total_kv_tokens"]) > 0
    # A second search with another method, so the dashboard sees more than one series.
    argv[argv.index("ets", 4)] = "rebase"
    res = subprocess.run(argv, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr
    # The same search through the OpenAI-compatible port: the official client, same answer and text.
    # Compared greedily (temperature 0, beam): seeded sampling is not reproducible run to run on the
    # CPU engine (sampling_seed needs deterministic inference, GPU only), greedy beam search is.
    argv[argv.index("rebase", 4)] = "beam"
    res = subprocess.run([*argv[:-1], "--temperature", "0", argv[-1]], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr
    greedy = json.loads(res.stdout)
    base = f"http://127.0.0.1:{stack.ports['search_openai']}"
    assert json.loads(http_get(f"{base}/health", timeout=10))["status"] == "SERVING"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300, max_retries=0)
    reply = client.chat.completions.create(model="beam", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                           seed=7, temperature=0.0, extra_body={"ets": {"width": 4, "max_depth": 3}})
    ets = (reply.model_extra or {})["ets"]
    assert ets["answer"] == greedy["answer"] and reply.choices[0].message.content == greedy["best"]["text"]
    assert ets["config"]["method"] == "beam" and reply.usage is not None and reply.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="rebase", stream=True, seed=7, messages=[
        {"role": "user", "content": "What is 2 + 3?"}], extra_headers={"X-ETS-Width": "4", "X-ETS-Max-Depth": "3"}))
    assert chunks[-1].choices[0].finish_reason == "stop" and "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_prometheus_scrapes_stack_and_dashboard_uses_real_series(stack: Stack, tmp_path: Path) -> None:
    # Wait until Prometheus has scraped every job since the searches (counters have moved).
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        up = {r["metric"]["job"]: r["value"][1] for r in stack.query("up")}
        searched = stack.query('sum(ets_search_searches_total{outcome="ok"})')
        if up == {"ets-search": "1", "ets-reward": "1", "sglang-policy": "1", "sglang-prm": "1"} and searched \
                and float(searched[0]["value"][1]) >= 2:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"targets/up: {stack.query('up')}")
    time.sleep(6)  # two more scrapes so rate() windows hold the change
    # Every series the dashboard queries is exported by a running service (raw scrapes).
    exported: set[str] = set()
    for port in ("search_metrics", "reward_metrics", "policy", "prm"):
        exported |= exported_names(http_get(f"http://127.0.0.1:{stack.ports[port]}/metrics", timeout=10))
    used = set().union(*dashboard_metric_names().values())
    assert used <= exported, f"dashboard queries series nobody exports: {sorted(used - exported)}"
    # Every panel query is valid PromQL on the real Prometheus, and the core panels have data.
    dash = json.loads((ROOT / "deploy/grafana/dashboards/ets.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            stack.query(target["expr"].replace("$__rate_interval", "1m"))
    # One more search now that every series exists in Prometheus, so rates over 1m see it move.
    res = subprocess.run([str(BIN / "ets"), "search", "--addr", f"127.0.0.1:{stack.ports['search']}", "--json",
                          "--method", "ets", "--width", "4", "--max-depth", "3", "--seed", "11", "What is 4 + 4?"],
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr
    time.sleep(8)
    assert stack.query("sum(rate(ets_search_searches_total[1m])) > 0")
    # Engine series under their documented names (the scrape config restores "sglang:" names
    # that OpenMetrics negotiation escapes to "sglang_"), moving with the searches.
    assert stack.query('sum(rate(sglang:prompt_tokens_total{job="sglang-policy"}[1m])) > 0')
    assert stack.query('sum(rate(sglang:prompt_tokens_total{job="sglang-prm"}[1m])) > 0')
    assert stack.query("histogram_quantile(0.5, sum by (le) (rate(ets_search_selection_kv_tokens_bucket[1m]))) > 0")
    out = os.environ.get("ETS_DASHBOARD_PNG")
    if out:
        # The README picture: a few minutes of mixed traffic first.
        for i in range(int(os.environ.get("ETS_DASHBOARD_SEARCHES", "24"))):
            method = ("ets", "rebase", "beam")[i % 3]
            subprocess.run([str(BIN / "ets"), "search", "--addr", f"127.0.0.1:{stack.ports['search']}", "--json",
                            "--method", method, "--width", "4", "--max-depth", "3", "--seed", str(i),
                            f"What is {i} + {i + 1}?"], capture_output=True, text=True, timeout=400, check=True)
            time.sleep(2)
        time.sleep(6)
    # Every panel drawn from Prometheus by the script that makes the README picture.
    sys.path.insert(0, str(ROOT / "scripts"))
    from render_dashboard import render

    png = Path(out) if out else tmp_path / "dashboard.png"
    counts = render(stack.prometheus_url, png, minutes=5, rate_interval="1m", step=2)
    assert png.stat().st_size > 10_000
    assert counts["Searches / s"] > 0 and counts["Engine prefix-cache reuse"] > 0, counts


def test_containers_stop_gracefully_on_sigterm(stack: Stack) -> None:
    # Search first (drains), then the engines; SIGKILL after the timeout would exit 137.
    for service in ("search", "reward", "policy"):
        name = stack.container(service)
        podman("stop", "-t", "40", name, timeout=120)
        code = int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())
        stack.exit_codes[service] = code
    assert all(code != 137 for code in stack.exit_codes.values()), stack.exit_codes
