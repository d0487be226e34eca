#!/usr/bin/env bash
# Regenerate the Python gRPC stubs in services/ets/api/v1 from proto/ (committed;
# tests/deployment/test_base_range.py checks they are what this script makes). The generator is
# requirements/proto.txt's grpcio-tools, the oldest runtime the GPU images accept, installed into a
# cached venv of its own (not the project's: its protobuf is older than requirements/search.txt's).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-"$ROOT/services"}
GEN=${ETS_PROTO_VENV:-"${XDG_CACHE_HOME:-$HOME/.cache}/ets/proto-gen-$(sha256sum "$ROOT/requirements/proto.txt" | cut -c1-12)"}
if [ ! -x "$GEN/bin/python" ]; then
  python3 -m venv "$GEN.tmp.$$"
  "$GEN.tmp.$$/bin/python" -m pip install -q -r "$ROOT/requirements/proto.txt"
  mv "$GEN.tmp.$$" "$GEN" 2>/dev/null || rm -rf "$GEN.tmp.$$"  # another run may have made it meanwhile
fi
"$GEN/bin/python" -m grpc_tools.protoc -I "$ROOT/proto" --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  "$ROOT"/proto/ets/api/v1/*.proto
