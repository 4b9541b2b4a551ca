#!/usr/bin/env bash
# Builds the pinned Kubernetes test binaries from the Go modules beside this script into a cache
# folder outside git: the control plane (etcd, kube-apiserver, kube-scheduler,
# kube-controller-manager, kubectl), kwok and helm, and a real node (kubelet, kube-proxy,
# containerd and ctr, CoreDNS with the kubernetes plugin). k8s/ is one module for all of the
# first and the node, so the k8s.io/* packages they share compile once.
# Idempotent: the output folder is named after a hash of the go.mod/go.sum files, and nothing is
# rebuilt when every binary is already there. Prints the folder on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${RADFM_CACHE:-$HOME/.cache/radfm}
key=$(cat "$here"/k8s/go.mod "$here"/k8s/go.sum "$here"/k8s/cmd/coredns/main.go \
  "$here"/kwok/go.mod "$here"/kwok/go.sum "$here"/helm/go.mod "$here"/helm/go.sum "$0" \
  | sha256sum | cut -c1-12)
out="$cache/cluster-tools-$key"
want=(etcd kube-apiserver kube-scheduler kube-controller-manager kubectl kwok helm
  kubelet kube-proxy containerd containerd-shim-runc-v2 ctr coredns)
missing=0
for b in "${want[@]}"; do [ -x "$out/$b" ] || missing=1; done
if [ "$missing" = 0 ]; then echo "$out"; exit 0; fi
mkdir -p "$out.tmp"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
start=$(date +%s)
k8s_version=v1.36.3
# Version stamps the upstream release builds set, so `kubectl version` and Helm's kubeVersion
# checks see 1.36 instead of v0.0.0-master.
k8s_ldflags="-X k8s.io/component-base/version.gitVersion=$k8s_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36 -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=36"
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=v3.21.4 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=36 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=36"
build() { # module-dir output-name package [extra ldflags]
  [ -x "$out.tmp/$2" ] && return 0
  echo "cluster-tools: building $2 ($3)" >&2
  (cd "$here/$1" && go build -trimpath -ldflags="-s -w ${4:-}" -o "$out.tmp/$2" "$3")
}
build k8s etcd go.etcd.io/etcd/server/v3
build k8s kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build k8s kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$k8s_ldflags"
build k8s kubectl k8s.io/kubernetes/cmd/kubectl "$k8s_ldflags"
build k8s kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"
build k8s kubelet k8s.io/kubernetes/cmd/kubelet "$k8s_ldflags"
build k8s kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$k8s_ldflags"
containerd_ldflags="-X github.com/containerd/containerd/v2/version.Version=v2.3.7"
build k8s containerd github.com/containerd/containerd/v2/cmd/containerd "$containerd_ldflags"
build k8s containerd-shim-runc-v2 github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 "$containerd_ldflags"
build k8s ctr github.com/containerd/containerd/v2/cmd/ctr "$containerd_ldflags"
build k8s coredns ./cmd/coredns
build kwok kwok sigs.k8s.io/kwok/cmd/kwok
build helm helm helm.sh/helm/v3/cmd/helm "$helm_ldflags"
rm -rf "$out"
mv "$out.tmp" "$out"
# Older pins are no longer used.
for old in "$cache"/cluster-tools-*; do [ "$old" = "$out" ] || rm -rf "$old"; done
echo "cluster-tools: built in $(( $(date +%s) - start ))s" >&2
echo "$out"
