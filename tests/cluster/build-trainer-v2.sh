#!/usr/bin/env bash
# Builds Kubeflow Trainer v2 (its controller manager) and JobSet from their pinned Go modules
# (trainer-v2/ beside this script) into a cache folder named after a hash of the pins, with the
# kustomize trees of the same module versions next to them: Trainer's manager overlay without
# its remote JobSet reference, JobSet's default config, and the torch-distributed
# ClusterTrainingRuntime. Only `make bench-operator` uses it. Prints the folder on its last
# line; nothing is rebuilt when it is complete.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${RADFM_CACHE:-$HOME/.cache/radfm}
key=$(cat "$here"/trainer-v2/go.mod "$here"/trainer-v2/go.sum "$0" | sha256sum | cut -c1-12)
out="$cache/trainer-v2-$key"
if [ ! -x "$out/jobset" ] || [ ! -f "$out/torch_distributed.yaml" ]; then
  start=$(date +%s)
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
  cd "$here/trainer-v2"
  go build -trimpath -ldflags="-s -w" -o "$out.tmp/trainer-controller-manager" \
    github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager
  go build -trimpath -ldflags="-s -w" -o "$out.tmp/jobset" sigs.k8s.io/jobset
  trainer=$(go list -m -f '{{.Dir}}' github.com/kubeflow/trainer/v2)
  jobset=$(go list -m -f '{{.Dir}}' sigs.k8s.io/jobset)
  cp -r "$trainer/manifests" "$out.tmp/trainer"
  cp -r "$jobset/config" "$out.tmp/jobset-config"
  chmod -R u+w "$out.tmp"
  # JobSet is installed from its own module, not from the release URL this overlay names.
  sed -i '/third-party\/jobset/d' "$out.tmp/trainer/overlays/manager/kustomization.yaml"
  cp "$trainer/manifests/base/runtimes/torch_distributed.yaml" "$out.tmp/torch_distributed.yaml"
  rm -rf "$out" && mv "$out.tmp" "$out"
  for old in "$cache"/trainer-v2-*; do [ "$old" = "$out" ] || rm -rf "$old"; done
  echo "trainer-v2: built in $(( $(date +%s) - start ))s" >&2
fi
echo "$out"
