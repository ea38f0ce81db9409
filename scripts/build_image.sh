#!/usr/bin/env bash
# `make image`: build the runtime image (components/Dockerfile) without Docker or Docker Hub.
#
#   1. a local Debian bookworm + Python 3.11 base, made once with mmdebstrap and `podman import`
#      (skipped when $BASE is already in the store);
#   2. `buildah bud --isolation chroot --layers` (store: scripts/containers.sh) with that base as
#      PYTHON_IMAGE, the host CA bundle as a build secret (pip's PIP_CERT) and the local wheel
#      folder (the CPU torch wheel) mounted at /run/wheels; neither ends up in the image.
#
# Environment (defaults): IMAGE=localhost/ipa-runtime:0.1.0  BASE=localhost/ipa-base:bookworm-py311
#   CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt  WHEELS=/opt/wheels
#   TORCH_INDEX_URL (default: none when $WHEELS holds a torch wheel, else the Dockerfile's)
#   STORAGE_DRIVER, STORAGE_OPTS (scripts/containers.sh: overlay via fuse-overlayfs, else vfs)
# Needs root (or a rootless buildah setup): apt-get install -y buildah podman runc mmdebstrap fuse-overlayfs
set -euo pipefail

IMAGE=${IMAGE:-localhost/ipa-runtime:0.1.0}
BASE=${BASE:-localhost/ipa-base:bookworm-py311}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WHEELS=${WHEELS:-/opt/wheels}
BASE_PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,libgl1,libglib2.0-0,libegl1,libgles2

cd "$(dirname "$0")/.."
for tool in buildah podman mmdebstrap; do
    command -v "$tool" >/dev/null || {
        echo "error: $tool not found; install it with: apt-get update && apt-get install -y buildah podman runc mmdebstrap fuse-overlayfs" >&2
        exit 2
    }
done
source scripts/containers.sh
echo "store: ${STORAGE[*]}"

started=$(date +%s)
if podman "${STORAGE[@]}" image exists "$BASE"; then
    echo "base image $BASE: present"
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "base image $BASE: mmdebstrap bookworm ($BASE_PACKAGES)"
    mmdebstrap --quiet --variant=apt --include="$BASE_PACKAGES" bookworm "$tmp/base.tar"
    podman "${STORAGE[@]}" import "$tmp/base.tar" "$BASE"
    rm -rf "$tmp"
fi

args=(bud --isolation chroot "${STORAGE[@]}" --layers -f components/Dockerfile -t "$IMAGE"
      --build-arg "PYTHON_IMAGE=$BASE" --label "ipa.source-digest=$(source_digest)")
if [ -s "$CA_BUNDLE" ]; then
    args+=(--secret "id=ca_bundle,src=$CA_BUNDLE")
fi
if [ -d "$WHEELS" ]; then
    args+=(--volume "$(realpath "$WHEELS"):/run/wheels:ro" --build-arg WHEELS_DIR=/run/wheels)
    if [ -z "${TORCH_INDEX_URL+set}" ] && compgen -G "$WHEELS/torch-*.whl" >/dev/null; then
        TORCH_INDEX_URL=""  # the PyTorch index may be unreachable; the wheel folder has torch
    fi
fi
if [ -n "${TORCH_INDEX_URL+set}" ]; then
    args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi

buildah "${args[@]}" .
size=$(podman "${STORAGE[@]}" image inspect --format '{{.Size}}' "$IMAGE")
echo "built $IMAGE in $(( $(date +%s) - started )) s, $(( size / 1000000 )) MB"
