"""Keep one SGLang engine available: spawned and restarted (with backoff), or attached by URL.

Owns ``EngineSupervisor`` (the reward server's PRM engine uses it; any service that runs its own
engine can) and ``EngineUnavailable``. Process handling is ``ets.engine.process``'s: the engine
dies with its supervisor (parent-death signal), a port already in use is refused before spawning
(``PortInUseError`` naming the setting, so an orphaned engine answering ``/health`` there is never
taken for the new one), and health only counts from the process that was started.

Restart policy: after a crash the engine is respawned on the ``restart_backoff`` schedule
(``ets.retry.Backoff``: 1 s doubling up to 60 s by default), which advances on every respawn and
only starts over once an engine has served for ``stable_after_s``: a spawn that comes up and dies
again at once is a crash loop, not a fresh failure.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Callable

import aiohttp

from ets.engine.launcher import LaunchConfig
from ets.engine.process import ServerProcess, local_url
from ets.engine.procfs import PortInUseError, check_port_free
from ets.retry import Backoff
from ets.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# A crash loop must not respawn at full pace; no jitter: one supervisor, nothing to desynchronise.
RESTART_BACKOFF = Backoff(initial_backoff_s=1.0, max_backoff_s=60.0, jitter=False)


class EngineUnavailable(RuntimeError):
    """The engine cannot answer right now (down, restarting, unreachable): gRPC UNAVAILABLE."""


class EngineSupervisor:
    """Keeps an SGLang server available: spawned (and restarted) or attached by URL.

    ``name`` appears in logs and errors ("PRM server ..."); ``port_setting`` and ``url_setting``
    name the settings a port clash or an unreachable attached URL is reported against."""

    def __init__(self, *, url: str | None = None, launch: LaunchConfig | None = None, name: str = "engine",
                 port_setting: str = "port", url_setting: str = "url",
                 log_dir: str | Path = "/tmp/ets-engine-logs", start_timeout_s: float = 600.0,
                 poll_s: float = 0.5, health_every_s: float = 5.0, restart_backoff: Backoff = RESTART_BACKOFF,
                 stable_after_s: float = 60.0,
                 on_restart: Callable[[], None] | None = None) -> None:
        if (url is None) == (launch is None):
            raise ValueError("EngineSupervisor needs exactly one of url (attach) or launch (spawn)")
        self.launch = launch
        self.url = (url or local_url(launch)).rstrip("/")  # type: ignore[arg-type]
        self.name = name
        self.port_setting = port_setting
        self.url_setting = url_setting
        # Empty: the engine logs to this process's stdout (no file to fill a tmpfs).
        self.log_dir = Path(log_dir) if str(log_dir) else None
        self.start_timeout_s = start_timeout_s
        self.poll_s = poll_s
        self.health_every_s = health_every_s
        self.restart_backoff = restart_backoff
        self.stable_after_s = stable_after_s
        self.on_restart = on_restart
        self.process: ServerProcess | None = None  # when spawned
        self.restarts = 0
        self._up = False
        self._healthy_since: float | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._session: aiohttp.ClientSession | None = None

    @property
    def spawned(self) -> bool:
        return self.launch is not None

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def is_up(self) -> bool:
        return self._up

    def mark(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            log.warning("%s server %s is %s", self.name, self.url, "up" if up else "DOWN")
            for listener in self._listeners:
                listener(up)

    async def _probe(self, timeout: float = 10.0) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _spawn(self) -> None:
        """Start a new engine (after stopping a previous one) and wait until it is healthy.
        ``PortInUseError`` when the port is taken: nothing is started then."""
        assert self.launch is not None
        if self.process is not None:
            await self.process.stop_async(timeout=10.0)
        # Launched on the event loop's thread, not a worker thread: the parent-death signal is
        # tied to the spawning thread, and this one lives as long as the supervisor.
        self.process = ServerProcess.launch(
            self.launch,
            log_path=self.log_dir / f"{self.name.lower()}-sglang-{self.launch.port}.log" if self.log_dir else None,
            name=f"{self.name.lower()}-sglang", port_setting=self.port_setting,
        )
        # Said before the wait: a first start may take minutes (weights download), and an operator
        # reading this process's log must see what it waits for and where that engine logs.
        log.info("%s SGLang server starting (pid %d, %s, %s); waiting up to %.0fs for /health", self.name,
                 self.process.pid, self.url, self.process.log_where, self.start_timeout_s)
        try:
            await self.process.wait_healthy_async(timeout=self.start_timeout_s)
        except BaseException:
            # Not healthy in time, or a stranger answers on the port: this one is not serving.
            await self.process.stop_async(timeout=10.0)
            raise
        self._healthy_since = asyncio.get_running_loop().time()

    async def start(self) -> None:
        """Spawn (or first-probe) the server; return once it is healthy. Spawn failures raise
        (``PortInUseError``, or ``ServerStartError`` with SGLang's log tail); an attached URL that is
        not up yet is waited for."""
        self._session = aiohttp.ClientSession()
        if self.spawned:
            await self._spawn()
        else:
            deadline = asyncio.get_running_loop().time() + self.start_timeout_s
            while not await self._probe():
                if asyncio.get_running_loop().time() > deadline:
                    raise EngineUnavailable(f"{self.name} server at {self.url} ({self.url_setting}) not healthy "
                                            f"after {self.start_timeout_s:.0f}s")
                await asyncio.sleep(self.poll_s)
        self.mark(True)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name=f"{self.name}-supervisor")

    async def _restart(self, backoff: float) -> None:
        """One respawn after ``backoff`` seconds; failures are logged (the watch loop retries)."""
        assert self.launch is not None
        await asyncio.sleep(backoff)
        if self._closed:
            return
        try:
            # Refused before counting a restart: a port held by someone else starts nothing.
            check_port_free(self.launch.host, self.launch.port, self.port_setting)
            self.restarts += 1
            if self.on_restart is not None:
                self.on_restart()
            await self._spawn()
            self.mark(True)
        except PortInUseError as exc:
            log.error("%s restart refused: %s", self.name, exc)
        except Exception as exc:  # noqa: BLE001 - keep supervising, back off further
            log.error("%s restart failed: %s", self.name, str(exc).splitlines()[0])

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        next_health = loop.time() + self.health_every_s
        respawns = 0  # since the engine last served for stable_after_s
        while not self._closed:
            await asyncio.sleep(self.poll_s)
            if self.spawned and (self.process is None or not self.process.is_alive()):
                self.mark(False)
                served = None if self._healthy_since is None else loop.time() - self._healthy_since
                if served is not None and served >= self.stable_after_s:
                    respawns = 0  # it had been serving: a fresh failure
                self._healthy_since = None
                code = None if self.process is None else self.process.returncode
                backoff = self.restart_backoff.backoff(respawns)
                log.error("%s SGLang server exited (code %s); restarting in %.1fs", self.name, code, backoff)
                await self._restart(backoff)
                # Grows on every respawn, whether it came up or not: an engine that comes up and
                # dies again at once must not be respawned at the initial pace forever.
                respawns += 1
                continue
            # Down: probe at the poll rate so recovery is seen quickly; up: every health_every_s.
            if not self._up or loop.time() >= next_health:
                next_health = loop.time() + self.health_every_s
                self.mark(await self._probe())

    async def post(self, path: str, body: dict[str, Any], timeout: float) -> Any:
        """POST JSON; connection failures mark the server down and raise EngineUnavailable."""
        if not self._up:
            restarting = " (restarting)" if self.spawned else ""
            raise EngineUnavailable(f"{self.name} server {self.url} is down{restarting}")
        assert self._session is not None
        try:
            async with self._session.post(f"{self.url}{path}", json=body,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    raise EngineUnavailable(f"{self.name} server {self.url}{path} answered {resp.status}: {text[:200]}")
                if resp.status != 200:
                    raise RuntimeError(
                        f"{self.name} server {self.url}{path} rejected the request ({resp.status}): {text[:300]}")
                if len(text) > 1 << 20:
                    # Hidden-state replies (llemma) can be megabytes: parse off the event loop.
                    return await asyncio.to_thread(json.loads, text)
                return json.loads(text)
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            self.mark(False)
            raise EngineUnavailable(f"{self.name} server {self.url} unreachable: {exc}") from None
        except TimeoutError:
            raise EngineUnavailable(f"{self.name} server {self.url} timed out after {timeout:.0f}s") from None

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait(self._task)
        if self.process is not None:
            await self.process.stop_async()
        if self._session is not None:
            await self._session.close()
        self.mark(False)
