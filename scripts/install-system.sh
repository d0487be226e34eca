#!/usr/bin/env bash
# Debian packages the test suite needs (real Prometheus for the metrics tests, podman and
# debootstrap for the container tests). Idempotent; run as root (CI and dev machines are).
set -euo pipefail
# catatonit: the init podman runs as PID 1 for compose's `init: true`.
PKGS=(prometheus podman buildah runc fuse-overlayfs slirp4netns uidmap debootstrap netavark aardvark-dns iptables catatonit)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian prometheus package starts a system service where systemd runs; tests start their own.
echo "install-system.sh: ${#missing[@]} package(s) installed"
