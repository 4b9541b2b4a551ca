//go:build tools

// Package tools pins Kubeflow Trainer v2 and JobSet, the third column of `make bench-operator`
// (TrainJob on JobSet), built from their Go modules with their CRDs and webhook configuration
// from the same module versions.
package tools

import (
	_ "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager"
	_ "sigs.k8s.io/jobset"
)
