#!/usr/bin/env bash
# Builds the pinned Kubernetes test binaries (etcd, kube-apiserver, kube-scheduler, kubectl, kwok,
# helm) from the Go modules beside this script into a cache folder outside git.
# Idempotent: the output folder is named after a hash of the go.mod/go.sum files, and nothing is
# rebuilt when every binary is already there. Prints the folder on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${RADFM_CACHE:-$HOME/.cache/radfm}
key=$(cat "$here"/k8s/go.mod "$here"/k8s/go.sum "$here"/kwok/go.mod "$here"/kwok/go.sum \
  "$here"/helm/go.mod "$here"/helm/go.sum "$0" | sha256sum | cut -c1-12)
out="$cache/cluster-tools-$key"
want=(etcd kube-apiserver kube-scheduler kubectl kwok helm)
missing=0
for b in "${want[@]}"; do [ -x "$out/$b" ] || missing=1; done
if [ "$missing" = 0 ]; then echo "$out"; exit 0; fi
mkdir -p "$out.tmp"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
start=$(date +%s)
build() { # module-dir output-name package
  [ -x "$out.tmp/$2" ] && return 0
  echo "cluster-tools: building $2 ($3)" >&2
  (cd "$here/$1" && go build -trimpath -ldflags='-s -w' -o "$out.tmp/$2" "$3")
}
build k8s etcd go.etcd.io/etcd/server/v3
build k8s kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build k8s kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
build k8s kubectl k8s.io/kubernetes/cmd/kubectl
build kwok kwok sigs.k8s.io/kwok/cmd/kwok
build helm helm helm.sh/helm/v3/cmd/helm
rm -rf "$out"
mv "$out.tmp" "$out"
echo "cluster-tools: built in $(( $(date +%s) - start ))s" >&2
echo "$out"
