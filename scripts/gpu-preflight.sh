#!/usr/bin/env bash
# Before `docker compose up` on a GPU host: can this machine run the GPU images? SGLang 0.5.23's
# official image is built on CUDA 13, which needs NVIDIA driver R580 or newer and a GPU of
# compute capability 7.5+ (Turing or later: CUDA 13 dropped Maxwell, Pascal and Volta).
# Checks the GPUs compose pins (ETS_POLICY_GPU, ETS_REWARD_GPU; defaults 0 and 1), refuses both
# engines on one GPU unless the one-GPU profile is in COMPOSE_FILE (docker-compose.one-gpu.yml),
# and sizes each engine's KV pool by SGLang 0.5.23's own rule on those GPUs (needs python3:
# services/ets/engine/gpu_memory.py; the default models' shapes are known, others sized as 7B).
#   scripts/gpu-preflight.sh        # exit 0: ready; 1: a check failed (each one printed)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIN_DRIVER=580 MIN_CAP=7.5
fail=0
say() { echo "gpu-preflight: $*"; }
if ! command -v nvidia-smi >/dev/null; then
  say "FAIL no nvidia-smi: install the NVIDIA driver (R${MIN_DRIVER}+) and the container toolkit"; exit 1
fi
rows=$(nvidia-smi --query-gpu=index,name,driver_version,compute_cap,memory.total --format=csv,noheader,nounits) \
  || { say "FAIL nvidia-smi cannot query the GPUs"; exit 1; }
declare -A seen=() mib=()
while IFS=, read -r index name driver cap mem; do
  index=${index// /}; driver=${driver// /}; cap=${cap// /}; mem=${mem// /}; name=${name# }
  seen[$index]=1; mib[$index]=$mem
  ok=PASS
  if [ "${driver%%.*}" -lt $MIN_DRIVER ]; then ok=FAIL; why="driver $driver < R$MIN_DRIVER (CUDA 13)"
  elif awk -v c="$cap" -v m=$MIN_CAP 'BEGIN { exit !(c < m) }'; then ok=FAIL; why="compute capability $cap < $MIN_CAP (CUDA 13: no Volta or older)"
  else why="driver $driver, capability $cap, ${mem} MiB"; fi
  [ $ok = PASS ] || fail=1
  say "$ok GPU $index ($name): $why"
done <<<"$rows"
pinned_ok=1
for var in ETS_POLICY_GPU ETS_REWARD_GPU; do
  default=0; [ $var = ETS_REWARD_GPU ] && default=1
  gpu=${!var:-$default}
  if [ -z "${seen[$gpu]:-}" ]; then say "FAIL $var=$gpu: no such GPU (set it to one listed above)"; fail=1; pinned_ok=0
  else say "PASS $var=$gpu"; fi
done
policy_gpu=${ETS_POLICY_GPU:-0} reward_gpu=${ETS_REWARD_GPU:-1}
profile=two-gpu
case ":${COMPOSE_FILE:-}:" in *docker-compose.one-gpu.yml:*) profile=one-gpu ;; esac
if [ $profile = one-gpu ] && [ "$policy_gpu" != "$reward_gpu" ]; then
  say "FAIL one-GPU profile (COMPOSE_FILE) with ETS_POLICY_GPU=$policy_gpu, ETS_REWARD_GPU=$reward_gpu: set both to one GPU"
  fail=1; pinned_ok=0
elif [ $profile = two-gpu ] && [ "$policy_gpu" = "$reward_gpu" ]; then
  say "FAIL both engines pinned to GPU $policy_gpu without the one-GPU profile: SGLang sizes each KV pool from" \
      "the memory free when its engine starts, so with the two-GPU settings the second finds none. Use" \
      "COMPOSE_FILE=docker-compose.yml:docker-compose.one-gpu.yml (one 80 GB card), or two GPUs"
  fail=1; pinned_ok=0
else
  say "PASS profile $profile (policy on GPU $policy_gpu, reward on GPU $reward_gpu)"
fi
if [ $pinned_ok = 1 ]; then
  if ! command -v python3 >/dev/null; then
    say "FAIL no python3 for the memory check (services/ets/engine/gpu_memory.py)"; fail=1
  else
    args=(--profile "$profile" --policy-gpu-mib "${mib[$policy_gpu]}" --prm-gpu-mib "${mib[$reward_gpu]}"
          --policy-model "${ETS_POLICY_MODEL:-peiyi9979/mistral-7b-sft}"
          --prm-model "${ETS_PRM_MODEL:-peiyi9979/math-shepherd-mistral-7b-prm}")
    [ -n "${ETS_POLICY_MEM_FRACTION:-}" ] && args+=(--policy-fraction "$ETS_POLICY_MEM_FRACTION")
    [ -n "${ETS_PRM_MEM_FRACTION:-}" ] && args+=(--prm-fraction "$ETS_PRM_MEM_FRACTION")
    [ -n "${ETS_POLICY_MAX_TOTAL_TOKENS:-}" ] && args+=(--policy-max-tokens "$ETS_POLICY_MAX_TOTAL_TOKENS")
    [ -n "${ETS_PRM_MAX_TOTAL_TOKENS:-}" ] && args+=(--prm-max-tokens "$ETS_PRM_MAX_TOTAL_TOKENS")
    out=$(python3 "$ROOT/services/ets/engine/gpu_memory.py" "${args[@]}") || fail=1
    while IFS= read -r line; do [ -n "$line" ] && say "${line/ / memory: }"; done <<<"$out"
  fi
fi
exit $fail
