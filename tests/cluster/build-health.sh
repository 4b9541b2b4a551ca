#!/usr/bin/env bash
# Builds the GitOps health judges into a cache folder named after a hash of their sources, and
# prints the folder on its last line (nothing is rebuilt when both are there):
#   radfm-health       kstatus (sigs.k8s.io/cli-utils) and Argo CD's Lua health evaluation
#                      (health/, from their pinned Go modules)
#   radfm-flux-health  Flux's healthCheckExprs evaluator and Flux's kstatus fork (flux-health/:
#                      a module of its own, Flux pins newer k8s.io modules than Argo CD)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${RADFM_CACHE:-$HOME/.cache/radfm}
key=$(cat "$here"/health/go.mod "$here"/health/go.sum "$here"/health/main.go \
  "$here"/flux-health/go.mod "$here"/flux-health/go.sum "$here"/flux-health/main.go "$0" \
  | sha256sum | cut -c1-12)
out="$cache/health-tools-$key"
build() { # module-dir binary
  [ -x "$out/$2" ] && return 0
  echo "health-tools: building $2" >&2
  (cd "$here/$1" && GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 \
    go build -trimpath -ldflags="-s -w" -o "$out/$2.tmp" .)
  mv "$out/$2.tmp" "$out/$2"
}
if [ ! -x "$out/radfm-health" ] || [ ! -x "$out/radfm-flux-health" ]; then
  start=$(date +%s)
  mkdir -p "$out"
  build health radfm-health
  build flux-health radfm-flux-health
  for old in "$cache"/health-tools-* "$cache"/radfm-health-*; do
    [ "$old" = "$out" ] || rm -rf "$old"
  done
  echo "health-tools: built in $(( $(date +%s) - start ))s" >&2
fi
echo "$out"
