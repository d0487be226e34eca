"""The GPU images as users build them (VARIANT=gpu: scripts/install.sh --engine image), on a
stand-in of the official SGLang image's layout (issue 16, "catch the class here").

lmsysorg/sglang:v0.5.23 cannot be pulled or run here (no registry, no GPU), but its layout is
what broke the GPU path: SGLang, torch and sgl_kernel live in a venv of its own, /opt/sglang,
first on PATH (sgl-project/sglang PR #30612). deploy/ci/Containerfile.sglang-standin lays SGLang's
CPU install out the same way (`scripts/containers.sh standin`); Dockerfile.policy and
Dockerfile.reward are built on it in GPU mode, and in the containers:

- every module the servers import (sglang.launch_server, torch, sgl_kernel, transformers,
  sentence_transformers, sentencepiece, sglang_router, ets) resolves to the base's environment,
  and `ets`/`python` are that environment's (the launcher execs sys.executable -m sglang...);
- no package of the base changed version (torch, transformers, numpy...; the stand-in holds the
  LOWEST versions SGLang 0.5.23 allows of what we import from it, deploy/ci/standin-lowest.txt:
  grpcio 1.81.1, protobuf 6.33.5, prometheus-client 0.20.0 against our 1.85.1 / 7.36.2 / 0.26.0;
  the base's stay), and there is one torch only; the build itself imported every module each
  container runs (ets.entrypoints) on them, so stubs that refuse the base's protobuf fail the build;
- bytecode is compiled at build time (the root filesystem is read-only at run time);
- the reward server starts (transformers backend, tiny math-shepherd PRM, the packaged
  embedder) and answers health, and a tokenizer.model-only PRM tokenizer loads.

The old install (a --system-site-packages /opt/venv) fails the first check: No module named
'sglang'. Cold: the stand-in (~11 min on a loaded 2-core machine) plus the two images; warm
(cached layers): about a minute. Needs root (rootful podman) like test_deploy_containers.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from deploy_helpers import podman
from ets.entrypoints import CONTAINER_MODULES
from tools import tool

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "scripts/containers.sh"
STANDIN = "localhost/ets-sglang-standin:0.5.23"
IMAGES = {name: f"localhost/ets-{name}:gpu-standin" for name in ("policy", "reward")}
BASE_ENV = "/opt/sglang"

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

PROBE = """
import importlib, json, os, shutil, sys
mods = {}
for name in sys.argv[1].split(","):
    m = importlib.import_module(name)
    mods[name] = m.__file__
print(json.dumps({"executable": sys.executable, "prefix": sys.prefix, "modules": mods,
                  "ets": shutil.which("ets"), "python": shutil.which("python"),
                  "opt_venv": os.path.exists("/opt/venv"),
                  "uncompiled": [f for f in mods.values()
                                 if not os.path.exists(importlib.util.cache_from_source(f))]}))
"""


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    assert os.geteuid() == 0, "the container test needs root (rootful podman, debootstrap)"
    for name in ("podman", "debootstrap", "runc"):
        tool(name)
    t0 = time.monotonic()
    res = subprocess.run([str(CONTAINERS), "build-gpu"], capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    print(res.stdout, f"build-gpu: {time.monotonic() - t0:.0f} s")
    return IMAGES


def packages(image: str) -> dict[str, str]:
    out = podman("run", "--rm", "--entrypoint", "python3", image, "-m", "pip", "list", "--format=json").stdout
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(out)}


def probe(image: str, modules: str) -> dict[str, Any]:
    res = podman("run", "--rm", *RUN_AS_DEPLOYED, "--entrypoint", "python", image, "-c", PROBE, modules, check=False)
    assert res.returncode == 0, f"{image}: {res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


# As compose runs the engines: read-only root, /tmp a tmpfs, the home (SGLang's and torch's caches
# under ~/.cache) a volume owned by uid 10001 (here a tmpfs with that owner), /models likewise.
# "U": owned by the container's user. podman 4.3 ignores a tmpfs's mode= (and has no uid=): a
# root-owned 0755 tmpfs that uid 10001 cannot write.
RUN_AS_DEPLOYED = ("--read-only", "--tmpfs", "/tmp:rw,exec,U", "--tmpfs", "/home/ets:rw,U",
                   "--tmpfs", "/models:rw,U")

ENGINE = "sglang,sglang.launch_server,sglang.srt.entrypoints.http_server,torch,sgl_kernel,transformers,numpy"


@pytest.mark.parametrize("name, modules", [
    ("policy", ENGINE + ",sglang_router," + ",".join(CONTAINER_MODULES["policy"])),
    ("reward", ENGINE + ",google.protobuf," + ",".join(CONTAINER_MODULES["reward"])),
])
def test_imports_resolve_to_the_base_environment(images: dict[str, str], name: str, modules: str) -> None:
    found = probe(images[name], modules)
    assert found["prefix"] == BASE_ENV, found
    assert found["ets"] == f"{BASE_ENV}/bin/ets" and found["python"] == f"{BASE_ENV}/bin/python", found
    assert not found["opt_venv"], "a second environment was made"
    outside = {m: f for m, f in found["modules"].items() if not f.startswith(f"{BASE_ENV}/lib/")}
    assert not outside, outside
    # Compiled at build time: a read-only root would otherwise recompile all of it every start.
    assert not found["uncompiled"], found["uncompiled"]


def test_launcher_execs_the_base_sglang(images: dict[str, str]) -> None:
    script = ("from ets.engine.launcher import LaunchConfig, build_command; import subprocess, sys\n"
              "argv = build_command(LaunchConfig(model_path='/models/x', device='cpu')).argv\n"
              "print(argv[0]); sys.exit(subprocess.run(argv[:3] + ['--help'], capture_output=True).returncode)")
    res = podman("run", "--rm", *RUN_AS_DEPLOYED, "--entrypoint", "python", images["policy"], "-c", script,
                 check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[0] == f"{BASE_ENV}/bin/python"


def test_no_base_package_replaced_and_one_torch(images: dict[str, str]) -> None:
    base = packages(STANDIN)
    # The stand-in's lowest versions, not requirements/search.txt's.
    assert (base["grpcio"], base["protobuf"], base["prometheus-client"]) == ("1.81.1", "6.33.5", "0.20.0")
    for name, image in images.items():
        got = packages(image)
        changed = {p: (v, got.get(p)) for p, v in base.items() if p not in ("pip", "setuptools", "wheel")
                   and got.get(p) != v}
        assert not changed, (name, changed)
        assert got["torch"] == base["torch"] and got["transformers"] == base["transformers"]
        # As root: uid 10001 cannot read every folder, and a find that fails would hide a torch.
        dists = podman("run", "--rm", "--user", "0", "--entrypoint", "/bin/sh", image, "-c",
                       "find / -xdev -name 'torch-*.dist-info' -path '*-packages/*' 2>/dev/null; "
                       "find / -xdev -name 'nvidia_*.dist-info' -path '*-packages/*' 2>/dev/null").stdout.split()
        assert dists == [f"{BASE_ENV}/lib/python3.11/site-packages/torch-{base['torch']}.dist-info"], (name, dists)
    # The reward image added the reward server's packages on top of the base's torch.
    assert "sentence-transformers" in packages(images["reward"])


def test_reward_server_starts_in_the_gpu_layout(images: dict[str, str]) -> None:
    """`ets reward-serve` as the image runs it (read-only root, tmpfs /tmp, uid 10001): a tiny
    math-shepherd PRM on the transformers backend, the packaged embedder; health SERVING. And
    a PRM tokenizer shipped as tokenizer.model only loads (sentencepiece, finding 2)."""
    name = f"ets-gpu-standin-reward-{os.getpid()}"
    setup = ("python -m ets.testing.tiny_models /models/tiny-prm --kind math-shepherd >/dev/null && "
             "python - <<'EOF'\n"
             "import pathlib, sentencepiece as spm\n"
             "from transformers import AutoTokenizer\n"
             "d = pathlib.Path('/tmp/spm'); d.mkdir()\n"
             "(d / 'c.txt').write_text('\\n'.join(f'Step {i}: {i} + {i} - {i} = {i} ки' for i in range(300)))\n"
             "spm.SentencePieceTrainer.train(input=str(d / 'c.txt'), model_prefix=str(d / 'tokenizer'), "
             "vocab_size=60, model_type='bpe', minloglevel=2)\n"
             "(d / 'tokenizer_config.json').write_text('{\"tokenizer_class\": \"LlamaTokenizer\"}')\n"
             "print('sentencepiece tokenizer:', AutoTokenizer.from_pretrained(d).tokenize('1 + 1 ки'))\n"
             "EOF\n"
             "exec ets reward-serve")
    env = ["-e", "ETS_DEVICE=cpu", "-e", "ETS_PRM_BACKEND=transformers", "-e", "ETS_PRM_TYPE=math-shepherd",
           "-e", "ETS_PRM_MODEL=/models/tiny-prm", "-e", "ETS_EMBEDDER_MODEL=", "-e", "HF_HUB_OFFLINE=1"]
    podman("run", "-d", "--name", name, *RUN_AS_DEPLOYED, "--network", "none", *env, "--entrypoint", "/bin/sh",
           images["reward"], "-c", setup)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", podman("logs", name, check=False).stderr[-4000:]
            if podman("exec", name, "ets", "health", "127.0.0.1:50052", "--timeout", "5", check=False).returncode == 0:
                break
            time.sleep(3)
        else:
            raise AssertionError("reward server not healthy: " + podman("logs", name, check=False).stderr[-4000:])
        logs = podman("logs", name, check=False)
        assert "sentencepiece tokenizer: ['▁1', '▁+', '▁1', '▁ки']" in logs.stdout + logs.stderr
    finally:
        podman("rm", "-f", "-t", "10", name, check=False, timeout=120)
