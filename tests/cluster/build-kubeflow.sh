#!/usr/bin/env bash
# Builds Kubeflow's training-operator v1 from its pinned Go module (kubeflow/ beside this script)
# into a cache folder named after a hash of the pins, with the CRDs and webhook configuration of
# the same module version next to it (what its release manifests install). Only
# `make bench-operator` uses it. Prints the folder on its last line; nothing is rebuilt when it
# is complete.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${RADFM_CACHE:-$HOME/.cache/radfm}
key=$(cat "$here"/kubeflow/go.mod "$here"/kubeflow/go.sum "$0" | sha256sum | cut -c1-12)
out="$cache/kubeflow-$key"
if [ ! -x "$out/training-operator" ] || [ ! -f "$out/role.yaml" ]; then
  start=$(date +%s)
  rm -rf "$out.tmp" && mkdir -p "$out.tmp/crds"
  export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
  (cd "$here/kubeflow" && go build -trimpath -ldflags="-s -w" -o "$out.tmp/training-operator" \
    github.com/kubeflow/training-operator/cmd/training-operator.v1)
  src=$(cd "$here/kubeflow" && go list -m -f '{{.Dir}}' github.com/kubeflow/training-operator)
  cp "$src"/manifests/base/crds/kubeflow.org_pytorchjobs.yaml "$out.tmp/crds/"
  cp "$src"/manifests/base/webhook/manifests.yaml "$out.tmp/webhooks.yaml"
  cp "$src"/manifests/base/rbac/role.yaml "$out.tmp/role.yaml"
  chmod -R u+w "$out.tmp"
  rm -rf "$out" && mv "$out.tmp" "$out"
  for old in "$cache"/kubeflow-*; do [ "$old" = "$out" ] || rm -rf "$old"; done
  echo "kubeflow: built in $(( $(date +%s) - start ))s" >&2
fi
echo "$out"
