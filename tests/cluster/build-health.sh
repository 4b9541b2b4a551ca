#!/usr/bin/env bash
# Builds radfm-health (health/ beside this script: kstatus and Argo CD's Lua health evaluation,
# from their pinned Go modules) into a cache folder named after a hash of its sources; nothing is
# rebuilt when it is already there. Prints the binary's path on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${RADFM_CACHE:-$HOME/.cache/radfm}
key=$(cat "$here"/health/go.mod "$here"/health/go.sum "$here"/health/main.go "$0" | sha256sum | cut -c1-12)
out="$cache/radfm-health-$key"
if [ ! -x "$out/radfm-health" ]; then
  start=$(date +%s)
  mkdir -p "$out"
  (cd "$here/health" && GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 \
    go build -trimpath -ldflags="-s -w" -o "$out/radfm-health.tmp" .)
  mv "$out/radfm-health.tmp" "$out/radfm-health"
  for old in "$cache"/radfm-health-*; do [ "$old" = "$out" ] || rm -rf "$old"; done
  echo "radfm-health: built in $(( $(date +%s) - start ))s" >&2
fi
echo "$out/radfm-health"
