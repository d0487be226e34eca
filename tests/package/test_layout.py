"""The package's rooms (docs/search-core.md#code-map): what each may import, and that the search
image, built without ``ets.testing``, still has everything the service needs."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "services" / "ets"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*, skip: tuple[str, ...] = ("ets.api", "ets.testing")) -> dict[str, Path]:
    found = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {m: p for m, p in found.items() if not any(m == s or m.startswith(s + ".") for s in skip)}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, lazy imports inside functions included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_nothing_outside_testing_names_it() -> None:
    """Not as an import, nor as a module name in a string (a lazily imported command)."""
    offenders = {m: sorted(n for n in _imports(p) if n.startswith("ets.testing"))
                 for m, p in _sources().items()}
    assert not {m: n for m, n in offenders.items() if n}
    named = [m for m, p in _sources().items() if re.search(r"\bets\.testing\b", p.read_text())]
    assert not named, named


def test_search_core_does_no_io() -> None:
    """The algorithm's package imports nothing of the edges and no transport."""
    edges = ("ets.service", "ets.policy", "ets.reward", "ets.engine", "ets.client", "ets.evaluation")
    io = ("grpc", "aiohttp", "urllib", "socket", "subprocess", "http", "fastapi", "uvicorn", "prometheus_client")
    for module, path in _sources().items():
        if not module.startswith("ets.search"):
            continue
        bad = sorted(n for n in _imports(path) if n.split(".")[0] in io or n.startswith(edges))
        assert not bad, (module, bad)


def test_search_core_loads_no_edge_in_a_fresh_interpreter() -> None:
    """Transitively: importing the loop, the registry and the config, in a fresh interpreter, loads
    no module of the policy, the reward server, the service, the evaluation, the settings loader or
    the edge config (a folder loop through any of them would show up here, not only direct imports)."""
    edges = ("ets.policy", "ets.reward", "ets.service", "ets.settings", "ets.config", "ets.evaluation",
             "ets.engine", "ets.client")
    code = ("import sys, ets.search.loop, ets.search.selection, ets.search.config, ets.search.answers; "
            "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "ets.search.loop" in loaded
    bad = [m for m in loaded if m in edges or m.startswith(tuple(e + "." for e in edges))]
    assert not bad, bad


def test_servers_do_not_import_the_tools_at_the_edge() -> None:
    """The client and the evaluation use the servers' API, never the other way round."""
    for module, path in _sources().items():
        if module.startswith(("ets.service", "ets.reward", "ets.policy", "ets.engine", "ets.search")):
            bad = sorted(n for n in _imports(path) if n.startswith(("ets.client", "ets.evaluation")))
            assert not bad, (module, bad)


def _search_image_prefix() -> str:
    """The shell step Dockerfile.search runs on the copied sources before installing the project."""
    joined = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile.search").read_text())
    run = next(line for line in joined.splitlines() if line.startswith("RUN ") and "--stage project" in line)
    before, _, _ = run[len("RUN "):].partition("scripts/install.sh")
    return before.strip().removesuffix("&&").strip()


def test_search_image_is_built_without_testing(tmp_path: Path) -> None:
    """Dockerfile.search's own step, run on a copy of what it COPYs, then the package built as
    scripts/install.sh builds it (non-editable): the wheel has the service and not ets.testing."""
    step = _search_image_prefix()
    assert step, "Dockerfile.search installs the project without leaving ets/testing out"
    context = tmp_path / "opt-ets"
    shutil.copytree(ROOT / "services", context / "services",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    subprocess.run(["/bin/bash", "-o", "pipefail", "-c", step], cwd=context, check=True, timeout=60)
    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(wheels), str(context)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = wheels.glob("ets_search-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ets/service/server.py" in names and "ets/cli.py" in names
    assert not [n for n in names if n.startswith("ets/testing/")], step


def test_every_module_imports_without_testing() -> None:
    """What the search image holds imports with ``ets.testing`` absent, and ``ets --help`` lists
    no command that needs it."""
    probe = (
        "import importlib, importlib.abc, pkgutil, sys\n"
        "class Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ets.testing' or name.startswith('ets.testing.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "import ets, ets.cli\n"
        "for m in pkgutil.walk_packages(ets.__path__, 'ets.'):\n"
        "    if not m.name.startswith('ets.testing'):\n"
        "        importlib.import_module(m.name)\n"
        "for module, _ in ets.cli.COMMANDS.values():\n"
        "    importlib.import_module(module)\n"
        "ets.cli.main(['--help'])\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "serve" in res.stdout and "testing" not in res.stdout
