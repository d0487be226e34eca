"""Supervise one SGLang server subprocess: start, wait for health, stop by PID, keep its log.

Owns the subprocess lifecycle used by the tests' fixtures and by the reward server's PRM
supervisor (which adds restart-on-crash on top): the server runs in its own process group
(SGLang forks scheduler and detokenizer processes, so stopping means signalling the whole group),
stdout/stderr go to a log file whose tail is attached to every failure, and readiness is SGLang's
``/health`` (a real one-token generation) polled against a deadline that fails fast when the
process dies. A process still alive at interpreter exit is stopped by an ``atexit`` hook so a
crashed test run does not leak 2 GB servers.
"""
from __future__ import annotations

import asyncio
import atexit
import http.client
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Mapping, Sequence

from ets.engine.launcher import LaunchCommand, LaunchConfig, build_command

DEFAULT_START_TIMEOUT_S = 180.0
DEFAULT_STOP_TIMEOUT_S = 20.0


class ServerStartError(RuntimeError):
    """The server died or did not become healthy in time; carries the log tail."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}\n--- server log tail ---\n{log_tail}")
        self.log_tail = log_tail


_LIVE: set["SGLangProcess"] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        proc.stop(timeout=5.0)


atexit.register(_stop_all_at_exit)


class SGLangProcess:
    """One SGLang server subprocess in its own process group."""

    def __init__(self, popen: subprocess.Popen[bytes], url: str, log_path: Path, name: str) -> None:
        self._popen = popen
        self.url = url.rstrip("/")
        self.log_path = log_path
        self.name = name
        self.pgid = popen.pid  # start_new_session=True: the leader's pid is the group id
        with _LIVE_LOCK:
            _LIVE.add(self)

    # -- start -------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        command: LaunchCommand | Sequence[str],
        *,
        url: str,
        log_path: str | Path,
        env: Mapping[str, str] | None = None,
        name: str = "sglang",
    ) -> "SGLangProcess":
        """Spawn ``command`` (a ``LaunchCommand`` or an argv) with output appended to ``log_path``."""
        if isinstance(command, LaunchCommand):
            argv, run_env = command.argv, command.env
        else:
            argv, run_env = list(command), dict(os.environ if env is None else env)
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start {name}: {' '.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                argv, env=run_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(popen, url, log_path, name)

    @classmethod
    def launch(cls, config: LaunchConfig, *, log_path: str | Path, name: str = "sglang") -> "SGLangProcess":
        """Build the SGLang command for ``config`` and start it (not yet waited for)."""
        command = build_command(config)
        return cls.start(command, url=local_url(config), log_path=log_path, name=name)

    # -- state -------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                tail = deque(f, maxlen=lines)
        except OSError as exc:
            return f"<log {self.log_path} unreadable: {exc}>"
        return b"".join(tail).decode("utf-8", errors="replace")

    def check_health(self, timeout: float = 10.0) -> bool:
        """One ``GET /health`` probe (SGLang runs a one-token generation for it)."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException):
            # HTTPException: something that is not SGLang answered on the port (a free_port race
            # with another server), e.g. BadStatusLine from an HTTP/2 gRPC server.
            return False

    # -- readiness ---------------------------------------------------------------------------
    def wait_healthy(self, timeout: float = DEFAULT_START_TIMEOUT_S, poll_s: float = 0.5) -> None:
        """Block until ``/health`` answers 200; raise ``ServerStartError`` (with the log tail)
        as soon as the process exits, or when ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive():
                raise ServerStartError(
                    f"{self.name} exited with code {self.returncode} before becoming healthy "
                    f"(log: {self.log_path})", self.log_tail()
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerStartError(
                    f"{self.name} not healthy after {timeout:.0f}s at {self.url} (log: {self.log_path})",
                    self.log_tail(),
                )
            if self.check_health(timeout=min(10.0, max(remaining, 0.1))):
                return
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))

    async def wait_healthy_async(self, timeout: float = DEFAULT_START_TIMEOUT_S, poll_s: float = 0.5) -> None:
        """``wait_healthy`` for asyncio callers (probes run in a worker thread)."""
        await asyncio.to_thread(self.wait_healthy, timeout, poll_s)

    # -- stop --------------------------------------------------------------------------------
    def _signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.pgid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return False

    def _group_alive(self) -> bool:
        """Whether any non-zombie process of the group is left. Zombies do not count: orphaned
        workers are reparented to PID 1, which in a container (e.g. the reward server supervising
        its PRM server) may never reap them."""
        if not self._signal_group(0):
            return False
        try:
            pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
        except OSError:  # no procfs: trust the signal probe
            return True
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # After "pid (comm)": state, ppid, pgrp, ...
            if len(fields) > 2 and int(fields[2]) == self.pgid and fields[0] not in (b"Z", b"X"):
                return True
        return False

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the leader, wait up to ``timeout``, then SIGKILL what is left of the group.

        Only the leader gets SIGTERM, as a container runtime would send it to PID 1: SGLang's
        HTTP server drains and stops its scheduler/detokenizer itself. Signalling the whole group
        makes the scheduler die first, which SGLang treats as a crash (SIGQUIT, 5 s diagnostics
        sleep, then SIGKILL of itself). Returns the leader's exit code. Idempotent."""
        if self.is_alive() or self._group_alive():
            if self.is_alive():
                try:
                    self._popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            else:  # the leader already died (crash): its orphaned workers get the SIGTERM
                self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            try:
                self._popen.wait(timeout=max(timeout, 0.0))
            except subprocess.TimeoutExpired:
                pass
            # SGLang's workers may outlive the leader for a moment; give them the rest of the
            # budget, then kill whatever remains of the group.
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._group_alive() or self.is_alive():
                self._signal_group(signal.SIGKILL)
            try:
                self._popen.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return self._popen.returncode

    async def stop_async(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        return await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> "SGLangProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else f"exited({self.returncode})"
        return f"SGLangProcess(name={self.name!r}, pid={self.pid}, url={self.url!r}, {state})"


def local_url(config: LaunchConfig) -> str:
    """Where this host reaches a server launched with ``config``: loopback for a wildcard bind
    (0.0.0.0 / ::), else the bound address itself."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    return f"http://[{host}]:{config.port}" if ":" in host else f"http://{host}:{config.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0); for tests and local runs."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_server(
    config: LaunchConfig,
    *,
    log_path: str | Path,
    name: str = "sglang",
    timeout: float = DEFAULT_START_TIMEOUT_S,
) -> SGLangProcess:
    """Launch ``config`` and wait until healthy; on failure stop the process and re-raise."""
    proc = SGLangProcess.launch(config, log_path=log_path, name=name)
    try:
        proc.wait_healthy(timeout=timeout)
    except BaseException:
        proc.stop(timeout=5.0)
        raise
    return proc
