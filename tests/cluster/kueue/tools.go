//go:build tools

// Package tools pins Kueue's controller-manager, the quota and admission controller the tests
// run radfm's queue integration against (built from its Go module, installed with the CRDs and
// webhook configuration from the same module).
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
