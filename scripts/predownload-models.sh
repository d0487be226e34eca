#!/usr/bin/env bash
# Download the GPU setup's models into compose's `models` volume before the first
# `docker compose up` (issue 16, finding 7): policy and PRM then start from the cache instead of
# downloading ~30 GB together inside their health-check windows. Interrupted downloads resume.
#
#   scripts/predownload-models.sh            # the models docker-compose.yml would use
#   COMPOSE="podman-compose" scripts/predownload-models.sh
#
# Runs the reward image (huggingface_hub, HF_HOME=/models/hf) once, with the same environment
# (ETS_POLICY_MODEL, ETS_PRM_MODEL, ETS_EMBEDDER_MODEL, HF_TOKEN) and volume as the services.
# On Kubernetes: docs/deployment.md, "Pre-downloading the models".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
read -r -a COMPOSE <<<"${COMPOSE:-docker compose}"
MODELS=("${ETS_POLICY_MODEL:-peiyi9979/mistral-7b-sft}"
        "${ETS_PRM_MODEL:-peiyi9979/math-shepherd-mistral-7b-prm}"
        "${ETS_EMBEDDER_MODEL:-math-similarity/Bert-MLM_arXiv-MP-class_zbMath}")
cd "$ROOT"
exec "${COMPOSE[@]}" run --rm --no-deps -T --entrypoint python reward -c '
import sys, time
from huggingface_hub import snapshot_download
for repo in sys.argv[1:]:
    t0 = time.monotonic()
    path = snapshot_download(repo)
    print(f"predownload: {repo} -> {path} ({time.monotonic() - t0:.0f} s)", flush=True)
' "${MODELS[@]}"
