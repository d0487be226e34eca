"""One GPU or two: both engines get a real KV pool by SGLang 0.5.23's own sizing rule (issue 24,
finding 2 and 5).

The compose files are rendered (podman-compose config) and their engine settings fed to
``ets.engine.gpu_memory``, the arithmetic of SGLang's rule, whose two source lines are checked
against the installed SGLang so that an upstream change of the rule fails here. On an 80 GB card
(nvidia-smi's 81559 MiB, an H100 SXM) the one-GPU profile gives both engines a positive pool in
either start order; the two-GPU defaults do on their own cards and do not on one card (what the
preflight refuses); the preflight refuses two engines on one GPU without the profile and a card
too small for the PRM, with the arithmetic.
"""
from __future__ import annotations

import inspect
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ets.engine import gpu_memory
from ets.engine.gpu_memory import MIB, MIN_KV_TOKENS, MISTRAL_7B, Profile, engine_specs, share
from tools import tool

ROOT = Path(__file__).resolve().parents[2]
H100_MIB = 81559


def test_the_rule_is_sglang_0_5_23s() -> None:
    """The two lines gpu_memory.py re-implements, as the installed SGLang has them."""
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator

    profile = inspect.getsource(KVCacheConfigurator._profile_available_bytes)
    assert "slack_gb = pre_model_load_memory * (1 - get_schedule().mem_fraction_static)" in profile
    assert "rest_memory = available_gpu_memory - slack_gb - mm_reservation_gb" in profile
    assert "if rest_memory <= 0:" in profile
    cap = inspect.getsource(KVCacheConfigurator._apply_token_constraints)
    assert "token_capacity = min(token_capacity, user_limit)" in cap


def _render(*files: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ETS_")}
    argv = [tool("podman-compose")] + [a for f in files for a in ("-f", str(ROOT / f))] + ["config"]
    res = subprocess.run(argv, cwd=ROOT, env=dict(clean, ETS_GRAFANA_PASSWORD_FILE="/dev/null", **env),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return yaml.safe_load(res.stdout)["services"]


def _profile(services: dict) -> Profile:
    policy, reward = services["policy"]["environment"], services["reward"]["environment"]
    tokens = policy.get("ETS_POLICY_MAX_TOTAL_TOKENS"), reward.get("ETS_PRM_SGLANG_MAX_TOTAL_TOKENS")
    return Profile(policy_fraction=float(policy["ETS_POLICY_MEM_FRACTION"]),
                   prm_fraction=float(reward["ETS_PRM_MEM_FRACTION"]),
                   policy_max_tokens=int(tokens[0]) if tokens[0] else None,
                   prm_max_tokens=int(tokens[1]) if tokens[1] else None)


def _gpus(service: dict) -> list[str]:
    return [g for d in service["deploy"]["resources"]["reservations"]["devices"] for g in d["device_ids"]]


@pytest.fixture(scope="module")
def one_gpu() -> dict:
    return _render("docker-compose.yml", "docker-compose.one-gpu.yml", ETS_REWARD_GPU="0")


@pytest.fixture(scope="module")
def two_gpu() -> dict:
    return _render("docker-compose.yml")


def test_one_gpu_profile_gives_both_engines_a_pool_in_either_order(one_gpu: dict) -> None:
    assert _gpus(one_gpu["policy"]) == _gpus(one_gpu["reward"]) == ["0"]
    assert one_gpu["reward"]["depends_on"]["policy"]["condition"] == "service_healthy"
    profile = _profile(one_gpu)
    assert profile == gpu_memory.PROFILES["one-gpu"], "compose and gpu_memory.PROFILES disagree"
    specs = engine_specs(profile, MISTRAL_7B, MISTRAL_7B)
    card = H100_MIB * MIB
    for order in (["policy", "prm"], ["prm", "policy"]):
        fits = share(card, [specs[n] for n in order])
        assert [f.error for f in fits] == ["", ""], fits
        # Capped, so the same pools whichever starts first: ~21.5 GiB policy, ~17.6 GiB PRM.
        assert {f.name: f.kv_tokens for f in fits} == {"policy": 176_000, "prm": 144_000}
        assert all(f.kv_bytes > 0 and f.kv_tokens >= MIN_KV_TOKENS for f in fits)
        assert sum(f.used for f in fits) < card


def test_two_gpu_defaults_fit_their_own_cards_and_not_one(two_gpu: dict) -> None:
    assert _gpus(two_gpu["policy"]) == ["0"] and _gpus(two_gpu["reward"]) == ["1"]
    profile = _profile(two_gpu)
    assert profile == gpu_memory.PROFILES["two-gpu"], "compose and gpu_memory.PROFILES disagree"
    specs = engine_specs(profile, MISTRAL_7B, MISTRAL_7B)
    card = H100_MIB * MIB
    for name in ("policy", "prm"):
        (fit,) = share(card, [specs[name]])
        assert not fit.error and fit.kv_tokens >= MIN_KV_TOKENS, fit
    # The same settings with both engines on one card: the second engine fails whichever is first.
    for order in (["policy", "prm"], ["prm", "policy"]):
        fits = share(card, [specs[n] for n in order])
        assert fits[-1].error, fits


def _preflight(tmp_path: Path, rows: str, **env: str) -> subprocess.CompletedProcess[str]:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'ROWS'\n{rows}\nROWS\n")
    smi.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ETS_") and k != "COMPOSE_FILE"}
    return subprocess.run([str(ROOT / "scripts/gpu-preflight.sh")], capture_output=True, text=True, timeout=60,
                          env=dict(clean, PATH=f"{tmp_path}:{os.environ['PATH']}", **env))


H100 = f"0, NVIDIA H100 80GB HBM3, 580.95.05, 9.0, {H100_MIB}"


def test_preflight_refuses_one_gpu_without_the_profile(tmp_path: Path) -> None:
    res = _preflight(tmp_path, H100, ETS_REWARD_GPU="0")
    assert res.returncode == 1
    assert "FAIL both engines pinned to GPU 0 without the one-GPU profile" in res.stdout, res.stdout
    res = _preflight(tmp_path, H100, ETS_REWARD_GPU="0", COMPOSE_FILE="docker-compose.yml:docker-compose.one-gpu.yml")
    assert res.returncode == 0, res.stdout
    assert "PASS profile one-gpu" in res.stdout
    assert res.stdout.count("PASS memory:") == 4, res.stdout  # both engines, both orders
    assert "policy's KV pool 21.5 GiB = 176000 tokens" in res.stdout and "prm's KV pool 17.6 GiB" in res.stdout
    # The profile with the engines on two GPUs is a mistake too.
    two = H100 + f"\n1, NVIDIA H100 80GB HBM3, 580.95.05, 9.0, {H100_MIB}"
    res = _preflight(tmp_path, two, COMPOSE_FILE="docker-compose.yml:docker-compose.one-gpu.yml")
    assert res.returncode == 1 and "set both to one GPU" in res.stdout, res.stdout


def test_preflight_refuses_a_card_too_small_with_the_arithmetic(tmp_path: Path) -> None:
    """Finding 5: a 24 GB card (L4, 23034 MiB) holds the PRM's weights but ~0.8 GiB of KV at 0.7."""
    rows = H100 + "\n1, NVIDIA L4, 580.95.05, 8.9, 23034"
    res = _preflight(tmp_path, rows)
    assert res.returncode == 1
    assert "PASS memory: policy on its 79.6 GiB GPU" in res.stdout, res.stdout
    assert ("FAIL memory: prm on its 22.5 GiB GPU: prm's KV pool 0.8 GiB = 6448 tokens, below 32768"
            in res.stdout), res.stdout
    res = _preflight(tmp_path, "0, NVIDIA L40S, 580.95.05, 8.9, 46068", ETS_REWARD_GPU="0",
                     COMPOSE_FILE="docker-compose.yml:docker-compose.one-gpu.yml")
    assert res.returncode == 1 and "do not fit" in res.stdout, res.stdout


def test_one_gpu_overlay_merged_matches_compose_spec(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ETS_")}
    argv = [tool("podman-compose"), "-f", str(ROOT / "docker-compose.yml"), "-f",
            str(ROOT / "docker-compose.one-gpu.yml"), "config"]
    env = dict(clean, ETS_GRAFANA_PASSWORD_FILE="/dev/null")
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    # Compose refuses the overlay until the reward server is pinned to the policy's GPU.
    assert res.returncode != 0 and "ETS_REWARD_GPU" in res.stderr, res.stderr[-2000:]
    res = subprocess.run(argv, cwd=ROOT, env=dict(env, ETS_REWARD_GPU="0"), capture_output=True, text=True,
                         timeout=120)
    merged = tmp_path / "merged.yml"
    merged.write_text(res.stdout)
    check = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(merged)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
