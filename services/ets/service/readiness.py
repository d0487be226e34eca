"""Readiness of the search service: whether its upstreams (policy and reward) answer.

Owns the monitor task that probes the upstreams (quickly while one is down, slowly once both
answer, and at once after a search found one down), the ``ets_search_upstream_up`` gauges and
the ready flag. Transports subscribe with ``on_change`` (the gRPC server sets its health status;
the service starts and reports NOT_SERVING while an upstream is down).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from ets.service.metrics import SearchMetrics
from ets.tasks import cancel_and_wait

log = logging.getLogger("ets.service")

# How often upstreams are probed: quickly while one is down, slowly once both answer.
PROBE_INTERVAL_DOWN_S = 1.0
PROBE_INTERVAL_UP_S = 5.0

Probe = Callable[[], Awaitable[dict[str, str | None]]]


class Readiness:
    """Probes upstreams with ``probe()`` (per upstream: None when it answers, else why not)."""

    def __init__(self, probe: Probe, metrics: SearchMetrics,
                 on_change: Callable[[bool], Awaitable[None]] | None = None) -> None:
        self._probe = probe
        self._metrics = metrics
        self._on_change = on_change
        self._reprobe = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self.ready = False
        self.probed = False
        self.errors: dict[str, str | None] = {"policy": "not probed yet", "reward": "not probed yet"}

    def reprobe(self) -> None:
        """Probe the upstreams now (after a search saw one fail)."""
        self._reprobe.set()

    def down(self) -> dict[str, str]:
        """The upstreams the last probe found down (upstream -> why); empty before the first probe."""
        if not self.probed:
            return {}
        return {k: v for k, v in self.errors.items() if v is not None}

    async def probe_once(self) -> bool:
        errors = await self._probe()
        self.errors = errors
        self.probed = True
        for upstream, error in errors.items():
            self._metrics.upstream_up.labels(upstream=upstream).set(0 if error else 1)
        ready = all(e is None for e in errors.values())
        if ready != self.ready:
            log.info("upstreams %s: %s", "ready" if ready else "not ready", {k: v or "ok" for k, v in errors.items()})
        self.ready = ready
        if self._on_change is not None:
            await self._on_change(ready)
        return ready

    async def _watch(self) -> None:
        while True:
            try:
                ready = await self.probe_once()
            except Exception:  # the monitor must outlive any probe bug
                log.exception("upstream probe failed")
                ready = False
            self._reprobe.clear()
            try:
                await asyncio.wait_for(self._reprobe.wait(), PROBE_INTERVAL_UP_S if ready else PROBE_INTERVAL_DOWN_S)
            except TimeoutError:
                pass

    def start(self) -> None:
        self._monitor = asyncio.create_task(self._watch(), name="ets-upstream-monitor")

    async def stop(self) -> None:
        await cancel_and_wait(self._monitor)
        self._monitor = None

    async def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.ready
