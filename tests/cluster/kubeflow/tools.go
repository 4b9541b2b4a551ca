//go:build tools

// Package tools pins Kubeflow's training-operator v1, the operator radfm's TrainingJob operator
// is benchmarked against (`make bench-operator`), built from its Go module with its CRDs from
// the same module version.
package tools

import _ "github.com/kubeflow/training-operator/cmd/training-operator.v1"
