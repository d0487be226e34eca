"""Launcher: configuration -> SGLang argv/env (pure), env/CLI parsing and validation errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ets.engine.launcher import (
    CPU_MAX_TOTAL_TOKENS,
    LaunchConfig,
    LaunchConfigError,
    build_command,
    config_from_args,
    config_from_env,
)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_gpu_policy_argv_and_pinning() -> None:
    cfg = LaunchConfig(model_path="/models/llemma", served_name="policy", port=30000, gpu_ids=(2, 3), tp_size=2,
                       mem_fraction_static=0.85, grammar_backend="outlines")
    cmd = build_command(cfg, python="/usr/bin/python3", base_env={"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"})
    argv = cmd.argv
    assert argv[:3] == ["/usr/bin/python3", "-m", "sglang.launch_server"]
    assert _flag(argv, "--model-path") == "/models/llemma"
    assert _flag(argv, "--served-model-name") == "policy"
    assert _flag(argv, "--port") == "30000"
    assert _flag(argv, "--host") == "0.0.0.0"
    assert _flag(argv, "--tp-size") == "2"
    assert _flag(argv, "--mem-fraction-static") == "0.85"
    assert _flag(argv, "--schedule-policy") == "lpm"
    assert _flag(argv, "--grammar-backend") == "outlines"
    assert _flag(argv, "--device") == "cuda"
    assert "--enable-metrics" in argv and "--enable-cache-report" in argv
    # No CPU recipe on GPU.
    assert "--attention-backend" not in argv and "--disable-cuda-graph" not in argv
    assert "--sleep-on-idle" not in argv  # a CPU launch setting: the GPU scheduler keeps polling
    assert "--max-total-tokens" not in argv
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "SGLANG_USE_CPU_ENGINE" not in cmd.env
    assert cmd.env["PATH"] == "/bin"
    assert "--enable-deterministic-inference" not in argv
    assert "--enable-deterministic-inference" in build_command(cfg.replace(deterministic=True), base_env={}).argv


def test_gpu_without_pinning_keeps_inherited_visibility() -> None:
    cmd = build_command(LaunchConfig(model_path="m/x"), base_env={"CUDA_VISIBLE_DEVICES": "5"})
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "5"
    assert "--mem-fraction-static" not in cmd.argv  # SGLang picks its own on GPU


def test_cpu_argv_uses_the_cpu_recipe() -> None:
    cmd = build_command(LaunchConfig(model_path="/m", device="cpu", port=31000, host="127.0.0.1"),
                        base_env={"CUDA_VISIBLE_DEVICES": "0"})
    argv = cmd.argv
    assert cmd.env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in cmd.env
    assert _flag(argv, "--device") == "cpu"
    assert _flag(argv, "--attention-backend") == "torch_native"
    assert _flag(argv, "--sampling-backend") == "pytorch"
    assert "--disable-cuda-graph" in argv
    # An idle CPU scheduler without it spins a whole core (two engines starve a 2-core host).
    assert "--sleep-on-idle" in argv
    # A budget check only on CPU (the token cap sizes the pool), with room for real weights.
    assert 0.1 < float(_flag(argv, "--mem-fraction-static")) < 0.5
    assert int(_flag(argv, "--max-total-tokens")) == CPU_MAX_TOTAL_TOKENS
    assert _flag(argv, "--host") == "127.0.0.1"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_argv_parses_with_the_installed_sglang(device: str) -> None:
    """Every flag we emit exists in the pinned SGLang (an upstream rename would otherwise only
    surface as a server that exits at start); the CPU one sleeps when idle, the GPU one polls."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    argv = build_command(LaunchConfig(model_path="/m", device=device), base_env={}).argv
    args = parser.parse_args(argv[3:])
    assert args.device == device
    assert args.sleep_on_idle is (device == "cpu")


def test_prm_server_reuse_with_overrides() -> None:
    """The reward server builds its PRM server with the same function."""
    cfg = LaunchConfig(model_path="/prm", port=30001, mem_fraction_static=0.85, gpu_ids=(0,),
                       extra_args=("--enable-return-hidden-states",))
    argv = build_command(cfg, base_env={}).argv
    assert _flag(argv, "--port") == "30001"
    assert argv[-1] == "--enable-return-hidden-states"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model_path": ""}, "model_path"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"device": "tpu"}, "device"),
        ({"tp_size": 0}, "tp_size"),
        ({"gpu_ids": (0,), "tp_size": 2}, "tp_size"),
        ({"gpu_ids": ()}, "gpu_ids"),
        ({"gpu_ids": (1, 1)}, "gpu_ids"),
        ({"gpu_ids": (-1,)}, "gpu_ids"),
        ({"device": "cpu", "gpu_ids": (0,)}, "gpu_ids"),
        ({"device": "cpu", "tp_size": 2}, "tp_size"),
        ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
        ({"mem_fraction_static": 0.0}, "mem_fraction_static"),
        ({"max_total_tokens": 10}, "max_total_tokens"),
        ({"schedule_policy": "longest"}, "schedule_policy"),
        ({"grammar_backend": "regex"}, "grammar_backend"),
        ({"log_level": "loud"}, "log_level"),
        ({"device": "cpu", "deterministic": True}, "deterministic"),
    ],
)
def test_invalid_config_names_the_field(overrides: dict, field: str) -> None:
    cfg = LaunchConfig(model_path="/m").replace(**overrides)
    with pytest.raises(LaunchConfigError) as err:
        build_command(cfg)
    assert err.value.field == field
    assert field in str(err.value)


def test_config_from_env() -> None:
    env = {
        "ETS_POLICY_MODEL": "/models/p", "ETS_POLICY_SERVED_NAME": "pol", "ETS_POLICY_PORT": "31111",
        "ETS_DEVICE": "CUDA", "ETS_GPU_IDS": "1", "ETS_POLICY_MEM_FRACTION": "0.7",
        "ETS_POLICY_GRAMMAR_BACKEND": "outlines", "ETS_POLICY_ENABLE_METRICS": "true",
        "ETS_POLICY_EXTRA_ARGS": "--chunked-prefill-size 4096",
    }
    cfg = config_from_env(env)
    assert (cfg.model_path, cfg.served_name, cfg.port, cfg.device) == ("/models/p", "pol", 31111, "cuda")
    assert cfg.gpu_ids == (1,) and cfg.mem_fraction_static == 0.7 and cfg.grammar_backend == "outlines"
    assert cfg.extra_args == ("--chunked-prefill-size", "4096")
    # A per-server GPU list wins over the host-wide one; PRM servers read their own prefix.
    prm = config_from_env({**env, "ETS_PRM_SGLANG_MODEL": "/prm", "ETS_PRM_SGLANG_GPU_IDS": "3"},
                          prefix="ETS_PRM_SGLANG_", default_port=30001)
    assert (prm.model_path, prm.port, prm.gpu_ids) == ("/prm", 30001, (3,))


@pytest.mark.parametrize(
    "env, field",
    [
        ({"ETS_POLICY_PORT": "http"}, "ETS_POLICY_PORT"),
        ({"ETS_POLICY_MEM_FRACTION": "most"}, "ETS_POLICY_MEM_FRACTION"),
        ({"ETS_GPU_IDS": "0,a"}, "ETS_GPU_IDS"),
        ({"ETS_POLICY_ENABLE_METRICS": "maybe"}, "ETS_POLICY_ENABLE_METRICS"),
    ],
)
def test_bad_env_values_name_the_variable(env: dict, field: str) -> None:
    with pytest.raises(LaunchConfigError) as err:
        config_from_env({"ETS_POLICY_MODEL": "/m", **env})
    assert err.value.field == field


def test_cli_flags_override_env_and_pass_through() -> None:
    env = {"ETS_POLICY_MODEL": "/env-model", "ETS_POLICY_PORT": "30000", "ETS_DEVICE": "cpu"}
    cfg, print_only = config_from_args(
        ["--model-path", "/cli-model", "--port", "30500", "--print-command", "--", "--chunked-prefill-size", "512"], env
    )
    assert print_only
    assert (cfg.model_path, cfg.port, cfg.device) == ("/cli-model", 30500, "cpu")
    assert cfg.extra_args == ("--chunked-prefill-size", "512")
    cfg, _ = config_from_args(["--gpu-ids", "0,1", "--device", "cuda", "--tp-size", "2"], env)
    assert cfg.gpu_ids == (0, 1) and cfg.tp_size == 2


def _policy_serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ets.cli", "policy-serve", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_policy_serve_cli_prints_command_and_rejects_bad_config(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "ETS_POLICY_MODEL": str(tmp_path), "ETS_DEVICE": "cpu", "ETS_POLICY_PORT": "31234"}
    ok = _policy_serve(["--print-command"], env)
    assert ok.returncode == 0, ok.stderr
    assert "sglang.launch_server" in ok.stdout and "--port 31234" in ok.stdout and "--device cpu" in ok.stdout
    bad = _policy_serve(["--print-command"], {**env, "ETS_POLICY_MEM_FRACTION": "2"})
    assert bad.returncode == 2
    assert "ETS_POLICY_MEM_FRACTION" in bad.stderr and "Traceback" not in bad.stderr  # names the variable
    missing = _policy_serve([], {k: v for k, v in env.items() if k != "ETS_POLICY_MODEL"})
    assert missing.returncode == 2 and "model_path" in missing.stderr
    typo = _policy_serve([], {**env, "ETS_POLICY_MODEL": "no-such-model"})
    assert typo.returncode == 2 and "no-such-model" in typo.stderr


def test_served_model_name_defaults_to_the_short_name() -> None:
    from ets.engine.launcher import short_model_name

    argv = build_command(LaunchConfig(model_path="/cache/ets/models/smollm2-135m-instruct/", device="cpu"),
                         base_env={}).argv
    assert argv[argv.index("--served-model-name") + 1] == "smollm2-135m-instruct"
    argv = build_command(LaunchConfig(model_path="/m/x", served_name="policy"), base_env={}).argv
    assert argv[argv.index("--served-model-name") + 1] == "policy"
    assert short_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
