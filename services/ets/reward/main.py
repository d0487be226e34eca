"""``ets reward-serve``: the reward server's command line (flags over ``ETS_*`` settings), logging,
signals and exit codes (2 for a bad setting, naming it). The server itself is ``ets.reward.server``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Mapping, Sequence

from ets import settings
from ets.errors import SettingError
from ets.reward.adapters import AdapterError
from ets.reward.server import RewardServer, log
from ets.reward.settings import RewardServerConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ets reward-serve", description="Run the reward server (PRM + embedder, gRPC). "
                                "Flags override the environment variables named in their help.")
    settings.add_flags(p, RewardServerConfig)
    p.add_argument("--ready-file", help="write 'PORT METRICS_PORT' here once serving (tests, scripts)")
    return p


def config_from_args(argv: Sequence[str],
                     env: Mapping[str, str] | None = None) -> tuple[RewardServerConfig, str | None]:
    args = _parser().parse_args(list(argv))
    env = os.environ if env is None else env
    config = settings.from_args(RewardServerConfig, args, env=env, base=RewardServerConfig.env_base(env),
                                error=SettingError)
    return config, args.ready_file


async def _serve(config: RewardServerConfig, ready_file: str | None) -> int:
    server = RewardServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start(wait_backend=False)
        if ready_file:
            Path(ready_file).write_text(f"{server.port} {server.metrics_port}\n")
        backend_task = server._backend_task
        assert backend_task is not None
        stop_wait = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({backend_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if backend_task in done and backend_task.exception() is not None:
            exc = backend_task.exception()
            log.error("PRM backend failed to start: %s", exc)
            stop_wait.cancel()
            return 1
        await stop_wait
        # Readiness off first: NOT_SERVING while still serving, so balanced clients (health-checked
        # round_robin) move their calls to other replicas before this one stops accepting any.
        log.info("signal received: NOT_SERVING for %.0fs, then draining for up to %.0fs", config.drain_delay_s,
                 config.grace_s)
        await server.health.enter_graceful_shutdown()
        await asyncio.sleep(config.drain_delay_s)
        return 0
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    try:
        config, ready_file = config_from_args(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config.validate()
        code = asyncio.run(_serve(config, ready_file))
    except (SettingError, AdapterError) as exc:
        print(f"ets reward-serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
