//go:build tools

// Package tools pins the helm main package that 'make cluster-tools' builds.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
