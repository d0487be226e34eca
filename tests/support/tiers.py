"""Test tiers: every test gets one of the markers ``pure``, ``models``, ``sglang`` or ``containers``
(pyproject.toml).

- ``containers``: marked explicitly by its module (builds and runs images with podman);
- ``sglang``: marked explicitly, or uses a fixture that starts real SGLang engines
  (``SGLANG_FIXTURES``, directly or through other fixtures);
- ``models``: marked explicitly, or uses a fixture that loads a real model's weights on the CPU
  (``MODEL_FIXTURES``: SmolLM2 through transformers) without starting SGLang: seconds to minutes;
- ``pure``: everything else: no SGLang engine, no container (in-process servers, our own
  subprocesses, tiny transformers models, offline tools).

So ``pytest -m pure`` is the fast tier. Fixture use cannot see an SGLang server started by a
test's own subprocess, so the tier is also checked at run time: a ``pure`` test after whose
call an SGLang engine or router started by this pytest process is alive fails, asking for the
``sglang`` marker.
"""
from __future__ import annotations

import os
from typing import Generator

import pytest

TIERS = ("pure", "models", "sglang", "containers")
# Fixtures that start real SGLang engines (conftest.py): using one puts a test in the sglang tier.
SGLANG_FIXTURES = frozenset({"sglang_servers"})
# Fixtures that load real model weights (conftest.py): using one (and no SGLang) is the models tier.
MODEL_FIXTURES = frozenset({"smollm2"})
# Command-line fragments of SGLang processes: the engine (policy-serve execs into it) and the router.
_SGLANG_CMDLINES = (b"sglang.launch_server", b"sglang_router")

_before: dict[str, set[int]] = {}


def tier_of(item: pytest.Item) -> str:
    if item.get_closest_marker("containers") is not None:
        return "containers"
    if item.get_closest_marker("sglang") is not None or SGLANG_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "sglang"
    if item.get_closest_marker("models") is not None or MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "models"
    return "pure"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))


def _sglang_descendants() -> set[int]:
    """PIDs of SGLang engines/routers descended from this process (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
            parents[int(entry.name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    me = os.getpid()
    found: set[int] = set()
    for pid in parents:
        p = parents[pid]
        while p > 1 and p != me:
            p = parents.get(p, 0)
        if p != me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if any(s in cmdline for s in _SGLANG_CMDLINES):
            found.add(pid)
    return found


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    if tier_of(item) in ("pure", "models"):
        _before[item.nodeid] = _sglang_descendants()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    result = yield
    before = _before.pop(item.nodeid, None)
    if before is not None:
        started = _sglang_descendants() - before
        if started:
            pytest.fail(f"this test is in a tier without SGLang but started SGLang (pids {sorted(started)}): "
                        "mark it pytest.mark.sglang", pytrace=False)
    return result
