#!/usr/bin/env bash
# Does the chart deploy what was built? Renders the chart with its defaults and with each
# helm/examples/*.yaml, and checks every image it names against the local image store:
#
#   - every lenpred image in the local store is named by at least one rendering (built = deployed);
#   - every lenpred image a rendering names is in the store, or is one this machine cannot build
#     (the GPU engine FROM lmsysorg/sglang, the CUDA sidecar: listed, with how to build them), or one
#     not built in this run (listed with its build command);
#   - --strict NAME (repeatable; default cpu-only; --no-strict: none): every lenpred image of that
#     rendering is local.
#
# Third-party images (Redis, the helm-test curl) are listed: the cluster pulls them.
# Needs helm (.ci/install-helm.sh) and the builder build.sh used. Exit 0 only if all checks hold.
set -euo pipefail
LOG_PREFIX=chart-images
# shellcheck source=docker/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$LENPRED_ROOT"

HELM=${LENPRED_HELM:-$LENPRED_ROOT/.cache/bin/helm}
[[ -x "$HELM" ]] || HELM=$(command -v helm || true)
[[ -n "$HELM" ]] || die "helm not found: bash .ci/install-helm.sh .cache/bin"
strict=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --strict) strict+=("$2"); shift 2 ;;
    --no-strict) strict+=("-"); shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ ${#strict[@]} -gt 0 ]] || strict=(cpu-only)

prefix="$LENPRED_REGISTRY/lenpred-"
# Built only where a registry or a GPU toolchain is at hand, never by `docker/build.sh` here.
declare -A not_here=(
  ["$(image_ref engine)"]="GPU engine FROM lmsysorg/sglang:v0.5.23, cannot be built without Docker Hub: docker/build.sh engine"
  ["$(image_ref sidecar)"]="sidecar with PyPI's CUDA torch: docker/build.sh sidecar --torch cuda (several GB)"
)
declare -A build_cmd=(
  ["$(image_ref router)"]="docker/build.sh router"
  ["$(image_ref sidecar -cpu)"]="docker/build.sh sidecar --torch cpu"
  ["$(image_ref engine -cpu)"]="docker/build.sh engine-cpu"
)

errors=0
declare -A named=()
for values in default helm/examples/*.yaml; do
  name=$(basename "$values" .yaml)
  args=(template lenpred helm/lenpred)
  [[ "$values" == default ]] || args+=(-f "$values")
  images=$("$HELM" "${args[@]}" | sed -n 's/^ *image: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' | sort -u)
  for img in $images; do
    named[$img]=1
    if [[ "$img" != "$prefix"* ]]; then
      status="third-party (pulled by the cluster)"
    elif image_exists "$img"; then
      status="local ($(image_size_mb "$img") MB)"
    elif [[ -n "${not_here[$img]:-}" ]]; then
      status="not built here: ${not_here[$img]}"
    elif [[ -n "${build_cmd[$img]:-}" ]]; then
      status="not built in this run: ${build_cmd[$img]}"
    else
      status="ERROR: no build makes this image"; errors=$((errors + 1))
    fi
    if [[ " ${strict[*]} " == *" $name "* && "$img" == "$prefix"* ]] && ! image_exists "$img"; then
      status="ERROR (--strict $name): not in the local store"; errors=$((errors + 1))
    fi
    printf '%-16s %-48s %s\n' "$name" "$img" "$status"
  done
done

# Built here but deployed by nothing?
local_images=$(case "$BUILDER" in
  docker) docker images --format '{{.Repository}}:{{.Tag}}' ;;
  *) buildah images --format '{{.Name}}:{{.Tag}}' ;;
esac | grep "^$prefix" || true)
for img in $local_images; do
  if [[ -z "${named[$img]:-}" ]]; then
    printf '%-16s %-48s %s\n' "(local store)" "$img" "ERROR: built but named by no rendering of the chart"
    errors=$((errors + 1))
  fi
done
(( errors == 0 )) || die "$errors error(s)"
log "ok: every lenpred image in the local store ($BUILDER, storage $STORAGE_DRIVER) is one the chart deploys"
