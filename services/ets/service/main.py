"""``ets serve``: the search service's command line (settings, logging, signals, run until stopped).

    ets serve [--port 50051] [--metrics-port 9091] [--policy-url URL] [--policy-engine-url URL]
              [--reward-addr HOST:PORT] [--grace 30] [--max-concurrent N] [--max-queued N]

Environment: ETS_POLICY_URL, ETS_POLICY_ENGINE_URL (set when ETS_POLICY_URL is an sglang-router:
one engine for tokenization; see ets.policy.client), ETS_REWARD_ADDR, ETS_SEARCH_HOST,
ETS_SEARCH_PORT, ETS_SEARCH_METRICS_PORT, ETS_MAX_CONCURRENT_SEARCHES, ETS_MAX_QUEUED_SEARCHES,
ETS_SEARCH_GRACE_S, ETS_LOG_LEVEL, ETS_SEARCH_* (search defaults, ``SearchConfig.from_env``).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Awaitable, Callable

import prometheus_client

from ets.config import ConfigError, SearchConfig
from ets.search.selection import validate
from ets.service.admission import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED
from ets.service.metrics import metrics_port_from_env
from ets.service.server import DEFAULT_GRACE_S, DEFAULT_PORT, SearchServer, ServiceSettings

log = logging.getLogger("ets.service")


def settings_from_args(argv: list[str], env: dict[str, str] | None = None) -> ServiceSettings:
    env = dict(os.environ if env is None else env)
    parser = argparse.ArgumentParser(prog="ets serve", description="run the gRPC search service")
    parser.add_argument("--host", default=env.get("ETS_SEARCH_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(env.get("ETS_SEARCH_PORT", DEFAULT_PORT)))
    parser.add_argument("--metrics-port", type=int, default=metrics_port_from_env(),
                        help="Prometheus endpoint port (ETS_SEARCH_METRICS_PORT); -1 disables it")
    parser.add_argument("--policy-url", default=env.get("ETS_POLICY_URL", "http://policy:30000"))
    parser.add_argument("--policy-engine-url", default=env.get("ETS_POLICY_ENGINE_URL", ""),
                        help="when --policy-url is an sglang-router: one policy engine, for tokenization")
    parser.add_argument("--reward-addr", default=env.get("ETS_REWARD_ADDR", "reward:50052"))
    parser.add_argument("--grace", type=float, default=float(env.get("ETS_SEARCH_GRACE_S", DEFAULT_GRACE_S)),
                        help="seconds in-flight searches may finish after SIGTERM")
    parser.add_argument("--max-concurrent", type=int,
                        default=int(env.get("ETS_MAX_CONCURRENT_SEARCHES", DEFAULT_MAX_CONCURRENT)))
    parser.add_argument("--max-queued", type=int, default=int(env.get("ETS_MAX_QUEUED_SEARCHES", DEFAULT_MAX_QUEUED)))
    parser.add_argument("--log-level", default=env.get("ETS_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_concurrent < 1:
        parser.error("--max-concurrent (ETS_MAX_CONCURRENT_SEARCHES) must be at least 1")
    if args.max_queued < 0:
        parser.error("--max-queued (ETS_MAX_QUEUED_SEARCHES) must be at least 0")
    # Checked here, not when the first search creates the policy client.
    for flag, env_name, url in (("--policy-url", "ETS_POLICY_URL", args.policy_url),
                                ("--policy-engine-url", "ETS_POLICY_ENGINE_URL", args.policy_engine_url)):
        if url and not url.startswith(("http://", "https://")):
            parser.error(f"{flag} ({env_name}): expected http(s)://host:port, got {url!r}")
    return ServiceSettings(
        port=args.port, host=args.host, metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        policy_url=args.policy_url, policy_engine_url=args.policy_engine_url or None,
        reward_addr=args.reward_addr, grace_s=args.grace,
        max_concurrent=args.max_concurrent, max_queued=args.max_queued,
    )


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
    # One series per counter: the *_created gauges only double the exposition.
    prometheus_client.disable_created_metrics()
    try:
        defaults = validate(SearchConfig.from_env())
    except ConfigError as err:
        print(f"ets serve: bad search default ETS_SEARCH_{err.field.upper()}: {err.message}", file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(serve(settings, defaults))


if __name__ == "__main__":
    main(sys.argv[1:])
