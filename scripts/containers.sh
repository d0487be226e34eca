#!/usr/bin/env bash
# Build and run the project's CPU images with podman on a machine with no Docker engine and no
# registry (CI, dev machines). Used by tests/deployment/test_containers.py and by hand.
#
#   scripts/containers.sh env                 # print the exports that point podman at our config
#   scripts/containers.sh base                # debootstrapped Debian bookworm + python3 base image
#   scripts/containers.sh build [policy|reward|search|router ...]   # CPU variants (default: the first three)
#   scripts/containers.sh standin             # stand-in of the official SGLang image's layout
#   scripts/containers.sh build-gpu [policy|reward ...]      # GPU variants (--engine image) on it
#   scripts/containers.sh compose ARGS...     # podman-compose with the CPU override file
#
# Everything (podman storage, the rootfs, the base image) lives in ETS_CONTAINERS_CACHE
# (default /var/tmp/ets-containers) so repeated runs on the same machine reuse the base image
# and the cached dependency layers; each setting below says why it is there (docs/deployment.md:
# the CPU host).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${ETS_CONTAINERS_CACHE:-/var/tmp/ets-containers}
BASE_IMAGE=${ETS_BASE_IMAGE:-localhost/ets-bookworm-py:12}
# deploy/ci/Containerfile.sglang-standin: /opt/sglang venv first on PATH, SGLang's CPU install in it.
STANDIN_IMAGE=${ETS_STANDIN_IMAGE:-localhost/ets-sglang-standin:0.5.23}
TAG=${ETS_IMAGE_TAG:-cpu}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$CACHE"

write_conf() {
  # crun fails here (cgroups hybrid mode), default ulimits cannot be raised, no systemd/journald.
  cat >"$CACHE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
network_backend = "netavark"
EOF
  cat >"$CACHE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$CACHE/run"
EOF
}
write_conf
export CONTAINERS_CONF="$CACHE/containers.conf" CONTAINERS_STORAGE_CONF="$CACHE/storage.conf"
# Docker format keeps HEALTHCHECK (OCI drops it).
export BUILDAH_FORMAT=docker

cmd_env() {
  echo "export CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF BUILDAH_FORMAT=docker"
}

cmd_base() {
  if podman image exists "$BASE_IMAGE"; then echo "containers.sh: $BASE_IMAGE cached"; return; fi
  local rootfs="$CACHE/rootfs"
  if [ ! -f "$rootfs/.complete" ]; then
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    # HTTPS from builds goes through the host's CA set (a re-signing proxy on CI machines).
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
      chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
      "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    touch "$rootfs/.complete"
  fi
  tar -C "$rootfs" --exclude=./.complete -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  echo "containers.sh: $BASE_IMAGE imported"
}

torch_wheels() {
  # The CPU torch wheel: mounted from the host's wheel folder, else PyTorch's CPU index.
  if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
    wheels=(-v "$PIP_FIND_LINKS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels)
  else
    wheels=(--build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
  fi
}

cmd_standin() {
  cmd_base
  local wheels=() t0=$SECONDS; torch_wheels
  podman build --format docker --layers -f "$ROOT/deploy/ci/Containerfile.sglang-standin" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" "${wheels[@]}" -t "$STANDIN_IMAGE" "$ROOT" >"$CACHE/build-standin.log" 2>&1 \
    || { tail -40 "$CACHE/build-standin.log" >&2; echo "containers.sh: build of the stand-in failed" >&2; exit 1; }
  echo "containers.sh: $STANDIN_IMAGE built in $((SECONDS - t0)) s"
}

cmd_build_gpu() {
  # The GPU variants exactly as users build them (VARIANT=gpu), on the stand-in instead of
  # lmsysorg/sglang. No torch wheel is offered: a GPU build must not install torch at all.
  local images=("$@")
  [ ${#images[@]} -gt 0 ] || images=(policy reward)
  cmd_standin
  for name in "${images[@]}"; do
    local t0=$SECONDS
    podman build --format docker --layers -f "$ROOT/Dockerfile.$name" \
      --build-arg BASE_IMAGE="$STANDIN_IMAGE" --build-arg VARIANT=gpu \
      -t "localhost/ets-$name:gpu-standin" "$ROOT" >"$CACHE/build-gpu-$name.log" 2>&1 \
      || { tail -40 "$CACHE/build-gpu-$name.log" >&2; echo "containers.sh: GPU-mode build of $name failed" >&2; exit 1; }
    echo "containers.sh: localhost/ets-$name:gpu-standin built in $((SECONDS - t0)) s"
  done
}

cmd_build() {
  local images=("$@")
  [ ${#images[@]} -gt 0 ] || images=(search policy reward)
  cmd_base
  local wheels=(); torch_wheels
  for name in "${images[@]}"; do
    local t0=$SECONDS
    podman build --format docker --layers -f "$ROOT/Dockerfile.$name" \
      --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VARIANT=cpu "${wheels[@]}" \
      -t "localhost/ets-$name:$TAG" "$ROOT" >"$CACHE/build-$name.log" 2>&1 \
      || { tail -40 "$CACHE/build-$name.log" >&2; echo "containers.sh: build of $name failed" >&2; exit 1; }
    echo "containers.sh: localhost/ets-$name:$TAG built in $((SECONDS - t0)) s ($(podman image inspect --format '{{.Size}}' "localhost/ets-$name:$TAG") bytes)"
  done
  # Layers of superseded builds pile up in the cache; keep the recent ones (the build cache).
  podman image prune -f --filter until=72h >/dev/null 2>&1 || true
}

cmd_compose() {
  cd "$ROOT"
  ETS_IMAGE_TAG=$TAG exec "$ROOT/.venv/bin/podman-compose" -f docker-compose.yml -f docker-compose.cpu.yml "$@"
}

case "${1:-}" in
  env) cmd_env ;;
  base) cmd_base ;;
  build) shift; cmd_build "$@" ;;
  standin) cmd_standin ;;
  build-gpu) shift; cmd_build_gpu "$@" ;;
  compose) shift; cmd_compose "$@" ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
