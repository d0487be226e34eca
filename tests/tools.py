"""Helpers every test area shares, written once: command-line tools (hadolint, kubectl, promtool,
grpcurl, prometheus, ...), a free loopback port, a plain HTTP GET, and the small search config
the real-stack tests send to the tiny models."""
from __future__ import annotations

import shutil
import sys
import urllib.request
from pathlib import Path

from ets.api.v1 import search_pb2
from ets.engine.process import free_port

__all__ = ["BIN", "free_port", "http_get", "small", "tool"]

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


def small(method: str = "rebase", width: int = 4, **extra: object) -> search_pb2.SearchConfig:
    """A search short enough for the tiny CPU models (12-token steps, 96 tokens, 4 depths)."""
    values: dict[str, object] = dict(method=method, width=width, max_step_tokens=12, max_tokens=96, max_depth=4)
    values.update(extra)
    return search_pb2.SearchConfig(**values)
