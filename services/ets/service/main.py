"""``ets serve``: the search service's command line (settings, logging, signals, run until stopped).

    ets serve [--port 50051] [--openai-port 8000] [--metrics-port 9091] [--policy-url URL] [--policy-engine-url URL]
              [--reward-addr HOST:PORT] [--grace 30] [--max-concurrent N] [--max-queued N]

Settings (env vars and the flags generated from them): ``ets.service.settings.ServiceSettings``
(``ets settings`` lists them); search defaults: ETS_SEARCH_<FIELD> (``ets.service.settings.search_defaults``).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Awaitable, Callable

import prometheus_client

from ets.search.config import SearchConfig
from ets.errors import SettingError
from ets.service.server import SearchServer
from ets.service.settings import ServiceSettings, search_defaults, settings_from_args

__all__ = ["main", "serve", "settings_from_args"]

log = logging.getLogger("ets.service")


async def serve(settings: ServiceSettings, defaults: SearchConfig,
                ready: Callable[[SearchServer], Awaitable[None]] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    server = SearchServer(settings, defaults)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if ready is not None:
        await ready(server)
    await stop.wait()
    log.info("shutting down: %d search(es) in flight, grace %.0fs", server.admission.running, settings.grace_s)
    await server.stop()
    log.info("stopped")


def main(argv: list[str]) -> None:
    settings = settings_from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One series per counter: the *_created gauges only double the exposition.
    prometheus_client.disable_created_metrics()
    try:
        defaults = search_defaults(settings)
    except SettingError as err:
        print(f"ets serve: bad search default {err}", file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(serve(settings, defaults))


if __name__ == "__main__":
    main(sys.argv[1:])
