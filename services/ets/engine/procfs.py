"""What Linux's /proc says about processes and listening sockets (no process is started here).

Owns the process table (``ProcInfo``: pid, parent, group, state and start time, so that a later
process reusing a pid is not taken for the one seen before), a process's descendants in any
group or session, which processes hold a socket listening on a port, and the port-free check
that names its holder (``PortInUseError``). Every reader returns None or an empty answer where
procfs cannot tell (another system, another user's process), and its callers decide what that
means. Used by the subprocess supervision in ``ets.engine.process`` and ``ets.engine.supervisor``.
"""
from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence


class PortInUseError(RuntimeError):
    """A server's port is already taken by another process; ``field`` names the setting."""

    def __init__(self, field: str, host: str, port: int, holders: str) -> None:
        super().__init__(f"{field}: port {port} on {host} is already in use{holders}; stop that process or "
                         f"choose another port (a server is only started on a free port, so that an old one "
                         f"answering there is never taken for it)")
        self.field = field
        self.host = host
        self.port = port


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    start: int  # clock ticks after boot: tells a process from a later one that reuses its pid

    @property
    def running(self) -> bool:
        """Not a zombie: orphans reparented to a PID 1 that never reaps them stay zombies."""
        return self.state not in ("Z", "X")


def proc_info(pid: int) -> ProcInfo | None:
    """One process's entry, or None when it is gone or procfs cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # After "pid (comm)": state, ppid, pgrp, session, ..., starttime is field 22 (index 19 here).
        return ProcInfo(pid, int(fields[1]), int(fields[2]), fields[0].decode(), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def process_table() -> dict[int, ProcInfo] | None:
    """Every process visible in /proc, or None without procfs."""
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return None
    table = {}
    for pid in pids:
        info = proc_info(pid)
        if info is not None:
            table[pid] = info
    return table


def descendants(pid: int, table: Mapping[int, ProcInfo] | None = None) -> list[ProcInfo]:
    """Children, grandchildren, ... of ``pid``, whatever process group or session they are in."""
    table = process_table() if table is None else table
    if not table:
        return []
    children: dict[int, list[ProcInfo]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def still_running(procs: Sequence[ProcInfo]) -> list[ProcInfo]:
    """Those of ``procs`` still running (same pid and start time, not a zombie)."""
    left = []
    for p in procs:
        now = proc_info(p.pid)
        if now is not None and now.start == p.start and now.running:
            left.append(now)
    return left


def listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6), or None without procfs."""
    inodes: set[str] = set()
    seen = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            cols = line.split()
            # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN.
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes if seen else None


def port_holders(port: int, pids: Sequence[int] | None = None) -> list[int] | None:
    """Pids (of ``pids``, default all visible) holding a socket listening on ``port``; None when
    procfs cannot tell."""
    inodes = listening_inodes(port)
    if inodes is None:
        return None
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    if pids is None:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    holders = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    holders.append(pid)
                    break
            except OSError:
                continue
    return holders


def describe(pid: int) -> str:
    """``pid`` and its command line (shortened), for error messages."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return f"pid {pid}: " + " ".join(a.decode(errors="replace") for a in argv if a)[:160]
    except OSError:
        return f"pid {pid}"


def check_port_free(host: str, port: int, field: str = "port") -> None:
    """Raise ``PortInUseError`` (naming ``field`` and, where visible, the holder) when ``port``
    cannot be bound on ``host``. SO_REUSEADDR as servers use it: a port whose last connections
    are in TIME_WAIT is free."""
    bind_host = "" if host in ("0.0.0.0", "::", "") else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            pids = port_holders(port) or []
            holders = f" ({'; '.join(describe(p) for p in pids)})" if pids else ""
            raise PortInUseError(field, host or "0.0.0.0", port, holders) from None
