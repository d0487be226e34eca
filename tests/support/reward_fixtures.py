"""Reward-server test fixtures: in-process reward servers on loopback, each on its own event loop.

``reward_servers(config_overrides) -> ThreadedRewardServer`` starts a real ``RewardServer``
(gRPC + health + reflection + metrics on free ports) in a background thread with its own asyncio
loop, so module-scoped servers outlive the per-test event loops of pytest-asyncio. Everything
started is stopped at module end. Registered in ``tests/conftest.py`` (``pytest_plugins``).
"""
from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from ets.reward.server import RewardServer
from ets.reward.settings import RewardServerConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ThreadedRewardServer:
    """A ``RewardServer`` running on a private event loop in a daemon thread."""

    def __init__(self, config: RewardServerConfig) -> None:
        self.server = RewardServer(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="reward-server", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 300.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, *, wait_backend: bool = True, timeout: float = 300.0) -> "ThreadedRewardServer":
        self.run(self.server.start(wait_backend=wait_backend), timeout)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self.server.stop(grace=2.0), timeout=60.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


def reward_config(prm_model: Path, prm_type: str, backend: str, **overrides: Any) -> RewardServerConfig:
    """A loopback CPU config on free ports (gRPC and metrics)."""
    from ets.reward.embedder import default_embedder_model

    base = RewardServerConfig(
        prm_model=str(prm_model), prm_type=prm_type, prm_backend=backend, device="cpu", host="127.0.0.1",
        port=0, metrics_port=0, embedder_model=default_embedder_model(), max_batch_size=16,
    )
    return base.replace(**overrides)


@pytest.fixture(scope="module")
def reward_servers() -> Iterator[Callable[..., ThreadedRewardServer]]:
    """``start(config, wait_backend=True) -> ThreadedRewardServer``; all stopped at module end."""
    started: list[ThreadedRewardServer] = []

    def start(config: RewardServerConfig, *, wait_backend: bool = True) -> ThreadedRewardServer:
        server = ThreadedRewardServer(config)
        started.append(server)
        return server.start(wait_backend=wait_backend)

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()
