"""Turn the project's configuration into an upstream SGLang ``launch_server`` command.

Owns: ``LaunchConfig`` (what a policy or PRM SGLang server needs: model, port, device, GPU
pinning, memory fraction, schedule policy, grammar backend), its validation, and
``build_command`` which returns the argv and environment to run. ``ets policy-serve`` (``main``)
execs SGLang in place so the container's PID 1 *is* SGLang and SIGTERM reaches it directly
(SGLang's HTTP server maps SIGTERM to a graceful stop). The reward server reuses ``build_command`` for its PRM server.

The env vars and ``ets policy-serve`` flags are generated from ``LaunchConfig``'s fields by the
one settings loader (``ets.settings``). Nothing here starts a subprocess; ``ets.engine.process``
supervises one.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ets import settings
from ets.errors import FieldError
from ets.settings import setting

DEVICES = ("cuda", "cpu")
# Upstream choices (sglang/srt/arg_groups/choices.py, --schedule-policy); lpm (longest prefix
# match) schedules requests that share a cached prefix together, which is what tree search needs.
SCHEDULE_POLICIES = ("lpm", "random", "fcfs", "dfs-weight", "lof", "priority")
GRAMMAR_BACKENDS = ("xgrammar", "outlines", "llguidance", "none")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# On CPU the KV pool comes out of host RAM shared with everything else: it is bounded by tokens
# (CPU_MAX_TOTAL_TOKENS caps SGLang's profiled capacity), not by a fraction of a GPU that is not
# there. The fraction is only SGLang's budget check: free RAM after loading must exceed
# (1 - fraction) x free RAM before it. 0.05 passed for tiny models but refused the real
# SmolLM2 (0.66 GB loaded, other processes allocating meanwhile: "raise above 0.120"); 0.3
# leaves room and allocates nothing more, since the token cap decides the pool's size.
CPU_MEM_FRACTION = 0.3
CPU_MAX_TOTAL_TOKENS = 8192
GPU_POLICY_MEM_FRACTION = 0.85


class LaunchConfigError(FieldError):
    """An invalid launch setting; ``field`` names the setting (env var / flag stem)."""


@dataclass(frozen=True)
class LaunchConfig:
    """Everything needed to launch one SGLang server (policy or PRM).

    Each field is also a setting (``ets.settings``): read from ``{prefix}NAME`` (``ETS_POLICY_``
    for the policy, ``ETS_PRM_SGLANG_`` for the reward server's PRM engine) or a host-wide
    ``ETS_*`` name, and a ``--flag`` of ``ets policy-serve``.
    """

    model_path: str = setting("", env="{prefix}MODEL", help="model folder or hub id (required)")
    port: int = setting(30000, env="{prefix}PORT", ge=1, le=65535, help="HTTP port")
    host: str = setting("0.0.0.0", env="{prefix}HOST", help="bind address")
    # None: the model's short name (its folder's or hub id's last part), not SGLang's default (the
    # full path), so /v1/models and responses show "smollm2-135m-instruct", not a cache folder.
    served_name: str | None = setting(None, env="{prefix}SERVED_NAME",
                                      help="served model name (default: the model's short name)")
    device: str = setting("cuda", env="ETS_DEVICE", choices=DEVICES, lower=True,
                          help="cpu adds the CPU engine recipe")
    # GPU ids to pin to (CUDA_VISIBLE_DEVICES); None leaves the inherited visibility alone.
    # A per-server list wins over the host-wide one.
    gpu_ids: tuple[int, ...] | None = setting(None, env=("{prefix}GPU_IDS", "ETS_GPU_IDS"),
                                              help="comma-separated GPU ids to pin")
    tp_size: int = setting(1, env="{prefix}TP_SIZE", ge=1, help="tensor parallel size")
    # None -> device default (CPU_MEM_FRACTION on cpu, SGLang's own choice on cuda).
    mem_fraction_static: float | None = setting(None, env="{prefix}MEM_FRACTION", gt=0, lt=1,
                                                help="KV pool memory fraction")
    # None -> device default (CPU_MAX_TOTAL_TOKENS on cpu, unbounded / fraction-sized on cuda).
    max_total_tokens: int | None = setting(None, env="{prefix}MAX_TOTAL_TOKENS", ge=64, help="KV pool size in tokens")
    context_length: int | None = setting(None, env="{prefix}CONTEXT_LENGTH", ge=1, help="model context length")
    schedule_policy: str = setting("lpm", env="{prefix}SCHEDULE_POLICY", choices=SCHEDULE_POLICIES,
                                   help="lpm: requests sharing a cached prefix run together")
    grammar_backend: str = setting("xgrammar", env="{prefix}GRAMMAR_BACKEND", choices=GRAMMAR_BACKENDS)
    enable_metrics: bool = setting(True, env="{prefix}ENABLE_METRICS", help="Prometheus /metrics")
    enable_cache_report: bool = setting(True, env="{prefix}ENABLE_CACHE_REPORT",
                                        help="cached prompt tokens in responses")
    random_seed: int | None = setting(None, env="{prefix}RANDOM_SEED", help="engine random seed")
    log_level: str = setting("info", env="{prefix}LOG_LEVEL", choices=LOG_LEVELS)
    skip_warmup: bool = setting(False, env="{prefix}SKIP_WARMUP", help="skip SGLang's warmup request")
    # --enable-deterministic-inference: the only mode in which SGLang honours per-request
    # ``sampling_seed``. Needs a GPU attention backend (triton/fa3/flashinfer); SGLang 0.5.23
    # refuses it with the CPU engine's torch_native attention.
    deterministic: bool = setting(False, env="{prefix}DETERMINISTIC",
                                  help="deterministic inference (honours per-request seeds); GPU only")
    # Extra raw flags appended verbatim (escape hatch for upstream options we do not model);
    # on the command line they follow "--".
    extra_args: tuple[str, ...] = setting(default_factory=tuple, env="{prefix}EXTRA_ARGS", flag="",
                                          help="more SGLang flags, verbatim (command line: after `--`)")

    def validate(self) -> "LaunchConfig":
        """Raise ``LaunchConfigError`` naming the first invalid field; return self when valid."""
        if not self.model_path:
            raise LaunchConfigError("model_path", "required (set ETS_POLICY_MODEL or --model-path)")
        settings.check(self, error=LaunchConfigError)
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
        if self.deterministic and self.device == "cpu":
            raise LaunchConfigError(
                "deterministic", "SGLang's deterministic inference needs a GPU attention backend; "
                "the CPU engine (torch_native attention) does not support it"
            )
        return self

    def replace(self, **overrides: Any) -> "LaunchConfig":
        return replace(self, **overrides)


@dataclass(frozen=True)
class LaunchCommand:
    """The argv to exec and the full environment to run it with."""

    argv: list[str]
    env: dict[str, str]


def short_model_name(model_path: str) -> str:
    """A model's name without its location: the last part of a folder path or hub id."""
    return Path(model_path.rstrip("/")).name or model_path


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
    argv += ["--served-model-name", config.served_name or short_model_name(config.model_path)]
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
        # The recipe that runs real SGLang without a GPU (see docs/policy-server.md): the CPU
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


def config_from_env(
    env: Mapping[str, str] | None = None, *, prefix: str = "ETS_POLICY_", default_port: int = 30000
) -> LaunchConfig:
    """Read a ``LaunchConfig`` from ``{prefix}MODEL``, ``{prefix}PORT``, ... plus the host-wide
    ``ETS_DEVICE`` and ``ETS_GPU_IDS`` (a per-server ``{prefix}GPU_IDS`` wins). A bad value raises
    ``LaunchConfigError`` naming the variable; cross-field rules are left to ``build_command``
    (CLI flags may still override)."""
    return settings.from_env(LaunchConfig, env, prefix=prefix, base=LaunchConfig(port=default_port),
                             error=LaunchConfigError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ets policy-serve",
        description="Launch the SGLang policy server (upstream sglang.launch_server) from ETS_POLICY_* "
        "environment variables, overridden by these flags. Flags after '--' go to SGLang verbatim.",
    )
    settings.add_flags(p, LaunchConfig, prefix="ETS_POLICY_")
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
    config = settings.from_args(LaunchConfig, args, env=env, prefix="ETS_POLICY_", error=LaunchConfigError)
    if extra:
        config = config.replace(extra_args=tuple(config.extra_args) + tuple(extra))
    return config, bool(args.print_command)


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
