# Shared by docker/build.sh, docker/smoke.sh and docker/chart-images.sh (sourced, not run).
#
# One place decides which builder runs, which image names the chart expects, and which local
# storage buildah uses, so that what build.sh makes is what smoke.sh runs and what the chart names.

# The image store's driver. vfs works everywhere (also inside unprivileged containers) at the price
# of one full copy of the file system per layer and per container; overlay (STORAGE_DRIVER=overlay)
# needs a kernel that lets you mount it and keeps one copy. Each driver is a separate store.
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
# buildah 1.28 (Debian bookworm) ignores $STORAGE_DRIVER and defaults to overlay: pass it always.
buildah() { command buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

LENPRED_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The chart's image names (helm/lenpred/values.yaml): <registry>/lenpred-<component>:<tag>.
LENPRED_REGISTRY="${LENPRED_REGISTRY:-ghcr.io/lenpred}"
# Tag = chart appVersion = package version, read from pyproject.toml (one source of truth;
# tests/test_helm.py checks that Chart.yaml agrees).
LENPRED_VERSION="${LENPRED_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$LENPRED_ROOT/pyproject.toml" | head -1)}"
# The local base image that debootstrap makes when no registry is reachable.
LENPRED_BOOTSTRAP_BASE="${LENPRED_BOOTSTRAP_BASE:-localhost/lenpred/debian-python:bookworm}"
# The public base a user gets by default (fully qualified: buildah does not guess registries).
LENPRED_PYTHON_IMAGE="${LENPRED_PYTHON_IMAGE:-docker.io/library/python:3.11-slim-bookworm}"

log() { printf '[%s] %s\n' "${LOG_PREFIX:-lenpred}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# image_ref COMPONENT [TAG-SUFFIX] -> the name the chart uses, e.g. ghcr.io/lenpred/lenpred-router:0.1.0
image_ref() { printf '%s/lenpred-%s:%s%s' "$LENPRED_REGISTRY" "$1" "$LENPRED_VERSION" "${2:-}"; }

# docker when a daemon answers (a docker client alone is not enough), else buildah.
detect_builder() {
  if [[ -n "${LENPRED_BUILDER:-}" ]]; then
    echo "$LENPRED_BUILDER"
  elif command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; then
    echo docker
  elif command -v buildah >/dev/null 2>&1; then
    echo buildah
  else
    die "no Docker daemon and no buildah: apt-get install -y buildah (Debian/Ubuntu), or start Docker"
  fi
}

# image_exists REF: is REF in the builder's local store?
image_exists() {
  case "$BUILDER" in
    docker) docker image inspect "$1" >/dev/null 2>&1 ;;
    *) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
  esac
}

# image_size_mb REF: uncompressed size of REF in MB (10^6 bytes).
image_size_mb() {
  local bytes
  case "$BUILDER" in
    docker) bytes=$(docker image inspect --format '{{.Size}}' "$1") ;;
    *) # buildah prints a human size ("170 MB", "1.2 GB"): back to MB
      buildah images --format '{{.Size}}' "$1" | head -1 | awk '{m = ($2 == "GB") ? 1000 : ($2 == "kB" || $2 == "KB") ? 0.001 : ($2 == "B") ? 0.000001 : 1; printf "%d\n", $1 * m}'
      return ;;
  esac
  echo $(( ${bytes:-0} / 1000000 ))
}

# free_gb [PATH]: free space (GB) on the file system holding PATH (or its nearest existing parent).
free_gb() {
  local p="${1:-/var/lib/containers}"
  while [[ ! -e "$p" ]]; do p=$(dirname "$p"); done
  df -Pk "$p" | awk 'NR==2 {print int($4/1024/1024)}'
}

# in_image REF CMD...: run CMD in a throw-away container of REF (as the image's user) and print
# its output. buildah containers share the host network (chroot isolation).
in_image() {
  local ref=$1; shift
  case "$BUILDER" in
    docker) docker run --rm --network host --entrypoint "$1" "$ref" "${@:2}" ;;
    *)
      local ctr rc=0
      ctr=$(buildah from --pull=never --quiet "$ref")
      buildah run --isolation chroot --network host "$ctr" -- "$@" || rc=$?
      buildah rm "$ctr" >/dev/null
      return $rc ;;
  esac
}

BUILDER="$(detect_builder)"
