//go:build tools

// Package tools pins the kwok main package that 'make cluster-tools' builds.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
