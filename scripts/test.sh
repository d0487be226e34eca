#!/usr/bin/env bash
# The project's test command: installs everything it needs on a fresh machine (venv with the
# SGLang CPU engine, Debian packages), then runs the whole suite against real components.
#   scripts/test.sh [PYTEST ARGS...]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/install-system.sh
scripts/install.sh --profile all --editable
# Console scripts of the venv (ets, grpcurl, hadolint, kubectl, ...) are used by tests and scripts.
export PATH="$ROOT/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -p no:cacheprovider -rA --durations=25 "$@"
