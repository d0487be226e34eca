"""Helpers every test area shares, written once: command-line tools (hadolint, kubectl, promtool,
grpcurl, prometheus, ...), a free loopback port, a plain HTTP GET, and the small search config
the real-stack tests send to the tiny models."""
from __future__ import annotations

import http.server
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from ets.api.v1 import search_pb2
from ets.engine.process import free_port

__all__ = ["BIN", "free_port", "http_get", "metric", "read_pid", "small", "tool", "wait_http"]

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The venv's copy of a tool, else the system's; fail (not skip) when neither exists."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed (scripts/install.sh / scripts/install-system.sh install it)"
    return found


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_http(url: str, *, what: str, alive: Callable[[], bool], log_tail: Callable[[], str],
              stop: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers; if the process exits or ``timeout`` passes first, stop it
    and fail with its log tail."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise RuntimeError(f"{what} exited early:\n{log_tail()}")
        try:
            http_get(url)
            return
        except OSError:
            if time.monotonic() > deadline:
                stop()
                raise RuntimeError(f"{what} did not come up within {timeout:.0f}s:\n{log_tail()}") from None
            time.sleep(0.2)


def small(method: str = "rebase", width: int = 4, **extra: object) -> search_pb2.SearchConfig:
    """A search short enough for the tiny CPU models (12-token steps, 96 tokens, 4 depths)."""
    values: dict[str, Any] = dict(method=method, width=width, max_step_tokens=12, max_tokens=96, max_depth=4)
    values.update(extra)
    return search_pb2.SearchConfig(**values)


class HealthOk(http.server.BaseHTTPRequestHandler):
    """Answers 200 "ok" on any GET: what a stranger (an orphaned engine) on a port says to /health."""

    def do_GET(self) -> None:  # the stdlib's handler name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted((m.group(3) or "").split(","))) if m.group(3) else ""
        if got == want:
            return float(m.group(4))
    return 0.0


def read_pid(log: Path, prefix: str, timeout: float = 20) -> int:
    """The pid a test's child process printed to ``log`` on a line ``<prefix><pid>`` (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines() if log.exists() else []:
            if line.startswith(prefix):
                return int(line.split()[1])
        time.sleep(0.05)
    raise AssertionError(f"no {prefix!r} line in {log}:\n{log.read_text() if log.exists() else ''}")
