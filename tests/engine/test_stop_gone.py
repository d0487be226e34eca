"""``ServerProcess.stop`` and ``Stack.stop`` return only once every process they started is gone:
no process of the group is left, zombies included (``kill(-pgid, 0)`` fails at once, as the
demo's last-resort check asks it), and descendants that left the group are gone too.

The demo once printed "demo: done; every process the demo started is stopped" followed by "demo:
stopping leftover policy (process group ...)": stop() had returned while the group still held
processes (SIGKILLed ones not yet dead, and workers orphaned to an init that reaps them late)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ets.engine.process import ServerProcess
from ets.testing.stack import Stack, StackConfig
from tools import read_pid


def _group_exists(pgid: int) -> bool:
    """What ``kill -0 -- -PGID`` (demo.sh's check) says: any process of the group, zombie or not."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _start(tmp_path: Path, name: str, script: str) -> ServerProcess:
    return ServerProcess.start([sys.executable, "-c", script], url="http://127.0.0.1:1",
                               log_path=tmp_path / f"{name}.log", name=name)


# The leader kills its worker and exits without reaping it, as SGLang's launch_server does with its
# scheduler on SIGTERM: the worker is left a zombie of whoever adopts it.
LEADER_KILLS_WORKER = (
    "import os, signal, sys, time\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    print('worker', os.getpid(), flush=True)\n"
    "    time.sleep(600)\n"
    "    os._exit(0)\n"
    "def bye(*_):\n"
    "    os.kill(pid, signal.SIGKILL)\n"
    "    os._exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "time.sleep(600)\n"
)

# A worker that ignores SIGTERM: stop() ends it with SIGKILL after its grace period.
STUCK_WORKER = (
    "import os, signal, sys, time\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "    print('worker', os.getpid(), flush=True)\n"
    "    time.sleep(600)\n"
    "    os._exit(0)\n"
    "time.sleep(600)\n"
)

# A descendant in a session of its own (the reward server's PRM engine) with a worker of its own.
OWN_SESSION_ENGINE = (
    "import os, signal, sys, time\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.setsid()\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "    if os.fork() == 0:\n"
    "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "        time.sleep(600)\n"
    "        os._exit(0)\n"
    "    print('engine', os.getpid(), flush=True)\n"
    "    time.sleep(600)\n"
    "    os._exit(0)\n"
    "time.sleep(600)\n"
)


def test_stop_returns_only_when_a_worker_left_unreaped_is_gone(tmp_path: Path) -> None:
    proc = _start(tmp_path, "reaped", LEADER_KILLS_WORKER)
    read_pid(tmp_path / "reaped.log", "worker ")
    assert proc.stop(timeout=10) == 0
    assert not _group_exists(proc.pgid), "stop() returned while the group still held a (zombie) worker"


def test_stop_returns_only_when_a_sigkilled_worker_is_gone(tmp_path: Path) -> None:
    proc = _start(tmp_path, "stuck", STUCK_WORKER)
    read_pid(tmp_path / "stuck.log", "worker ")
    assert proc.stop(timeout=0.5) == -signal.SIGTERM
    assert not _group_exists(proc.pgid), "stop() returned before the SIGKILLed group was gone"


def test_stop_returns_only_when_a_descendant_in_its_own_session_is_gone(tmp_path: Path) -> None:
    proc = _start(tmp_path, "leader", OWN_SESSION_ENGINE)
    engine = read_pid(tmp_path / "leader.log", "engine ")
    assert os.getpgid(engine) == engine != proc.pgid
    assert proc.stop(timeout=0.5) == -signal.SIGTERM
    assert not _group_exists(proc.pgid)
    assert not _group_exists(engine), "stop() left the descendant's own group (or its zombies) behind"


def test_stack_stop_leaves_no_recorded_group(tmp_path: Path) -> None:
    # The orchestrator's stop (what demo.sh waits for): every group in work_dir/pids is gone.
    stack = Stack(StackConfig(work_dir=tmp_path))
    stack.launch("policy", lambda: _start(tmp_path, "policy", LEADER_KILLS_WORKER))
    stack.launch("reward", lambda: _start(tmp_path, "reward", OWN_SESSION_ENGINE))
    read_pid(tmp_path / "policy.log", "worker ")
    engine = read_pid(tmp_path / "reward.log", "engine ")
    stack.stop()
    groups = [int(line.split()[1]) for line in stack.pid_file.read_text().splitlines()]
    assert len(groups) == 2
    assert [g for g in [*groups, engine] if _group_exists(g)] == []
    assert stack.leftovers() == []
