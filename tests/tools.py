"""Command-line tools the deployment tests run (hadolint, kubectl, promtool, ...)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The venv's copy of a tool, else the system's; fail (not skip) when neither exists."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed (scripts/install.sh / scripts/install-system.sh install it)"
    return found
