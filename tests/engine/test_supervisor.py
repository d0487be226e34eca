"""``EngineSupervisor`` over a real SGLang CPU engine (the tiny math-shepherd PRM): an engine
killed while an old server squats on its port (answering ``/health`` like an orphaned engine
would) is not taken for up, the respawn is refused naming the setting and backs off (doubling),
the engine comes back once the port is free, and an engine that dies again at once does not reset
the backoff."""
from __future__ import annotations

import asyncio
import dataclasses
import http.server
import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from ets.engine.launcher import LaunchConfig
from ets.engine.process import free_port
from ets.engine.procfs import descendants, still_running
from ets.engine.supervisor import RESTART_BACKOFF, EngineSupervisor, EngineUnavailable

from tools import HealthOk

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(900)]

START_TIMEOUT_S = 400.0
BACKOFF_S = 2.0


def _squat(port: int, timeout: float = 30.0) -> http.server.ThreadingHTTPServer:
    """Bind ``port`` as soon as the killed engine has released it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", port), HealthOk)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def _backoffs(records: list[logging.LogRecord]) -> list[float]:
    found = []
    for r in records:
        m = re.search(r"restarting in ([0-9.]+)s", r.getMessage())
        if m:
            found.append(float(m.group(1)))
    return found


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_squatted_port_is_refused_with_growing_backoff_and_crash_loops_do_not_reset_it(
    tmp_path: Path, tiny_model_factory: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ets.engine.supervisor")
    port = free_port()
    launch = LaunchConfig(model_path=str(tiny_model_factory("math-shepherd")), host="127.0.0.1", port=port,
                          device="cpu", served_name="prm")
    restarts: list[float] = []
    sup = EngineSupervisor(launch=launch, name="PRM", port_setting="ETS_PRM_PORT", log_dir=tmp_path,
                           start_timeout_s=START_TIMEOUT_S, poll_s=0.2,
                           restart_backoff=dataclasses.replace(RESTART_BACKOFF, initial_backoff_s=BACKOFF_S),
                           stable_after_s=3600.0, on_restart=lambda: restarts.append(time.monotonic()))
    squatter: http.server.ThreadingHTTPServer | None = None
    try:
        await sup.start()
        assert sup.is_up()
        first = sup.process
        assert first is not None
        engine = [*descendants(first.pid)]
        assert engine, "SGLang's scheduler/detokenizer not found under the engine"

        os.killpg(first.pgid, signal.SIGKILL)
        squatter = await asyncio.to_thread(_squat, port)
        # Three refusals: 2 s, 4 s, 8 s apart; the squatter's 200s never make the engine "up".
        await _until(lambda: len(_backoffs(caplog.records)) >= 3, 60, "three restart attempts")
        assert not sup.is_up() and restarts == []
        assert _backoffs(caplog.records)[:3] == [BACKOFF_S, 2 * BACKOFF_S, 4 * BACKOFF_S]
        refused = [r.getMessage() for r in caplog.records if "restart refused" in r.getMessage()]
        assert refused and f"ETS_PRM_PORT: port {port} on 127.0.0.1 is already in use (pid {os.getpid()}" \
            in refused[0], refused
        with pytest.raises(EngineUnavailable, match="PRM server .* is down"):
            await sup.post("/generate", {}, timeout=5)
        assert not still_running(engine), "the killed engine's workers outlived it"

        squatter.shutdown()
        squatter.server_close()
        squatter = None
        await _until(sup.is_up, START_TIMEOUT_S + 60, "the engine back once the port is free")
        second = sup.process
        assert len(restarts) == 1 and second is not None and second is not first and second.owns_port()

        # Dies again at once (long before stable_after_s): the next wait continues to grow.
        waits = len(_backoffs(caplog.records))
        os.killpg(second.pgid, signal.SIGKILL)
        await _until(lambda: len(_backoffs(caplog.records)) > waits, 30, "the next restart attempt")
        assert _backoffs(caplog.records)[waits] > _backoffs(caplog.records)[waits - 1]
    finally:
        if squatter is not None:
            squatter.shutdown()
            squatter.server_close()
        await sup.close()
    with socket.socket() as s:  # close() left nothing on the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
