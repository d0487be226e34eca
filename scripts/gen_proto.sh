#!/usr/bin/env bash
# Regenerate the Python gRPC stubs in services/ets/api/v1 from proto/ (committed; a test checks
# they are up to date). Needs grpcio-tools (requirements/dev.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-"$ROOT/.venv/bin/python"}
OUT=${1:-"$ROOT/services"}
"$PY" -m grpc_tools.protoc -I "$ROOT/proto" --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  "$ROOT"/proto/ets/api/v1/*.proto
