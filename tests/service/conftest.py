"""The search service's tests (``ets.service``): request checks, conversions, admission, the gRPC
and OpenAI transports, upstreams, hardening; in process, over loopback.

The in-process service fixtures ``svc`` and ``tight`` are defined here."""
from __future__ import annotations

from typing import Any, AsyncIterator

import pytest

from ets.testing.inprocess import Harness, harness_of


@pytest.fixture()
def harness_options() -> dict[str, Any]:
    """What ``svc`` and ``tight`` pass to ``harness_of`` besides the limits (``kind``: the harness
    class, ``script``, ``scores``, settings); a module overrides it for its own script or transport."""
    return {}


@pytest.fixture()
async def svc(harness_options: dict[str, Any]) -> AsyncIterator[Harness]:
    """The in-process service, four running slots and four queue places."""
    options = dict(harness_options)
    async with harness_of(options.pop("kind", Harness), max_concurrent=4, max_queued=4, **options) as h:
        yield h


@pytest.fixture()
async def tight(harness_options: dict[str, Any]) -> AsyncIterator[Harness]:
    """The in-process service with one running slot and one queue place."""
    options = dict(harness_options)
    async with harness_of(options.pop("kind", Harness), max_concurrent=1, max_queued=1, **options) as h:
        yield h
