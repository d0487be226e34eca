"""Session-wide fixtures for real components: tiny models and real SGLang CPU servers.

Models are built once per session into a temp folder (``tiny_model_factory``), SGLang servers
are started through ``ets.engine.process`` on free ports, waited for with ``/health``, and
stopped by PID at session end. At most ``MAX_SGLANG_SERVERS`` run at once: starting one more
stops the least recently requested server (a later request restarts it). When a server fails to
start, the ``ServerStartError`` carries its log tail; logs stay under the session temp folder.

The test folders mirror the package and the deployment (``search/``, ``policy/``, ``reward/``,
``service/``, ``engine/``, ``evaluation/``, ``stack/``, ``deployment/``, ``benchmarks/``,
``package/``), each with its own ``conftest.py`` for what only it uses. What several folders
share lives in ``tests/support/`` (on the path): fixture modules registered in ``pytest_plugins``
below (``reward_fixtures``, ``service_fixtures``), helpers (``tools``, ``deploy_helpers``) and
``tiers``, which marks every test with its tier.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import pytest

from ets.engine.launcher import LaunchConfig
from ets.engine.process import ServerProcess, free_port, start_server

# Fixture modules several folders share (tests/support/<area>_fixtures.py); add yours here.
pytest_plugins: list[str] = ["tiers", "pytester", "service_fixtures", "reward_fixtures"]

# Each CPU SGLang server holds ~2 GB; 5 people share this machine.
MAX_SGLANG_SERVERS = int(os.environ.get("ETS_TEST_MAX_SGLANG_SERVERS", "3"))
SGLANG_START_TIMEOUT_S = float(os.environ.get("ETS_TEST_SGLANG_START_TIMEOUT_S", "240"))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``make(kind) -> Path``: a tiny model of ``kind`` (see ets.testing.tiny_models.KINDS),
    built once per session and kind."""
    from ets.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    lock = threading.Lock()
    built: dict[str, Path] = {}

    def make(kind: str) -> Path:
        with lock:
            if kind not in built:
                built[kind] = make_tiny_model(root / kind, kind)
            return built[kind]

    return make


@pytest.fixture(scope="session")
def tiny_policy_model(tiny_model_factory: Callable[[str], Path]) -> Path:
    """Folder of the tiny Llama policy model (byte-level BPE, "ки" as one token)."""
    return tiny_model_factory("policy")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct folder, prepared from its PyPI package by ``ets models
    prepare`` into the model cache (``ETS_MODEL_CACHE`` or ``~/.cache/ets/models``): converted
    once per machine (~20 s of CPU), then reused; a file lock serialises concurrent sessions."""
    from ets.models import DEFAULT_POLICY_MODEL, prepare_model

    return prepare_model(DEFAULT_POLICY_MODEL)


class SGLangServers:
    """Session cache of real SGLang CPU servers keyed by (model dir, options), capped at
    ``max_alive``: the least recently used server is stopped when another must start."""

    def __init__(self, log_dir: Path, max_alive: int) -> None:
        self.log_dir = log_dir
        self.max_alive = max_alive
        self._servers: OrderedDict[tuple[object, ...], ServerProcess] = OrderedDict()
        self._lock = threading.Lock()
        self._count = 0

    def get(
        self,
        model_dir: str | Path,
        *,
        grammar_backend: str = "xgrammar",
        max_total_tokens: int | None = None,
        served_name: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> ServerProcess:
        """A healthy server for ``model_dir`` (started if needed); returns the process (``.url``)."""
        key = (str(model_dir), grammar_backend, max_total_tokens, served_name, tuple(extra_args))
        with self._lock:
            proc = self._servers.get(key)
            if proc is not None and proc.is_alive():
                self._servers.move_to_end(key)
                return proc
            if proc is not None:  # died: drop it and start a fresh one
                proc.stop(timeout=5.0)
                del self._servers[key]
            while len(self._servers) >= self.max_alive:
                _, oldest = self._servers.popitem(last=False)
                oldest.stop()
            self._count += 1
            name = f"sglang-{Path(model_dir).name}-{self._count}"
            config = LaunchConfig(
                model_path=str(model_dir), host="127.0.0.1", port=free_port(), device="cpu",
                grammar_backend=grammar_backend, max_total_tokens=max_total_tokens,
                served_name=served_name, extra_args=tuple(extra_args), random_seed=0,
            )
            proc = start_server(
                config, log_path=self.log_dir / f"{name}.log", name=name, timeout=SGLANG_START_TIMEOUT_S
            )
            self._servers[key] = proc
            return proc

    def stop(self, proc: ServerProcess) -> None:
        """Stop one server now (e.g. a test that kills it on purpose) and forget it."""
        with self._lock:
            for key, p in list(self._servers.items()):
                if p is proc:
                    del self._servers[key]
        proc.stop()

    def alive(self) -> list[ServerProcess]:
        with self._lock:
            return [p for p in self._servers.values() if p.is_alive()]

    def stop_all(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
        for proc in servers:
            proc.stop()


_SESSION_SERVERS: list[SGLangServers] = []


@pytest.fixture(scope="session")
def sglang_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SGLangServers]:
    """Factory/cache of real SGLang CPU servers: ``sglang_servers.get(model_dir) -> ServerProcess``.
    Fixtures that start servers of their own (a whole stack) can call ``stop_all()`` first to
    stay under the memory cap."""
    servers = SGLangServers(tmp_path_factory.mktemp("sglang-logs"), MAX_SGLANG_SERVERS)
    _SESSION_SERVERS.append(servers)
    try:
        yield servers
    finally:
        servers.stop_all()
        _SESSION_SERVERS.remove(servers)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On a failing test that used the SGLang fixtures, attach each live server's log tail."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "sglang_servers" in getattr(item, "fixturenames", ()):
        for servers in _SESSION_SERVERS:
            for proc in servers.alive():
                report.sections.append((f"SGLang log tail: {proc.name} ({proc.log_path})", proc.log_tail(40)))


@pytest.fixture(scope="session")
def policy_process(sglang_servers: SGLangServers, tiny_policy_model: Path) -> ServerProcess:
    """The real SGLang CPU server for the tiny policy model."""
    return sglang_servers.get(tiny_policy_model)


@pytest.fixture()
def policy_server(policy_process: ServerProcess, sglang_servers: SGLangServers, tiny_policy_model: Path) -> str:
    """Base URL (``http://127.0.0.1:PORT``) of a healthy policy server. Re-resolved per test so
    a server evicted by the cap (or crashed) is transparently restarted."""
    return sglang_servers.get(tiny_policy_model).url
