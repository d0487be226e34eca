"""``ets reward-serve`` supervising its own SGLang PRM server (the default deployment shape).

A real reward-server process spawns a real SGLang CPU PRM server; the test kills that PRM's
whole process group: Score turns UNAVAILABLE and health NOT_SERVING while Embed keeps working,
the supervisor restarts the PRM (backoff), scoring comes back with the same scores, the restart
is counted in the metrics, and SIGTERM then stops the reward server and its PRM subprocess.
A reward server killed with SIGKILL of its process group (no cleanup code runs) takes its PRM
engine along: the engine runs in a session of its own, so only its parent-death signal reaches it,
and SGLang's scheduler and detokenizer follow theirs; the PRM port is free again.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import grpc
import psutil
import pytest

from ets.api.v1 import reward_pb2, reward_pb2_grpc
from ets.engine.process import free_port
from ets.engine.procfs import ProcInfo, descendants, still_running
from ets.healthcheck import check

pytestmark = pytest.mark.sglang

START_TIMEOUT_S = 400.0
REQUEST = reward_pb2.ScoreRequest(trajectories=[
    reward_pb2.Trajectory(question="What is 3 + 5?", steps=["we add the numbers", "so 3 + 5 = 8", "The answer is 8"]),
    reward_pb2.Trajectory(question="What is 2x if x = 4?", steps=["2x = 8"]),
])


def _prm_leaders(reward_pid: int) -> list[psutil.Process]:
    leaders = []
    for child in psutil.Process(reward_pid).children(recursive=False):
        try:
            if any("sglang.launch_server" in part for part in child.cmdline()):
                leaders.append(child)
        except psutil.NoSuchProcess:
            pass
    return leaders


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"reward server exited ({proc.returncode}) while waiting for {what}:\n"
                        f"{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.25)


def _health(address: str) -> str:
    try:
        return check(address, "ets.api.v1.RewardService")
    except grpc.RpcError:
        return "ERROR"


def _score_code(stub: reward_pb2_grpc.RewardServiceStub) -> tuple[grpc.StatusCode, list[list[float]]]:
    try:
        reply = stub.Score(REQUEST, timeout=60)
        return grpc.StatusCode.OK, [list(r.scores) for r in reply.results]
    except grpc.RpcError as err:
        return err.code(), []


def test_supervised_prm_restarts_after_crash_and_sigterm_stops_it(
    tmp_path: Path, tiny_model_factory: Callable[[str], Path]
) -> None:
    ready, log = tmp_path / "ready", tmp_path / "reward.log"
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", ETS_DEVICE="cpu", ETS_PRM_MODEL=str(tiny_model_factory("math-shepherd")),
        ETS_PRM_TYPE="math-shepherd", ETS_PRM_BACKEND="sglang", ETS_PRM_PORT=str(free_port()),
        ETS_REWARD_HOST="127.0.0.1", ETS_REWARD_PORT="0", ETS_REWARD_METRICS_PORT="0",
        ETS_REWARD_LOG_DIR=str(tmp_path / "prm-logs"), ETS_PRM_START_TIMEOUT_S=str(START_TIMEOUT_S),
        # As in the images: the PRM binds all interfaces (for Prometheus), the supervisor still
        # reaches it over loopback.
        ETS_PRM_HOST="0.0.0.0",
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ets.cli", "reward-serve", "--ready-file", str(ready)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    prm_groups: set[int] = set()
    try:
        _wait(lambda: ready.exists() and bool(ready.read_text().strip()), 120, "the ready file", proc, log)
        port, metrics_port = (int(x) for x in ready.read_text().split())
        address = f"127.0.0.1:{port}"
        _wait(lambda: _health(address) == "SERVING", START_TIMEOUT_S, "SERVING", proc, log)
        leaders = _prm_leaders(proc.pid)
        assert len(leaders) == 1, leaders
        argv = leaders[0].cmdline()
        assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv.count("--host") == 1, argv
        first = leaders[0].pid
        prm_groups.add(first)

        with grpc.insecure_channel(address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            code, before = _score_code(stub)
            assert code == grpc.StatusCode.OK and [len(s) for s in before] == [3, 1]

            os.killpg(first, signal.SIGKILL)  # the PRM server and its scheduler/detokenizer
            _wait(lambda: _score_code(stub)[0] == grpc.StatusCode.UNAVAILABLE, 30, "UNAVAILABLE", proc, log)
            _wait(lambda: _health(address) == "NOT_SERVING", 30, "NOT_SERVING", proc, log)
            assert proc.poll() is None
            assert len(stub.Embed(reward_pb2.EmbedRequest(texts=["still embedding"]), timeout=30).embeddings) == 1

            _wait(lambda: _health(address) == "SERVING", START_TIMEOUT_S, "SERVING after the restart", proc, log)
            code, after = _score_code(stub)
            assert code == grpc.StatusCode.OK
            assert after == [pytest.approx(s, abs=1e-3) for s in before]
        leaders = _prm_leaders(proc.pid)
        assert len(leaders) == 1 and leaders[0].pid != first
        second = leaders[0].pid
        prm_groups.add(second)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "ets_reward_prm_restarts_total 1.0" in metrics
        assert "ets_reward_backend_up 1.0" in metrics

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while _group_alive(second) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(second), "SIGTERM left the PRM SGLang server running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pgid in prm_groups:
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)


def test_sigkilled_reward_server_takes_its_prm_engine_along(
    tmp_path: Path, tiny_model_factory: Callable[[str], Path]
) -> None:
    ready, log = tmp_path / "ready", tmp_path / "reward.log"
    prm_port = free_port()
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", ETS_DEVICE="cpu", ETS_PRM_MODEL=str(tiny_model_factory("math-shepherd")),
        ETS_PRM_TYPE="math-shepherd", ETS_PRM_BACKEND="sglang", ETS_PRM_PORT=str(prm_port),
        ETS_REWARD_HOST="127.0.0.1", ETS_REWARD_PORT="0", ETS_REWARD_METRICS_PORT="0",
        ETS_REWARD_LOG_DIR=str(tmp_path / "prm-logs"), ETS_PRM_START_TIMEOUT_S=str(START_TIMEOUT_S),
    )
    with open(log, "wb") as out:
        # Its own process group, as under the stack orchestrator or a container runtime.
        proc = subprocess.Popen([sys.executable, "-m", "ets.cli", "reward-serve", "--ready-file", str(ready)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    engine: list[ProcInfo] = []
    try:
        _wait(lambda: ready.exists() and bool(ready.read_text().strip()), 120, "the ready file", proc, log)
        address = f"127.0.0.1:{ready.read_text().split()[0]}"
        _wait(lambda: _health(address) == "SERVING", START_TIMEOUT_S, "SERVING", proc, log)
        engine = descendants(proc.pid)
        leaders = _prm_leaders(proc.pid)
        assert len(leaders) == 1, leaders
        # The engine's leader and its workers (scheduler, detokenizer), outside the reward server's group.
        assert len([p for p in engine if p.pgid == leaders[0].pid]) >= 3, engine
        assert all(p.pgid != proc.pid for p in engine if p.pgid == leaders[0].pid)

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while still_running(engine) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not still_running(engine), f"left running after the reward server was killed: {still_running(engine)}"
        with socket.socket() as s:  # the PRM port is free for the next reward server
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", prm_port))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in still_running(engine):
            os.kill(p.pid, signal.SIGKILL)
