"""Process supervision: fail fast with the log tail, stop the whole group by PID (and descendants
that left it), children that die with their parent, a port in use refused before spawning, health
that only counts from the started process, and ``ets policy-serve`` exec'ing real SGLang that shuts
down cleanly on SIGTERM."""
from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from ets.engine.launcher import LaunchConfig
from ets.engine.process import PID_FILE_ENV, ServerProcess, ServerStartError, free_port, reap_adopted
from ets.engine.procfs import PortInUseError

from tools import HealthOk, read_pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_dead_process_fails_fast_with_log_tail(tmp_path: Path) -> None:
    proc = ServerProcess.start(
        [sys.executable, "-c",
         "import sys; print('loading weights'); print('CUDA out of memory', file=sys.stderr); sys.exit(3)"],
        url=f"http://127.0.0.1:{free_port()}", log_path=tmp_path / "dead.log", name="dead",
    )
    start = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        proc.wait_healthy(timeout=60)
    assert time.monotonic() - start < 10  # not the full deadline
    assert "exited with code 3" in str(err.value)
    assert "CUDA out of memory" in err.value.log_tail and "loading weights" in err.value.log_tail
    assert proc.stop() == 3


def test_deadline_when_never_healthy(tmp_path: Path) -> None:
    with ServerProcess.start([sys.executable, "-c", "import time; time.sleep(60)"],
                             url=f"http://127.0.0.1:{free_port()}", log_path=tmp_path / "slow.log",
                             name="slow") as proc:
        with pytest.raises(ServerStartError, match="not healthy after 1s"):
            proc.wait_healthy(timeout=1.0, poll_s=0.1)
        assert proc.is_alive()
    assert not proc.is_alive()


def _forking_leader(tmp_path: Path, name: str, then: str, *, child_ignores_sigterm: bool = False
                    ) -> tuple[ServerProcess, int]:
    """A leader that forks one sleeping child (which prints its pid), then runs ``then``: (leader, child pid)."""
    script = (
        "import os, signal, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        + ("    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if child_ignores_sigterm else "")
        # the child announces itself once set up, so that no test runs before its SIGTERM is ignored
        + "    print('child', os.getpid(), flush=True)\n"
        "    time.sleep(600)\n"
        "    os._exit(0)\n"
        f"{then}\n"
    )
    log = tmp_path / f"{name}.log"
    proc = ServerProcess.start([sys.executable, "-c", script], url="http://127.0.0.1:1", log_path=log, name=name)
    return proc, read_pid(log, "child ")


def test_stop_kills_the_whole_group_including_children_that_ignore_sigterm(tmp_path: Path) -> None:
    # The leader forks a child that ignores SIGTERM (like a stuck worker); the leader exits on it.
    proc, child = _forking_leader(tmp_path, "group", "time.sleep(600)", child_ignores_sigterm=True)
    assert _alive(child)
    start = time.monotonic()
    rc = proc.stop(timeout=1.0)
    assert rc == -signal.SIGTERM
    assert time.monotonic() - start < 8
    time.sleep(0.2)
    assert not _alive(child), "the SIGTERM-ignoring child survived stop()"
    assert proc.stop() == rc  # idempotent


@pytest.mark.sglang
def test_policy_serve_execs_sglang_and_stops_cleanly_on_sigterm(tiny_policy_model: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "ETS_POLICY_MODEL": str(tiny_policy_model), "ETS_DEVICE": "cpu",
           "ETS_POLICY_PORT": str(port), "ETS_POLICY_HOST": "127.0.0.1", "ETS_POLICY_SERVED_NAME": "tiny-policy"}
    proc = ServerProcess.start([sys.executable, "-m", "ets.cli", "policy-serve"], env=env,
                               url=f"http://127.0.0.1:{port}", log_path=tmp_path / "policy-serve.log",
                               name="policy-serve")
    try:
        proc.wait_healthy(timeout=240)
        # exec: the PID we started is SGLang itself, not a wrapper around it.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"sglang.launch_server" in cmdline
        import json
        import urllib.request

        info = json.loads(urllib.request.urlopen(f"{proc.url}/model_info", timeout=30).read())
        assert info["served_model_name"] == "tiny-policy"
        # What a container runtime does to PID 1: SIGTERM to that one process only.
        os.kill(proc.pid, signal.SIGTERM)
        start = time.monotonic()
        while proc.is_alive() and time.monotonic() - start < 60:
            time.sleep(0.2)
        assert not proc.is_alive(), "SGLang did not exit within 60 s of SIGTERM"
        assert proc.returncode == 0, proc.log_tail()
        assert "SIGTERM received" in proc.log_tail(200)
        # Its scheduler, detokenizer and multiprocessing resource tracker go with it. They exit as
        # orphans of this process (the subreaper of what it starts), so they linger as zombies
        # until reaped here, as ServerProcess.stop reaps them (ets.engine.process.reap_adopted).
        leftover = True
        deadline = time.monotonic() + 15
        while leftover and time.monotonic() < deadline:
            reap_adopted([proc.pgid])
            try:
                os.killpg(proc.pgid, 0)
                time.sleep(0.2)
            except ProcessLookupError:
                leftover = False
        assert not leftover, "SGLang left worker processes behind after SIGTERM"
    finally:
        proc.stop()


def test_stop_after_leader_crash_cleans_up_orphaned_workers_quickly(tmp_path: Path) -> None:
    # Like a crashed SGLang leader whose scheduler is still running.
    proc, child = _forking_leader(tmp_path, "crash", "sys.exit(7)")
    deadline = time.monotonic() + 10
    while proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.returncode == 7
    assert _alive(child)
    start = time.monotonic()
    assert proc.stop(timeout=20) == 7
    assert time.monotonic() - start < 5, "stop() waited out its timeout for an orphan that took SIGTERM"
    time.sleep(0.2)
    assert not _alive(child)


def test_local_url_reaches_the_bound_address() -> None:
    from ets.engine.launcher import LaunchConfig
    from ets.engine.process import local_url

    cfg = LaunchConfig(model_path="m", port=30001)
    assert local_url(cfg.replace(host="0.0.0.0")) == "http://127.0.0.1:30001"
    assert local_url(cfg.replace(host="::")) == "http://127.0.0.1:30001"
    assert local_url(cfg.replace(host="10.1.2.3")) == "http://10.1.2.3:30001"
    assert local_url(cfg.replace(host="fd00::5")) == "http://[fd00::5]:30001"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_child_dies_with_its_parent_even_on_sigkill(tmp_path: Path) -> None:
    # A supervisor process (like the reward server) starts a child in a session of its own; the
    # supervisor is then SIGKILLed, which no cleanup code survives: the parent-death signal must.
    log = tmp_path / "parent.log"
    script = (
        "import sys, time\n"
        "from ets.engine.process import ServerProcess\n"
        f"p = ServerProcess.start([sys.executable, '-c', 'import time; time.sleep(600)'], url='http://127.0.0.1:1',"
        f" log_path={str(tmp_path / 'child.log')!r}, name='child')\n"
        "print('child', p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    with open(log, "wb") as out:
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
    try:
        child = read_pid(log, "child ")
        assert _alive(child) and os.getpgid(child) != os.getpgid(parent.pid)  # not reachable by group
        parent.kill()
        parent.wait()
        assert _wait_gone(child, 10), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_stop_reaches_a_descendant_that_left_the_group(tmp_path: Path) -> None:
    # Like a reward server (the leader) whose PRM engine runs in a session of its own: the
    # grandchild is neither in the leader's group nor armed with a parent-death signal here, and
    # it ignores SIGTERM.
    script = (
        "import os, signal, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        # announced only once it has left the group and ignores SIGTERM (the parent printing the pid
        # right after fork raced the child's setsid: CI saw the grandchild still in the group)
        "    print('grandchild', os.getpid(), flush=True)\n"
        "    time.sleep(600)\n"
        "    os._exit(0)\n"
        "time.sleep(600)\n"
    )
    proc = ServerProcess.start([sys.executable, "-c", script], url="http://127.0.0.1:1",
                               log_path=tmp_path / "leader.log", name="leader")
    grandchild = read_pid(tmp_path / "leader.log", "grandchild ")
    assert _alive(grandchild) and os.getpgid(grandchild) != proc.pgid
    assert proc.stop(timeout=1.0) == -signal.SIGTERM
    assert _wait_gone(grandchild, 5), "stop() left the leader's grandchild (own session) running"


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port with a listener on it (this test process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_port_in_use_is_refused_before_spawning_naming_the_setting(tmp_path: Path, held_port: int) -> None:
    cfg = LaunchConfig(model_path="/models/prm", host="127.0.0.1", port=held_port, device="cpu")
    log = tmp_path / "never.log"
    with pytest.raises(PortInUseError) as err:
        ServerProcess.launch(cfg, log_path=log, name="prm-sglang", port_setting="ETS_PRM_PORT")
    message = str(err.value)
    assert message.startswith(f"ETS_PRM_PORT: port {held_port} on 127.0.0.1 is already in use"), message
    assert f"pid {os.getpid()}" in message  # who holds it, where procfs tells
    assert err.value.field == "ETS_PRM_PORT" and err.value.port == held_port
    assert not log.exists()  # nothing was started


def test_health_answered_by_a_stranger_does_not_count(tmp_path: Path) -> None:
    # An old server (here: this test process) answers /health on the port the new one was given;
    # the new one cannot bind it. It must not be reported healthy.
    stranger = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HealthOk)
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    try:
        port = stranger.server_address[1]
        with ServerProcess.start([sys.executable, "-c", "import time; time.sleep(60)"],
                                 url=f"http://127.0.0.1:{port}", log_path=tmp_path / "new.log", name="new") as proc:
            with pytest.raises(ServerStartError, match="held by another process") as err:
                proc.wait_healthy(timeout=20)
            message = str(err.value)
            assert f"pid {os.getpid()}" in message and f"not by the one started (pid {proc.pid})" in message
    finally:
        stranger.shutdown()
        stranger.server_close()


def test_every_start_is_recorded_in_the_pid_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "pids"
    monkeypatch.setenv(PID_FILE_ENV, str(pid_file))
    with ServerProcess.start([sys.executable, "-c", "import time; time.sleep(60)"], url="http://127.0.0.1:1",
                             log_path=tmp_path / "a.log", name="a") as a:
        with ServerProcess.start([sys.executable, "-c", "import time; time.sleep(60)"], url="http://127.0.0.1:1",
                                 log_path=tmp_path / "b.log", name="b") as b:
            assert pid_file.read_text().splitlines() == [f"a {a.pgid}", f"b {b.pgid}"]
