#!/usr/bin/env bash
# The project's test command: installs everything it needs on a fresh machine (venv with the
# SGLang CPU engine, Debian packages), runs ruff and mypy, then the whole suite against real
# components.
#   scripts/test.sh [PYTEST ARGS...]        e.g. scripts/test.sh -m pure (tiers: docs/testing.md)
# The install is skipped when nothing it depends on changed since the last one here: a stamp in
# the venv holds a hash of the requirements, pyproject.toml, the install scripts, the CPU engine
# shim and this checkout's path. A clean clone (CI) has no venv and installs everything;
# ETS_FORCE_INSTALL=1 reinstalls anyway.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/install-system.sh
STAMP=.venv/.ets-install-stamp
inputs=$( { echo "$ROOT"; find requirements pyproject.toml scripts/install.sh scripts/install-system.sh deploy/cpu \
            -type f -not -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)
if [ "${ETS_FORCE_INSTALL:-0}" != 1 ] && [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$inputs" ]; then
  echo "test.sh: install inputs unchanged since the last install ($STAMP); skipping scripts/install.sh"
else
  rm -f "$STAMP"
  scripts/install.sh --profile all --editable
  echo "$inputs" > "$STAMP"
fi
# Console scripts of the venv (ets, grpcurl, hadolint, kubectl, ...) are used by tests and scripts.
export PATH="$ROOT/.venv/bin:$PATH"
# Lint and types first (configured in pyproject.toml): any finding fails the run before the suite.
echo "test.sh: ruff check"; .venv/bin/ruff check .
echo "test.sh: mypy"; .venv/bin/mypy
exec .venv/bin/python -m pytest -p no:cacheprovider -rA --durations=25 "$@"
