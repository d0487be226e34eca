"""Supervise one server subprocess: start, wait for health, stop by PID, keep its log.

Owns the subprocess lifecycle used by the stack orchestrator, the tests' fixtures and the engine
supervisor (``ets.engine.supervisor``, which adds restart-on-crash on top):

- the server runs in its own process group (SGLang forks scheduler and detokenizer processes, so
  stopping means signalling the whole group), and ``stop()`` also reaches descendants that left
  the group (a reward server's PRM engine runs in a session of its own);
- it dies with its parent: on Linux the child arms a parent-death signal (``PR_SET_PDEATHSIG``,
  SIGKILL) before exec, so a parent killed with SIGKILL takes it along. SGLang arms the same signal
  in its scheduler and detokenizer, so a whole engine follows its supervisor;
- a port is refused before spawning when something already listens on it (``PortInUseError``
  naming the setting), and ``/health`` only counts when the listening socket belongs to the
  started process group: an orphan answering on the port is not mistaken for the new server;
- stdout/stderr go to a log file whose tail is attached to every failure, and readiness is
  ``/health`` (for SGLang a real one-token generation) polled against a deadline that fails fast
  when the process dies;
- ``stop()`` returns only once nothing of the group (and of the descendants that left it) exists,
  zombies included: the starting process is the subreaper of what it starts
  (``PR_SET_CHILD_SUBREAPER``), so the workers a leader leaves behind are reaped here, not left to
  an init that reaps late or never;
- with ``ETS_PID_FILE`` set, every start appends ``name pgid`` to that file (inherited by child
  processes, so a reward server records its PRM engine too): a last-resort cleanup such as
  ``scripts/demo.sh``'s can kill every group even after the orchestrator itself was killed.

A process still alive at interpreter exit is stopped by an ``atexit`` hook so a crashed test run
does not leak 2 GB servers.

``ServerProcess`` runs any HTTP server with a ``/health`` route (SGLang engines, the reward
server, sglang-router, the search service in the stack); ``launch`` / ``start_server`` build an
SGLang engine's command from a ``LaunchConfig``. What /proc says about processes and ports is
``ets.engine.procfs``; the restart policy is ``ets.engine.supervisor``.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from pathlib import Path
from typing import Collection, Mapping, Sequence

from ets.engine.launcher import LaunchCommand, LaunchConfig, build_command
from ets.engine.procfs import (
    ProcInfo, check_port_free, describe, descendants, listening_inodes, port_holders, proc_info, process_table,
    still_running,
)

log = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 180.0
DEFAULT_STOP_TIMEOUT_S = 20.0
# Every started process appends "name pgid" here when set (see the module docstring).
PID_FILE_ENV = "ETS_PID_FILE"


def file_tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file (a note in its place when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            tail = deque(f, maxlen=lines)
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return b"".join(tail).decode("utf-8", errors="replace")


class ServerStartError(RuntimeError):
    """The server died or did not become healthy in time; carries the log tail."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}\n--- server log tail ---\n{log_tail}")
        self.log_tail = log_tail


# -- dying with the parent ----------------------------------------------------------------------
# Arms SIGKILL on parent death (PR_SET_PDEATHSIG = 1), then execs the real command: the signal
# survives exec, and the pid stays the one we started. Exits 1 when the parent already died in
# between (then the signal would never come). A shim rather than ``preexec_fn``: that forces a
# plain fork(), which runs gRPC's fork handlers in a parent that uses gRPC (the stack tests, the
# reward server) and aborted the child before exec; without it subprocess uses vfork.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it is SIGKILLed when the calling thread's process dies (Linux; other
    systems run ``argv`` as it is).

    The signal fires when the *thread* that spawned the child exits, so spawn from a long-lived
    thread (the main thread or an event loop's)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


# -- reaping what the started servers leave behind ----------------------------------------------
PR_SET_CHILD_SUBREAPER = 36
# How long stop() waits, after its SIGKILL, for the last processes to be gone (zombies reaped).
GONE_TIMEOUT_S = 10.0
_subreaper = False


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    A server's workers outlive their leader for a moment (SGLang's launch_server SIGKILLs its
    scheduler and exits without reaping it); orphans then go to init, and an init that reaps late
    (seconds here) or never (a container whose PID 1 is a plain program) leaves the group
    existing after stop(). As their subreaper this process reaps them itself (``reap_adopted``)."""
    global _subreaper
    if _subreaper or not sys.platform.startswith("linux"):
        return _subreaper
    import ctypes

    try:
        _subreaper = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        _subreaper = False
    return _subreaper


def reap_adopted(pgids: Collection[int]) -> None:
    """Reap the zombies this process adopted (as subreaper) from the groups ``pgids``.

    Only adopted ones: the leaders this process started itself are its ``Popen`` objects' to reap
    (a group's leader is never adopted into its own group), so no ``Popen`` loses its exit code."""
    me = os.getpid()
    table = process_table() or {}
    for info in table.values():
        if info.ppid == me and not info.running and info.pgid in pgids and info.pid not in _started_pids():
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(info.pid, os.WNOHANG)


def _started_pids() -> set[int]:
    with _LIVE_LOCK:
        return {proc.pid for proc in _LIVE}


def _exists(pgids: Collection[int], procs: Sequence[ProcInfo]) -> list[str]:
    """What is left of the groups ``pgids`` and of ``procs``, zombies included (``kill -0``)."""
    left = []
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
            left.append(f"group {pgid}")
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's reused group id: not ours
            pass
    for p in procs:
        now = proc_info(p.pid)
        if now is not None and now.start == p.start:
            left.append(f"pid {p.pid} ({now.state})")
    return left


def wait_gone(pgids: Collection[int], procs: Sequence[ProcInfo] = (), timeout: float = GONE_TIMEOUT_S) -> list[str]:
    """Wait until no process of the groups ``pgids`` and none of ``procs`` exists, reaping the
    zombies this process adopted; returns what is still left after ``timeout`` (logged: a zombie
    whose reaper never reaps is beyond this process)."""
    deadline = time.monotonic() + timeout
    while True:
        reap_adopted(pgids)
        left = _exists(pgids, procs)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if left:
        log.warning("still present %.0fs after stop: %s", timeout, ", ".join(left))
    return left


_LIVE: set["ServerProcess"] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        proc.stop(timeout=5.0)


atexit.register(_stop_all_at_exit)


class ServerProcess:
    """One server subprocess in its own process group, healthy when ``GET /health`` answers 200."""

    def __init__(self, popen: subprocess.Popen[bytes], url: str, log_path: Path | None, name: str) -> None:
        self._popen = popen
        self.url = url.rstrip("/")
        self.log_path = log_path
        self.name = name
        self.pgid = popen.pid  # start_new_session=True: the leader's pid is the group id
        with _LIVE_LOCK:
            _LIVE.add(self)
        pid_file = os.environ.get(PID_FILE_ENV)
        if pid_file:
            # One short O_APPEND write per line: concurrent writers (the orchestrator and the
            # reward server it started) do not interleave.
            with open(pid_file, "a") as f:
                f.write(f"{name} {self.pgid}\n")

    # -- start -------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        command: LaunchCommand | Sequence[str],
        *,
        url: str,
        log_path: str | Path | None,
        env: Mapping[str, str] | None = None,
        name: str = "sglang",
        die_with_parent: bool = True,
    ) -> "ServerProcess":
        """Spawn ``command`` (a ``LaunchCommand`` or an argv) with output appended to ``log_path``
        (None: to this process's stdout/stderr).

        ``die_with_parent``: the child is SIGKILLed when the calling thread's process dies (see
        ``die_with_parent_argv``: call from a thread that lives as long as the child should)."""
        if isinstance(command, LaunchCommand):
            argv, run_env = command.argv, command.env
        else:
            argv, run_env = list(command), dict(os.environ if env is None else env)
        # Orphaned workers of the server come to this process, which reaps them in stop().
        become_subreaper()
        path = Path(log_path) if log_path is not None else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # No path: the child writes to the caller's stdout/stderr (a container's log, rotated by its runtime).
        with open(path, "ab") if path is not None else contextlib.nullcontext() as log:
            if log is not None:
                log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start {name}: {' '.join(argv)}\n".encode())
                log.flush()
            popen = subprocess.Popen(
                die_with_parent_argv(argv) if die_with_parent else argv, env=run_env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT if log is not None else None, start_new_session=True,
            )
        return cls(popen, url, path, name)

    @classmethod
    def launch(cls, config: LaunchConfig, *, log_path: str | Path | None, name: str = "sglang",
               port_setting: str = "port") -> "ServerProcess":
        """Build the SGLang command for ``config`` and start it (not yet waited for). A port
        already in use raises ``PortInUseError`` naming ``port_setting`` before anything starts."""
        command = build_command(config)
        check_port_free(config.host, config.port, port_setting)
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

    @property
    def log_where(self) -> str:
        """Where the server's output goes, for error messages."""
        return f"log: {self.log_path}" if self.log_path is not None else "log: this process's stdout"

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None:
            return "<the server logs to this process's stdout>"
        return file_tail(self.log_path, lines)

    def _port(self) -> int | None:
        return urllib.parse.urlsplit(self.url).port

    def owns_port(self) -> bool:
        """Whether the socket listening on the URL's port belongs to this process or one of its
        descendants. True when procfs cannot tell, for a URL without a port, or when nothing
        listens (the next probe decides)."""
        port = self._port()
        if port is None or not listening_inodes(port):
            return True
        mine = [self.pid, *(p.pid for p in descendants(self.pid))]
        return bool(port_holders(port, mine))

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
                    f"({self.log_where})", self.log_tail()
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerStartError(
                    f"{self.name} not healthy after {timeout:.0f}s at {self.url} ({self.log_where})",
                    self.log_tail(),
                )
            if self.check_health(timeout=min(10.0, max(remaining, 0.1))):
                if not self.owns_port():
                    # An old server (e.g. an orphaned engine) answers on our port; ours will not
                    # be able to bind it, so waiting longer cannot help.
                    others = "; ".join(describe(p) for p in port_holders(self._port() or 0) or []) or "unknown"
                    raise ServerStartError(
                        f"{self.name}: {self.url} answered /health, but the port is held by another process "
                        f"({others}), not by the one started (pid {self.pid}) ({self.log_where})",
                        self.log_tail())
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
        table = process_table()
        if table is None:  # no procfs: trust the signal probe
            return True
        return any(p.pgid == self.pgid and p.running for p in table.values())

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the leader, wait up to ``timeout``, then SIGKILL what is left of the group and
        of the leader's descendants in other groups (a reward server's PRM engine).

        Only the leader gets SIGTERM, as a container runtime would send it to PID 1: SGLang's
        HTTP server drains and stops its scheduler/detokenizer itself, a reward server stops its
        PRM engine. Signalling the whole group makes the scheduler die first, which SGLang treats
        as a crash (SIGQUIT, 5 s diagnostics sleep, then SIGKILL of itself). Returns the leader's
        exit code. Idempotent."""
        # Taken before any signal: once the leader is gone its children are reparented and can no
        # longer be told from anyone else's.
        others = [p for p in descendants(self.pid) if p.pgid != self.pgid] if self.is_alive() else []
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
            while (self._group_alive() or still_running(others)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._group_alive() or self.is_alive():
                self._signal_group(signal.SIGKILL)
            try:
                self._popen.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
        for p in still_running(others):
            # A descendant in a group of its own that outlived the leader (its own children
            # follow it by their parent-death signal or its group).
            try:
                if p.pgid == p.pid:
                    os.killpg(p.pgid, signal.SIGKILL)
                else:
                    os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        # Returned only once nothing is left: a SIGKILLed process takes a moment to die, and the
        # workers a leader leaves behind are zombies until someone reaps them.
        wait_gone({self.pgid, *(p.pgid for p in others)}, others)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return self._popen.returncode

    async def stop_async(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        return await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else f"exited({self.returncode})"
        return f"ServerProcess(name={self.name!r}, pid={self.pid}, url={self.url!r}, {state})"


def local_url(config: LaunchConfig) -> str:
    """Where this host reaches a server launched with ``config``: loopback for a wildcard bind
    (0.0.0.0 / ::), else the bound address itself."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    return f"http://[{host}]:{config.port}" if ":" in host else f"http://{host}:{config.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0); for tests and local runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_server(
    config: LaunchConfig,
    *,
    log_path: str | Path,
    name: str = "sglang",
    timeout: float = DEFAULT_START_TIMEOUT_S,
) -> ServerProcess:
    """Launch ``config`` and wait until healthy; on failure stop the process and re-raise."""
    proc = ServerProcess.launch(config, log_path=log_path, name=name)
    try:
        proc.wait_healthy(timeout=timeout)
    except BaseException:
        proc.stop(timeout=5.0)
        raise
    return proc
