"""The search service in-process over scripted upstreams: one real ``SearchServer`` (gRPC on a
free loopback port, the OpenAI port only when asked) for the fast test tier.

``serving(upstreams, **settings)`` starts it with small defaults and its own metrics registry,
yields the running server, and on exit releases any held expansion and stops it without grace,
so every in-process test module builds its server the same way.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator

from ets.config import SearchConfig
from ets.search.answers import Grouping, group_answers
from ets.service.metrics import SearchMetrics
from ets.service.server import SearchServer
from ets.service.settings import ServiceSettings
from ets.testing.upstreams import ScriptedUpstreams

# Small searches over the scripted three-depth trees the tests write.
DEFAULTS = SearchConfig(method="rebase", width=2, max_step_tokens=5, max_tokens=200, max_depth=5, seed=1)
SETTINGS = ServiceSettings(host="127.0.0.1", port=0, metrics_port=None, openai_port=None, grace_s=1)


@asynccontextmanager
async def serving(upstreams: ScriptedUpstreams, *, defaults: SearchConfig = DEFAULTS,
                  grouping: Grouping = group_answers, **settings: Any) -> AsyncIterator[SearchServer]:
    """A started ``SearchServer`` over ``upstreams``; ``settings`` override ``SETTINGS`` fields."""
    server = SearchServer(replace(SETTINGS, **settings), defaults, upstreams=upstreams,
                          metrics=SearchMetrics(process_metrics=False), grouping=grouping)
    await server.start()
    try:
        yield server
    finally:
        upstreams.release()
        await server.stop(grace=0)
