#!/usr/bin/env bash
# Build lenpred's container images, here or anywhere, with or without a Docker daemon.
#
#   docker/build.sh                       router + sidecar (the default)
#   docker/build.sh router sidecar engine-cpu
#   docker/build.sh engine                GPU engine, FROM the official SGLang image (needs a registry)
#
# Builder: `docker build` when a Docker daemon answers, else buildah (`apt-get install -y buildah`)
# with --isolation chroot and the storage driver in $STORAGE_DRIVER (default vfs; overlay uses far
# less disk where the kernel allows it). Base image: docker.io/library/python:3.11-slim-bookworm
# (--base to change it); when no container registry is reachable, a Debian bookworm base is made
# with `debootstrap --variant=minbase` plus python3 and committed locally as
# localhost/lenpred/debian-python:bookworm.
#
# Images get the names the Helm chart uses (ghcr.io/lenpred/lenpred-<component>:<version>[-cpu];
# LENPRED_REGISTRY changes the prefix), OCI labels (version, git revision, base), a non-root user
# (uid 10001) and no pip/apt caches. For each image the pinned package list (pip freeze) is written
# to docker/sbom/<image>.txt and its size is printed; the last line is a JSON summary.
#
# Options:
#   --base IMAGE         Python 3.11 base for router, sidecar and engine-cpu
#   --torch cpu|cuda     sidecar torch. cpu (tag <version>-cpu): a local CPU wheel (--torch-wheel, or
#                        one found in pip's find-links) or the PyTorch CPU index when it answers;
#                        cuda (tag <version>): PyPI's torch, which bundles CUDA (several GB).
#                        Default: cpu when a CPU torch is available, else cuda.
#   --torch-wheel FILE   the local torch wheel for --torch cpu
#   --sglang-image IMG   base of the GPU engine (default lmsysorg/sglang:v0.5.23)
#   --sbom-dir DIR       where the package lists go (default docker/sbom)
#   --ca-file FILE       CA bundle pip inside the build trusts (a TLS-intercepting proxy); passed as
#                        a build secret, never stored in an image. Default: $PIP_CERT or pip's
#                        configured `cert`, when set.
set -euo pipefail
LOG_PREFIX=build
# shellcheck source=docker/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$LENPRED_ROOT"

TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
SGLANG_IMAGE=docker.io/lmsysorg/sglang:v0.5.23
base="" torch="" torch_wheel="" sbom_dir="docker/sbom" ca_file="${PIP_CERT:-}"
components=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --base) base=$2; shift 2 ;;
    --torch) torch=$2; shift 2 ;;
    --torch-wheel) torch_wheel=$2; torch=${torch:-cpu}; shift 2 ;;
    --sglang-image) SGLANG_IMAGE=$2; shift 2 ;;
    --sbom-dir) sbom_dir=$2; shift 2 ;;
    --ca-file) ca_file=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    router|sidecar|engine-cpu|engine) components+=("$1"); shift ;;
    *) die "unknown argument '$1' (components: router sidecar engine-cpu engine; --help)" ;;
  esac
done
[[ ${#components[@]} -gt 0 ]] || components=(router sidecar)

[[ -n "$ca_file" ]] || ca_file=$(python3 -m pip config get global.cert 2>/dev/null || true)
secret_args=()
if [[ -n "$ca_file" ]]; then
  [[ -f "$ca_file" ]] || die "--ca-file $ca_file: no such file"
  secret_args=(--secret "id=pip-ca,src=$ca_file")
fi

REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[[ -z "$(git status --porcelain 2>/dev/null)" ]] || REVISION="$REVISION-dirty"
CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
WHEELS=docker/wheels            # extra local wheels offered to pip inside the build (git-ignored)
mkdir -p "$sbom_dir"

# ------------------------------------------------------------------------------------------------
# base image

# pull_ok REF: is REF local, or can it be pulled now?
pull_ok() {
  image_exists "$1" && return 0
  case "$BUILDER" in
    docker) timeout 300 docker pull -q "$1" >/dev/null 2>&1 ;;
    *) timeout 300 buildah pull --quiet "$1" >/dev/null 2>&1 ;;
  esac
}

# Debian bookworm (minbase) + python3 + venv, from Debian's mirror: no container registry needed.
bootstrap_base() {
  image_exists "$LENPRED_BOOTSTRAP_BASE" && return 0
  command -v debootstrap >/dev/null || die "no registry reachable and no debootstrap: apt-get install -y debootstrap"
  local mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}" root tar
  root=$(mktemp -d /var/tmp/lenpred-rootfs.XXXXXX)
  tar="$root.tar"
  log "no registry reachable: debootstrap --variant=minbase bookworm from $mirror (~1 min)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
  cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main
EOF
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/tmp/* \
         "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/cache/debconf/*-old
  tar -C "$root" --numeric-owner -cf "$tar" .
  rm -rf "$root"
  case "$BUILDER" in
    docker) docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tar" "$LENPRED_BOOTSTRAP_BASE" >/dev/null ;;
    *)
      local ctr
      ctr=$(buildah from --quiet scratch)
      buildah add --quiet "$ctr" "$tar" / >/dev/null
      buildah config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd python3 --label org.opencontainers.image.description="Debian bookworm minbase + python3 (debootstrap)" "$ctr"
      buildah commit --quiet --rm "$ctr" "$LENPRED_BOOTSTRAP_BASE" >/dev/null ;;
  esac
  rm -f "$tar"
  log "base $LENPRED_BOOTSTRAP_BASE: $(image_size_mb "$LENPRED_BOOTSTRAP_BASE") MB"
}

python_base() {
  if [[ -n "$base" ]]; then echo "$base"; return; fi
  if pull_ok "$LENPRED_PYTHON_IMAGE"; then echo "$LENPRED_PYTHON_IMAGE"; return; fi
  bootstrap_base
  echo "$LENPRED_BOOTSTRAP_BASE"
}

# ------------------------------------------------------------------------------------------------
# sidecar torch

# A CPU torch wheel from pip's configured find-links folders (a machine that keeps one locally).
find_local_cpu_torch() {
  local d f
  for d in $(python3 -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") ${PIP_FIND_LINKS:-}; do
    for f in "$d"/torch-*+cpu-cp311-*.whl; do
      if [[ -f "$f" ]]; then echo "$f"; return 0; fi
    done
  done
  return 0
}

torch_build_args=()
sidecar_suffix=""
resolve_torch() {
  rm -rf "$WHEELS"; mkdir -p "$WHEELS"
  [[ -n "$torch_wheel" ]] || torch_wheel=$(find_local_cpu_torch)
  if [[ "$torch" != cuda && -n "$torch_wheel" ]]; then
    [[ -f "$torch_wheel" ]] || die "--torch-wheel $torch_wheel: no such file"
    cp "$torch_wheel" "$WHEELS/"
    local v; v=$(basename "$torch_wheel" | cut -d- -f2)
    torch_build_args=(--build-arg "TORCH_REQUIREMENT=torch==$v")
    sidecar_suffix=-cpu
    log "sidecar torch: local wheel $(basename "$torch_wheel")"
  elif [[ "$torch" != cuda ]] && timeout 10 curl -fsS -o /dev/null "$TORCH_CPU_INDEX/torch/"; then
    torch_build_args=(--build-arg "TORCH_INDEX_URL=$TORCH_CPU_INDEX")
    sidecar_suffix=-cpu
    log "sidecar torch: $TORCH_CPU_INDEX"
  elif [[ "$torch" == cpu ]]; then
    die "--torch cpu: no local CPU wheel (--torch-wheel FILE) and $TORCH_CPU_INDEX does not answer"
  else
    log "sidecar torch: PyPI's default torch (bundles CUDA: several GB)"
  fi
}

# ------------------------------------------------------------------------------------------------
# build one image

build() {  # build DOCKERFILE REF BUILD-ARGS...
  local file=$1 ref=$2; shift 2
  local args=(-f "$file" -t "$ref" --build-arg "VERSION=$LENPRED_VERSION" --build-arg "REVISION=$REVISION"
              --build-arg "CREATED=$CREATED" ${secret_args[@]+"${secret_args[@]}"} "$@")
  local how=$BUILDER; [[ $BUILDER == docker ]] || how="buildah, storage $STORAGE_DRIVER"
  log "building $ref from $file ($how; $(free_gb) GB free)"
  local t0=$SECONDS
  case "$BUILDER" in
    docker) DOCKER_BUILDKIT=1 docker build --network host "${args[@]}" . ;;
    *) buildah bud --isolation chroot --network host --pull=never --layers=false --force-rm "${args[@]}" . ;;
  esac
  local secs=$(( SECONDS - t0 )) name
  name=$(basename "${ref%%:*}")-${ref##*:}
  # The pinned package list, read from the image itself (written there at build time).
  in_image "$ref" cat /opt/lenpred/sbom.txt > "$sbom_dir/$name.txt"
  local mb; mb=$(image_size_mb "$ref")
  log "built $ref: $mb MB in ${secs}s; packages: $sbom_dir/$name.txt ($(wc -l < "$sbom_dir/$name.txt") lines)"
  summary+=("$(printf '"%s": {"size_mb": %d, "build_s": %d, "sbom": "%s"}' "$ref" "$mb" "$secs" "$sbom_dir/$name.txt")")
  # vfs keeps a full copy per image: drop dangling intermediate images (the build stages) now.
  [[ "$BUILDER" == docker ]] || buildah rmi --prune >/dev/null 2>&1 || true
}

summary=()
needs_python_base=0
for c in "${components[@]}"; do [[ "$c" == engine ]] || needs_python_base=1; done
if (( needs_python_base )); then PY_BASE=$(python_base); log "python base: $PY_BASE"; fi
for c in "${components[@]}"; do
  case "$c" in
    router)
      build docker/router.Dockerfile "$(image_ref router)" --build-arg "PYTHON_IMAGE=$PY_BASE" ;;
    sidecar)
      resolve_torch
      build docker/sidecar.Dockerfile "$(image_ref sidecar "$sidecar_suffix")" --build-arg "PYTHON_IMAGE=$PY_BASE" \
        ${torch_build_args[@]+"${torch_build_args[@]}"}
      rm -rf "$WHEELS" ;;
    engine-cpu)
      (( $(free_gb) >= 40 )) || die "engine-cpu needs ~35 GB of free disk while it builds (an ~11 GB SGLang environment; vfs needs ~3x that): $(free_gb) GB free"
      build docker/engine-cpu.Dockerfile "$(image_ref engine -cpu)" --build-arg "PYTHON_IMAGE=$PY_BASE" ;;
    engine)
      pull_ok "$SGLANG_IMAGE" || die "cannot pull $SGLANG_IMAGE (no registry reachable?): build the GPU engine where Docker can pull it: docker build -f docker/engine.Dockerfile -t $(image_ref engine) ."
      build docker/engine.Dockerfile "$(image_ref engine)" --build-arg "SGLANG_IMAGE=$SGLANG_IMAGE" ;;
  esac
done
log "$(free_gb) GB free on the image store's disk"
printf '{%s}\n' "$(IFS=,; echo "${summary[*]}")"
