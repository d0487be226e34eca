"""Turn the project's configuration into an upstream SGLang ``launch_server`` command.

Owns: ``LaunchConfig`` (what a policy or PRM SGLang server needs: model, port, device, GPU
pinning, memory fraction, schedule policy, grammar backend), its validation, reading it from
``ETS_*`` environment variables and CLI flags, and ``build_command`` which returns the argv and
environment to run. ``ets policy-serve`` (``main``) execs SGLang in place so the container's
PID 1 *is* SGLang and SIGTERM reaches it directly (SGLang's HTTP server maps SIGTERM to a
graceful stop). The reward server reuses ``build_command`` for its PRM server.

Nothing here starts a subprocess; ``ets.engine.process`` supervises one.
"""
from __future__ import annotations

from ets.errors import FieldError

import argparse
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

DEVICES = ("cuda", "cpu")
# Upstream choices (sglang/srt/arg_groups/choices.py, --schedule-policy); lpm (longest prefix
# match) schedules requests that share a cached prefix together, which is what tree search needs.
SCHEDULE_POLICIES = ("lpm", "random", "fcfs", "dfs-weight", "lof", "priority")
GRAMMAR_BACKENDS = ("xgrammar", "outlines", "llguidance", "none")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# On CPU the KV pool comes out of host RAM shared with everything else: keep it small and
# bounded by tokens, not by a fraction of a GPU that is not there.
CPU_MEM_FRACTION = 0.05
CPU_MAX_TOTAL_TOKENS = 8192
GPU_POLICY_MEM_FRACTION = 0.85


class LaunchConfigError(FieldError):
    """An invalid launch setting; ``field`` names the setting (env var / flag stem)."""


@dataclass(frozen=True)
class LaunchConfig:
    """Everything needed to launch one SGLang server (policy or PRM)."""

    model_path: str
    port: int = 30000
    host: str = "0.0.0.0"
    served_name: str | None = None
    device: str = "cuda"
    # GPU ids to pin to (CUDA_VISIBLE_DEVICES); None leaves the inherited visibility alone.
    gpu_ids: tuple[int, ...] | None = None
    tp_size: int = 1
    # None -> device default (CPU_MEM_FRACTION on cpu, SGLang's own choice on cuda).
    mem_fraction_static: float | None = None
    # None -> device default (CPU_MAX_TOTAL_TOKENS on cpu, unbounded / fraction-sized on cuda).
    max_total_tokens: int | None = None
    context_length: int | None = None
    schedule_policy: str = "lpm"
    grammar_backend: str = "xgrammar"
    enable_metrics: bool = True
    enable_cache_report: bool = True
    random_seed: int | None = None
    log_level: str = "info"
    skip_warmup: bool = False
    # --enable-deterministic-inference: the only mode in which SGLang honours per-request
    # ``sampling_seed``. Needs a GPU attention backend (triton/fa3/flashinfer); SGLang 0.5.23
    # refuses it with the CPU engine's torch_native attention.
    deterministic: bool = False
    # Extra raw flags appended verbatim (escape hatch for upstream options we do not model).
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> "LaunchConfig":
        """Raise ``LaunchConfigError`` naming the first invalid field; return self when valid."""
        if not self.model_path:
            raise LaunchConfigError("model_path", "required (set ETS_POLICY_MODEL or --model-path)")
        if not 1 <= self.port <= 65535:
            raise LaunchConfigError("port", f"must be in 1..65535, got {self.port}")
        if self.device not in DEVICES:
            raise LaunchConfigError("device", f"must be one of {DEVICES}, got {self.device!r}")
        if self.tp_size < 1:
            raise LaunchConfigError("tp_size", f"must be >= 1, got {self.tp_size}")
        if self.gpu_ids is not None:
            if self.device != "cuda":
                raise LaunchConfigError("gpu_ids", "GPU pinning only applies to device cuda")
            if not self.gpu_ids:
                raise LaunchConfigError("gpu_ids", "must list at least one GPU id")
            if any(g < 0 for g in self.gpu_ids):
                raise LaunchConfigError("gpu_ids", f"ids must be >= 0, got {list(self.gpu_ids)}")
            if len(set(self.gpu_ids)) != len(self.gpu_ids):
                raise LaunchConfigError("gpu_ids", f"duplicate ids in {list(self.gpu_ids)}")
            if self.tp_size > len(self.gpu_ids):
                raise LaunchConfigError(
                    "tp_size", f"tp_size {self.tp_size} needs that many GPUs, only {len(self.gpu_ids)} pinned"
                )
        if self.device == "cpu" and self.tp_size != 1:
            raise LaunchConfigError("tp_size", "the CPU engine runs with tp_size 1")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise LaunchConfigError(
                "mem_fraction_static", f"must be in (0, 1), got {self.mem_fraction_static}"
            )
        if self.max_total_tokens is not None and self.max_total_tokens < 64:
            raise LaunchConfigError("max_total_tokens", f"must be >= 64, got {self.max_total_tokens}")
        if self.context_length is not None and self.context_length < 1:
            raise LaunchConfigError("context_length", f"must be >= 1, got {self.context_length}")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise LaunchConfigError(
                "schedule_policy", f"must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}"
            )
        if self.grammar_backend not in GRAMMAR_BACKENDS:
            raise LaunchConfigError(
                "grammar_backend", f"must be one of {GRAMMAR_BACKENDS}, got {self.grammar_backend!r}"
            )
        if self.deterministic and self.device == "cpu":
            raise LaunchConfigError(
                "deterministic", "SGLang's deterministic inference needs a GPU attention backend; "
                "the CPU engine (torch_native attention) does not support it"
            )
        if self.log_level not in LOG_LEVELS:
            raise LaunchConfigError("log_level", f"must be one of {LOG_LEVELS}, got {self.log_level!r}")
        return self

    def replace(self, **overrides: object) -> "LaunchConfig":
        return replace(self, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LaunchCommand:
    """The argv to exec and the full environment to run it with."""

    argv: list[str]
    env: dict[str, str]


def build_command(
    config: LaunchConfig, *, python: str | None = None, base_env: Mapping[str, str] | None = None
) -> LaunchCommand:
    """Validate ``config`` and return the ``python -m sglang.launch_server`` argv and env.

    ``base_env`` defaults to ``os.environ``; the returned env is a copy with the device settings
    applied (GPU pinning, or SGLang's CPU engine switch).
    """
    config.validate()
    env = dict(os.environ if base_env is None else base_env)
    argv = [
        python or sys.executable, "-m", "sglang.launch_server",
        "--model-path", config.model_path,
        "--host", config.host,
        "--port", str(config.port),
        "--tp-size", str(config.tp_size),
        "--schedule-policy", config.schedule_policy,
        "--grammar-backend", config.grammar_backend,
        "--log-level", config.log_level,
    ]
    if config.served_name:
        argv += ["--served-model-name", config.served_name]
    if config.enable_metrics:
        argv.append("--enable-metrics")
    if config.enable_cache_report:
        argv.append("--enable-cache-report")
    if config.context_length is not None:
        argv += ["--context-length", str(config.context_length)]
    if config.random_seed is not None:
        argv += ["--random-seed", str(config.random_seed)]
    if config.skip_warmup:
        argv.append("--skip-server-warmup")
    if config.deterministic:
        argv.append("--enable-deterministic-inference")

    mem_fraction = config.mem_fraction_static
    max_total = config.max_total_tokens
    if config.device == "cpu":
        # The recipe that runs real SGLang without a GPU (see README, model-servers): the CPU
        # engine switch, torch-native attention and sampling, no CUDA graphs, a sleeping idle
        # scheduler, a small bounded pool.
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env.pop("CUDA_VISIBLE_DEVICES", None)
        # --sleep-on-idle: without it an idle CPU scheduler busy-polls its sockets and spins a
        # whole core; the CPU stack runs two engines (policy and PRM), which starved everything
        # else on a 2-core host (a search measured 35.9 s without the flag, 1.57 s with it).
        # On GPU the busy loop is what keeps latency low, so the flag stays off there.
        argv += [
            "--device", "cpu",
            "--attention-backend", "torch_native",
            "--sampling-backend", "pytorch",
            "--disable-cuda-graph",
            "--sleep-on-idle",
        ]
        mem_fraction = CPU_MEM_FRACTION if mem_fraction is None else mem_fraction
        max_total = CPU_MAX_TOTAL_TOKENS if max_total is None else max_total
    else:
        argv += ["--device", "cuda"]
        if config.gpu_ids is not None:
            # Pin by visibility: inside the process the pinned GPUs are 0..k-1, so SGLang's
            # --base-gpu-id stays 0 and tp ranks land on exactly the pinned devices.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in config.gpu_ids)
    if mem_fraction is not None:
        argv += ["--mem-fraction-static", f"{mem_fraction:g}"]
    if max_total is not None:
        argv += ["--max-total-tokens", str(max_total)]
    argv += list(config.extra_args)
    return LaunchCommand(argv=argv, env=env)


def _parse_gpu_ids(value: str, field_name: str) -> tuple[int, ...] | None:
    value = value.strip()
    if not value:
        return None
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise LaunchConfigError(field_name, f"must be a comma-separated list of integers, got {value!r}") from None


def _parse_int(value: str, field_name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LaunchConfigError(field_name, f"must be an integer, got {value!r}") from None


def _parse_float(value: str, field_name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise LaunchConfigError(field_name, f"must be a number, got {value!r}") from None


def _parse_bool(value: str, field_name: str) -> bool:
    v = value.strip().lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off"}:
        return False
    raise LaunchConfigError(field_name, f"must be a boolean (1/0/true/false), got {value!r}")


# env suffix -> (LaunchConfig field, parser). ETS_DEVICE and ETS_GPU_IDS are shared by all
# servers of a host; the rest are read under a per-server prefix (ETS_POLICY_, ETS_PRM_SGLANG_...).
_ENV_FIELDS: dict[str, tuple[str, str]] = {
    "MODEL": ("model_path", "str"),
    "SERVED_NAME": ("served_name", "str"),
    "HOST": ("host", "str"),
    "PORT": ("port", "int"),
    "TP_SIZE": ("tp_size", "int"),
    "MEM_FRACTION": ("mem_fraction_static", "float"),
    "MAX_TOTAL_TOKENS": ("max_total_tokens", "int"),
    "CONTEXT_LENGTH": ("context_length", "int"),
    "SCHEDULE_POLICY": ("schedule_policy", "str"),
    "GRAMMAR_BACKEND": ("grammar_backend", "str"),
    "ENABLE_METRICS": ("enable_metrics", "bool"),
    "ENABLE_CACHE_REPORT": ("enable_cache_report", "bool"),
    "RANDOM_SEED": ("random_seed", "int"),
    "LOG_LEVEL": ("log_level", "str"),
    "SKIP_WARMUP": ("skip_warmup", "bool"),
    "DETERMINISTIC": ("deterministic", "bool"),
    "GPU_IDS": ("gpu_ids", "gpu_ids"),
}


def _convert(kind: str, value: str, name: str) -> object:
    if kind == "int":
        return _parse_int(value, name)
    if kind == "float":
        return _parse_float(value, name)
    if kind == "bool":
        return _parse_bool(value, name)
    if kind == "gpu_ids":
        return _parse_gpu_ids(value, name)
    return value


def config_from_env(
    env: Mapping[str, str] | None = None, *, prefix: str = "ETS_POLICY_", default_port: int = 30000
) -> LaunchConfig:
    """Read a ``LaunchConfig`` from ``{prefix}MODEL``, ``{prefix}PORT``, ... plus the host-wide
    ``ETS_DEVICE`` and ``ETS_GPU_IDS`` (a per-server ``{prefix}GPU_IDS`` wins). Not validated:
    CLI flags may still override; ``build_command`` validates."""
    env = os.environ if env is None else env
    values: dict[str, object] = {"model_path": env.get(f"{prefix}MODEL", ""), "port": default_port}
    if "ETS_DEVICE" in env and env["ETS_DEVICE"].strip():
        values["device"] = env["ETS_DEVICE"].strip().lower()
    if env.get("ETS_GPU_IDS", "").strip():
        values["gpu_ids"] = _parse_gpu_ids(env["ETS_GPU_IDS"], "ETS_GPU_IDS")
    for suffix, (name, kind) in _ENV_FIELDS.items():
        key = prefix + suffix
        if key in env and env[key].strip() != "":
            values[name] = _convert(kind, env[key].strip(), key)
    if env.get(f"{prefix}EXTRA_ARGS", "").strip():
        values["extra_args"] = tuple(env[f"{prefix}EXTRA_ARGS"].split())
    return LaunchConfig(**values)  # type: ignore[arg-type]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ets policy-serve",
        description="Launch the SGLang policy server (upstream sglang.launch_server) from ETS_POLICY_* "
        "environment variables, overridden by these flags. Flags after '--' go to SGLang verbatim.",
    )
    p.add_argument("--model-path", help="model folder or hub id (ETS_POLICY_MODEL)")
    p.add_argument("--served-name", help="served model name (ETS_POLICY_SERVED_NAME)")
    p.add_argument("--host", help="bind address (ETS_POLICY_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="HTTP port (ETS_POLICY_PORT, default 30000)")
    p.add_argument("--device", choices=DEVICES, help="cuda or cpu (ETS_DEVICE)")
    p.add_argument("--gpu-ids", help="comma-separated GPU ids to pin (ETS_POLICY_GPU_IDS / ETS_GPU_IDS)")
    p.add_argument("--tp-size", type=int, help="tensor parallel size (ETS_POLICY_TP_SIZE)")
    p.add_argument("--mem-fraction-static", type=float, help="KV pool memory fraction (ETS_POLICY_MEM_FRACTION)")
    p.add_argument("--max-total-tokens", type=int, help="KV pool size in tokens (ETS_POLICY_MAX_TOTAL_TOKENS)")
    p.add_argument("--context-length", type=int, help="(ETS_POLICY_CONTEXT_LENGTH)")
    p.add_argument("--schedule-policy", choices=SCHEDULE_POLICIES, help="(ETS_POLICY_SCHEDULE_POLICY, default lpm)")
    p.add_argument("--grammar-backend", choices=GRAMMAR_BACKENDS, help="(ETS_POLICY_GRAMMAR_BACKEND, default xgrammar)")
    p.add_argument("--random-seed", type=int, help="(ETS_POLICY_RANDOM_SEED)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="(ETS_POLICY_LOG_LEVEL)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic inference, honours per-request seeds; GPU only (ETS_POLICY_DETERMINISTIC)")
    p.add_argument("--print-command", action="store_true", help="print the SGLang command and exit")
    return p


def config_from_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[LaunchConfig, bool]:
    """Parse ``ets policy-serve`` flags over the environment; return (config, print_only)."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    config = config_from_env(env)
    overrides: dict[str, object] = {}
    names = {f.name for f in fields(LaunchConfig)}
    for name, value in vars(args).items():
        if name in names and value is not None:
            overrides[name] = value
    if args.gpu_ids is not None:
        overrides["gpu_ids"] = _parse_gpu_ids(args.gpu_ids, "gpu_ids")
    if extra:
        overrides["extra_args"] = tuple(config.extra_args) + tuple(extra)
    return config.replace(**overrides), bool(args.print_command)


def main(argv: list[str]) -> None:
    """``ets policy-serve``: validate, then replace this process with SGLang's server."""
    try:
        config, print_only = config_from_args(argv)
        command = build_command(config)
    except LaunchConfigError as exc:
        print(f"ets policy-serve: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if print_only:
        print(" ".join(command.argv))
        return
    if not Path(config.model_path).exists() and "/" not in config.model_path:
        # A bare name that is neither a folder nor an org/name hub id is almost always a typo.
        print(f"ets policy-serve: model_path {config.model_path!r} is not a folder or hub id", file=sys.stderr)
        raise SystemExit(2)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: SGLang becomes this PID (PID 1 in the container), so SIGTERM from the
    # runtime reaches SGLang's own graceful-shutdown handler with nothing in between.
    os.execvpe(command.argv[0], command.argv, command.env)


if __name__ == "__main__":
    main(sys.argv[1:])
