"""Requirements for installing into a base image's own Python environment (install.sh --engine image).

The official SGLang image keeps SGLang, torch, sgl_kernel, transformers, numpy... in its own venv
(/opt/sglang since sgl-project/sglang#30612, first on PATH). The project installs into that
environment, and nothing it already holds may be replaced (a second torch, or another
transformers than the one its SGLang was built against, breaks the engine at run time):

    image_requirements.py constraints OUT          # the environment's packages, name==version
    image_requirements.py requirements OUT REQ...  # REQ files (-r followed), a pin of a package
                                                   #   the environment holds gives way to its version
    image_requirements.py check BEFORE             # fail if a package of BEFORE changed version

Run with the environment's own python (``python3 -m pip`` must be that environment's pip).
No third-party imports: the base environment is all there is.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

# Build tools, not runtime: the project's build may need a newer setuptools than the image ships.
NOT_CONSTRAINED = frozenset({"pip", "setuptools", "wheel"})
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)\s*$")


def canonical(name: str) -> str:
    """PEP 503 normalized name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """canonical name -> version of every distribution in this interpreter's environment."""
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                         check=True).stdout
    return {canonical(d["name"]): d["version"] for d in json.loads(out)}


def constraints(packages: dict[str, str]) -> list[str]:
    return [f"{name}=={version}" for name, version in sorted(packages.items()) if name not in NOT_CONSTRAINED]


def read_requirements(path: Path, seen: set[Path] | None = None) -> list[str]:
    """The ``name==version`` lines of ``path`` and the files it includes with ``-r`` (in order)."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            lines += read_requirements(path.parent / line[3:].strip(), seen)
            continue
        if not _PIN.match(line):
            raise SystemExit(f"image_requirements: {path}: only exact pins (name==version) and -r "
                             f"are supported: {raw!r}")
        lines.append(line)
    return lines


def requirements(files: list[Path], packages: dict[str, str]) -> list[str]:
    """The pins of ``files``; those of packages the environment holds become bare names, so the
    constraint (the environment's version) decides and pip keeps what is there."""
    out: list[str] = []
    done: set[str] = set()
    for line in (line for f in files for line in read_requirements(f)):
        match = _PIN.match(line)
        assert match is not None
        name = canonical(match.group(1))
        if name in done:
            continue
        done.add(name)
        out.append(name if name in packages and name not in NOT_CONSTRAINED else line)
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Packages of ``before`` that are gone or at another version in ``after``."""
    return [f"{name} {version} -> {after.get(name, 'removed')}" for name, version in sorted(before.items())
            if name not in NOT_CONSTRAINED and after.get(name) != version]


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "constraints":
        Path(argv[1]).write_text("\n".join(constraints(installed())) + "\n")
        return 0
    if len(argv) >= 3 and argv[0] == "requirements":
        Path(argv[1]).write_text("\n".join(requirements([Path(a) for a in argv[2:]], installed())) + "\n")
        return 0
    if len(argv) == 2 and argv[0] == "check":
        before = {canonical(n): v for n, _, v in (line.partition("==") for line in Path(argv[1]).read_text().split())}
        bad = changed(before, installed())
        if bad:
            print("image_requirements: the install replaced the base image's packages: " + "; ".join(bad),
                  file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
