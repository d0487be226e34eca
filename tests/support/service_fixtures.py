"""Fixtures and helpers that several test folders share: ``ets serve`` subprocesses, the whole
stack (``shared_stack``, ``search_stack``) and a real Prometheus server. (The in-process service
fixtures ``svc`` and ``tight`` are tests/service/conftest.py's.)

Every process is started on free ports, in its own process group, and stopped by PID.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from ets.engine.process import ServerProcess
from ets.testing.stack import Stack, StackConfig, start_stack, wait_grpc_serving
from tools import free_port, http_get, tool, wait_http

REPO = Path(__file__).resolve().parents[2]

# Server-wide defaults for the tests' search services: the tiny model's searches stay short.
SMALL_SEARCH_ENV = {
    "ETS_SEARCH_MAX_STEP_TOKENS": "12",
    "ETS_SEARCH_MAX_TOKENS": "96",
    "ETS_SEARCH_MAX_DEPTH": "4",
    "ETS_SEARCH_WIDTH": "4",
    "ETS_SEARCH_SEED": "1",
}


class ServeProcess:
    """``ets serve`` as a subprocess (own process group, log file, stop by PID)."""

    def __init__(self, proc: ServerProcess, addr: str, metrics_url: str, openai_url: str = "") -> None:
        self.proc = proc
        self.addr = addr
        self.metrics_url = metrics_url
        self.openai_url = openai_url  # the OpenAI-compatible endpoint's base URL (http://host:port/v1)

    def metrics(self) -> str:
        return http_get(self.metrics_url)

    def stop(self) -> None:
        self.proc.stop(timeout=20.0)


def start_serve(log_dir: Path, *, policy_url: str, reward_addr: str, env: dict[str, str] | None = None,
                args: tuple[str, ...] = (), name: str = "search") -> ServeProcess:
    port, metrics_port, openai_port = free_port(), free_port(), free_port()
    run_env = dict(os.environ, **SMALL_SEARCH_ENV, **(env or {}))
    argv = [sys.executable, "-m", "ets.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--openai-port", str(openai_port), "--policy-url", policy_url,
            "--reward-addr", reward_addr, *args]
    proc = ServerProcess.start(argv, url=f"http://127.0.0.1:{metrics_port}", env=run_env,
                               log_path=log_dir / f"{name}-{port}.log", name=name)
    serve = ServeProcess(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics",
                         f"http://127.0.0.1:{openai_port}/v1")
    # Up = the metrics endpoint answers (gRPC health is NOT_SERVING until upstreams answer).
    wait_http(serve.metrics_url, what="ets serve", alive=proc.is_alive, log_tail=proc.log_tail, stop=proc.stop)
    return serve


@pytest.fixture(scope="session")
def serve_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServeProcess]]:
    """``make(policy_url=..., reward_addr=..., env=..., args=...)``: a started ``ets serve``;
    all are stopped at session end (tests may stop theirs earlier)."""
    log_dir = tmp_path_factory.mktemp("serve-logs")
    started: list[ServeProcess] = []

    def make(**kwargs: object) -> ServeProcess:
        serve = start_serve(log_dir, **kwargs)  # type: ignore[arg-type]
        started.append(serve)
        return serve

    try:
        yield make
    finally:
        for s in started:
            s.stop()


class SharedStack:
    """The session's whole stack, rebuilt when something took it down: a later module may stop the
    session's SGLang servers (the real-model smoke test frees their memory) or evict its policy
    under the SGLang cap, and a search service pointing at a stopped policy would fail every test
    after it."""

    def __init__(self, work: Path, sglang_servers: Any, tiny_model_factory: Callable[[str], Path]) -> None:
        self.work, self.servers, self.models = work, sglang_servers, tiny_model_factory
        self.stack: Stack | None = None
        self.policy: ServerProcess | None = None
        self.builds = 0

    def _alive(self) -> bool:
        procs = (self.policy, self.stack.reward, self.stack.search) if self.stack else ()
        return bool(procs) and all(p is not None and p.is_alive() for p in procs)

    def current(self) -> Stack:
        if self.stack is not None and self._alive():
            return self.stack
        self.stop()
        self.builds += 1
        cfg = StackConfig(
            work_dir=self.work / f"stack-{self.builds}", policy="tiny", prm_type="math-shepherd",
            policy_model=self.models("policy"), prm_model=self.models("math-shepherd"),
            search_env=dict(SMALL_SEARCH_ENV), max_concurrent=8, max_queued=32,
        )
        # Through the session's SGLang cache: get() restarts the policy if it was stopped.
        self.policy = self.servers.get(cfg.policy_model)
        self.stack = start_stack(cfg, policy_url=self.policy.url)
        return self.stack

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory: pytest.TempPathFactory, sglang_servers: Any,
                 tiny_model_factory: Callable[[str], Path]) -> Iterator[SharedStack]:
    shared = SharedStack(tmp_path_factory.mktemp("stacks"), sglang_servers, tiny_model_factory)
    try:
        yield shared
    finally:
        shared.stop()


@pytest.fixture()
def search_stack(shared_stack: SharedStack) -> Stack:
    """The whole stack on loopback: the session's SGLang policy, the reward server (its SGLang
    PRM backend and the MiniLM embedder) and ``ets serve``; SERVING before it is handed out."""
    return shared_stack.current()


class Prometheus:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def query(self, expr: str) -> dict[str, Any]:
        import json
        import urllib.parse

        return json.loads(http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_prometheus(work: Path, targets: list[str], scrape_interval: str = "1s") -> Prometheus:
    """A real Prometheus (Debian package) scraping ``targets`` (host:port) every second."""
    binary = tool("prometheus")
    work.mkdir(parents=True, exist_ok=True)
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: {i}\n  evaluation_interval: {i}\n"
        "scrape_configs:\n  - job_name: ets-search\n    static_configs:\n      - targets: [{t}]\n"
        .format(i=scrape_interval, t=", ".join(f"'{t}'" for t in targets)))
    port = free_port()
    log = work / "prometheus.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = Prometheus(proc, f"http://127.0.0.1:{port}", log)
    wait_http(f"{prom.url}/-/ready", what="prometheus", alive=lambda: proc.poll() is None,
              log_tail=lambda: log.read_text()[-2000:], stop=prom.stop)
    return prom


__all__ = ["ServeProcess", "Prometheus", "start_prometheus", "wait_grpc_serving",
           "SMALL_SEARCH_ENV", "REPO"]
