#!/usr/bin/env bash
# Before `docker compose up` on a GPU host: can this machine run the GPU images? SGLang 0.5.23's
# official image is built on CUDA 13, which needs NVIDIA driver R580 or newer and a GPU of
# compute capability 7.5+ (Turing or later: CUDA 13 dropped Maxwell, Pascal and Volta).
# Checks the GPUs compose pins (ETS_POLICY_GPU, ETS_REWARD_GPU; defaults 0 and 1).
#   scripts/gpu-preflight.sh        # exit 0: ready; 1: a check failed (each one printed)
set -uo pipefail
MIN_DRIVER=580 MIN_CAP=7.5
fail=0
say() { echo "gpu-preflight: $*"; }
if ! command -v nvidia-smi >/dev/null; then
  say "FAIL no nvidia-smi: install the NVIDIA driver (R${MIN_DRIVER}+) and the container toolkit"; exit 1
fi
rows=$(nvidia-smi --query-gpu=index,name,driver_version,compute_cap,memory.total --format=csv,noheader,nounits) \
  || { say "FAIL nvidia-smi cannot query the GPUs"; exit 1; }
declare -A seen=()
while IFS=, read -r index name driver cap mem; do
  index=${index// /}; driver=${driver// /}; cap=${cap// /}; mem=${mem// /}; name=${name# }
  seen[$index]=1
  ok=PASS
  if [ "${driver%%.*}" -lt $MIN_DRIVER ]; then ok=FAIL; why="driver $driver < R$MIN_DRIVER (CUDA 13)"
  elif awk -v c="$cap" -v m=$MIN_CAP 'BEGIN { exit !(c < m) }'; then ok=FAIL; why="compute capability $cap < $MIN_CAP (CUDA 13: no Volta or older)"
  else why="driver $driver, capability $cap, ${mem} MiB"; fi
  [ $ok = PASS ] || fail=1
  say "$ok GPU $index ($name): $why"
done <<<"$rows"
for var in ETS_POLICY_GPU ETS_REWARD_GPU; do
  default=0; [ $var = ETS_REWARD_GPU ] && default=1
  gpu=${!var:-$default}
  if [ -z "${seen[$gpu]:-}" ]; then say "FAIL $var=$gpu: no such GPU (set it to one listed above)"; fail=1
  else say "PASS $var=$gpu"; fi
done
exit $fail
