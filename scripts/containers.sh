# Sourced by scripts/build_image.sh and scripts/podman.sh: the container settings that work on
# a machine without a usable kernel overlayfs or cgroup v2 (docs/containers.md):
#   STORAGE   storage flags shared by buildah and podman (same store, same driver):
#             overlay through fuse-overlayfs when it is installed (layers are diffs), else vfs
#             (every layer and every container is a full copy of the image: many GB per build);
#             override with STORAGE_DRIVER=vfs|overlay and STORAGE_OPTS.
#   CONTAINERS_CONF  (default .ipa/containers.conf, written if missing): runtime runc and no
#             default rlimits (crun fails on
#             hybrid cgroups; setting rlimits is refused in unprivileged sandboxes).
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${STORAGE_DRIVER:-}" ]; then
    if command -v fuse-overlayfs >/dev/null && [ -e /dev/fuse ]; then STORAGE_DRIVER=overlay; else STORAGE_DRIVER=vfs; fi
fi
STORAGE=(--storage-driver "$STORAGE_DRIVER")
if [ "$STORAGE_DRIVER" = overlay ] && [ -z "${STORAGE_OPTS+set}" ] && command -v fuse-overlayfs >/dev/null; then
    STORAGE_OPTS="overlay.mount_program=$(command -v fuse-overlayfs)"
fi
for _opt in ${STORAGE_OPTS:-}; do STORAGE+=(--storage-opt "$_opt"); done
export CONTAINERS_CONF="${CONTAINERS_CONF:-$_here/.ipa/containers.conf}"
if [ ! -e "$CONTAINERS_CONF" ]; then  # written once; an existing file (yours) is used as it is
    mkdir -p "$(dirname "$CONTAINERS_CONF")"
    printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' > "$CONTAINERS_CONF"
fi

# The sources an image was built from, as one digest: `make image` stores it as the image label
# ipa.source-digest, and tests/test_container.py skips an image built from other sources (stale).
source_digest() {
    (cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)" \
        && find ipa_lib components pipelines -name '*.py' -o -name Dockerfile | LC_ALL=C sort \
        | xargs sha256sum; sha256sum pyproject.toml requirements.lock) | sha256sum | cut -c1-16
}
