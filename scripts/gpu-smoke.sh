#!/usr/bin/env bash
# Device smoke of the GPU path: see scripts/gpu_smoke.py (one line per check, exit 0 = all ran
# checks passed). Runs from a checkout with the project's Python packages importable (the
# reward image, the CI venv, or a machine with torch + transformers + requirements/reward.txt).
#   scripts/gpu-smoke.sh [--device cuda|cpu] [--sglang] [--work DIR] [--wheels DIR]
#   scripts/gpu-smoke.sh --prepare-wheels DIR   # here, with internet: what a lent machine lacks
# A lent machine has no internet: prepare the wheels on this side (gitignored .gpu-smoke-wheels/
# travels with the run, ~25 MB) and pass --wheels there.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" = --prepare-wheels ]; then
  DIR=${2:?usage: gpu-smoke.sh --prepare-wheels DIR}
  mkdir -p "$DIR"
  # The distributions gpu_smoke.py's CARRIED names, at requirements/search.txt's pins, and
  # their dependencies that a machine with torch/transformers/grpcio lacks (not numpy, grpcio,
  # sympy: the lent machines have them), for the CPython versions such a machine may run.
  pins=()
  for name in aiohttp highspy math-verify grpcio-health-checking grpcio-reflection protobuf threadpoolctl; do
    pins+=("$(grep -i "^$name==" "$ROOT/requirements/search.txt")")
  done
  deps=(aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna typing-extensions
        latex2sympy2-extended antlr4-python3-runtime==4.13.2)
  rm -f "$DIR"/*.whl
  for py in 3.10 3.11 3.12; do
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DIR" "${pins[@]}" "${deps[@]}"
  done
  echo "gpu-smoke: wheels for ${pins[*]} in $DIR ($(du -sh "$DIR" | cut -f1))"
  exit 0
fi
export PYTHONPATH="$ROOT/services${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" "$ROOT/scripts/gpu_smoke.py" "$@"
