#!/usr/bin/env bash
# Device smoke of the GPU path: see scripts/gpu_smoke.py (one line per check, exit 0 = all ran
# checks passed). Runs from a checkout with the project's Python packages importable (the
# reward image, the CI venv, or a machine with torch + transformers + requirements/reward.txt).
#   scripts/gpu-smoke.sh [--device cuda|cpu] [--sglang] [--work DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/services${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" "$ROOT/scripts/gpu_smoke.py" "$@"
