#!/usr/bin/env bash
# Builds Kueue's controller-manager from its pinned Go module (kueue/ beside this script) into a
# cache folder named after a hash of the pins, with the CRDs and webhook configurations of the
# same module version next to it (what its release manifests install). Prints the folder on its
# last line; nothing is rebuilt when it is complete.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${RADFM_CACHE:-$HOME/.cache/radfm}
key=$(cat "$here"/kueue/go.mod "$here"/kueue/go.sum "$0" | sha256sum | cut -c1-12)
out="$cache/kueue-$key"
if [ ! -x "$out/kueue" ] || [ ! -f "$out/webhooks.yaml" ]; then
  start=$(date +%s)
  rm -rf "$out.tmp" && mkdir -p "$out.tmp/crds"
  export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
  (cd "$here/kueue" && go build -trimpath -ldflags="-s -w" -o "$out.tmp/kueue" sigs.k8s.io/kueue/cmd/kueue)
  src=$(cd "$here/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  cp "$src"/config/components/crd/bases/*.yaml "$out.tmp/crds/"
  cp "$src"/config/components/webhook/manifests.yaml "$out.tmp/webhooks.yaml"
  chmod -R u+w "$out.tmp"
  rm -rf "$out" && mv "$out.tmp" "$out"
  for old in "$cache"/kueue-*; do [ "$old" = "$out" ] || rm -rf "$old"; done
  echo "kueue: built in $(( $(date +%s) - start ))s" >&2
fi
echo "$out"
