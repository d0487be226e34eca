"""What each container runs, module by module: the import check of every image build.

``ets`` loads its commands lazily and the servers import some packages only when they load a
model, so ``import ets.cli`` proves little: a stub that refuses the base image's protobuf, or a
backend that needs a newer transformers, would only fail when the container starts (and restarts
forever). ``scripts/install.sh`` imports every module of its profile here at build time
(``python -m ets.entrypoints PROFILE...``), and tests/deployment/test_base_range.py imports them on the
lowest package versions the SGLang base image may hold.
"""
from __future__ import annotations

import importlib
import sys

# The generated stubs, imported by both servers and their clients.
_STUBS = ("ets.api.v1.search_pb2", "ets.api.v1.search_pb2_grpc", "ets.api.v1.reward_pb2", "ets.api.v1.reward_pb2_grpc")

# profile (scripts/install.sh) -> modules its container imports while it serves.
CONTAINER_MODULES: dict[str, tuple[str, ...]] = {
    # ets serve, and the image's HEALTHCHECK (ets health).
    "search": ("ets.cli", "ets.service.main", "ets.service.server", "ets.service.openai_http", "ets.healthcheck",
               "ets.client.search", "math_verify", *_STUBS),
    # ets reward-serve with either model backend and the embedder (their model imports are lazy).
    "reward": ("ets.cli", "ets.reward.main", "ets.reward.server", "ets.reward.embedder",
               "ets.reward.backends.sglang_backend", "ets.reward.backends.transformers_backend",
               "ets.reward.client", "ets.healthcheck", "ets.models", *_STUBS,
               "sentence_transformers", "transformers", "safetensors", "huggingface_hub", "sentencepiece"),
    # ets policy-serve execs SGLang's server.
    "policy": ("ets.cli", "ets.engine.launcher", "sglang.launch_server", "sglang.srt.entrypoints.http_server"),
    # The SGLang engine alone (install.sh --profile engine: CI's stand-in of the base image).
    "engine": ("sglang.launch_server", "sglang.srt.entrypoints.http_server"),
    # The scale-out overlay's router.
    "router": ("sglang_router", "sglang_router.launch_router"),
}
CONTAINER_MODULES["all"] = tuple(dict.fromkeys(m for mods in CONTAINER_MODULES.values() for m in mods))


def check(profiles: list[str]) -> list[str]:
    """Import every module of ``profiles``; return 'module: error' for each that fails."""
    failed = []
    for profile in profiles:
        for name in CONTAINER_MODULES[profile]:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - any import failure is the finding
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
    return failed


def main(argv: list[str]) -> int:
    unknown = [p for p in argv if p not in CONTAINER_MODULES]
    if not argv or unknown:
        print(f"usage: python -m ets.entrypoints PROFILE... ({' '.join(CONTAINER_MODULES)})", file=sys.stderr)
        return 2
    failed = check(argv)
    for line in failed:
        print(f"ets.entrypoints: cannot import {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
