#!/usr/bin/env bash
# podman with the settings of scripts/containers.sh (the store `make image` builds into), e.g.
#   scripts/podman.sh images
#   scripts/podman.sh system service --time 0 unix:///tmp/ipa-podman.sock &   # a Docker API
#   export DOCKER_HOST=unix:///tmp/ipa-podman.sock                             # for kfp.local
set -euo pipefail
command -v podman >/dev/null || {
    echo "error: podman not found; install it with: apt-get update && apt-get install -y podman runc fuse-overlayfs" >&2
    exit 2
}
source "$(dirname "$0")/containers.sh"
exec podman --runtime runc "${STORAGE[@]}" "$@"
