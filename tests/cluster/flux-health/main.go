// Command radfm-flux-health judges objects the way Flux's kustomize-controller does with a
// Kustomization's spec.healthCheckExprs, with Flux's own evaluator (github.com/fluxcd/pkg/runtime/cel,
// RFC 0009). It is a module of its own because Flux pins newer k8s.io modules than Argo CD.
//
//	radfm-flux-health KUSTOMIZATION
//	    reads one object or a List (JSON or YAML) on stdin and prints one JSON line per object,
//	    {"kind","name","flux","fluxError","fluxKstatus"}: the status the healthCheckExprs of the
//	    Flux Kustomization in file KUSTOMIZATION give it ("" when no expression names its kind,
//	    "Error" with fluxError when they cannot be evaluated), and the status Flux's own kstatus
//	    fork gives it without any expression.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"

	fluxstatus "github.com/fluxcd/cli-utils/pkg/kstatus/status"
	"github.com/fluxcd/pkg/apis/kustomize"
	"github.com/fluxcd/pkg/runtime/cel"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

type kustomization struct {
	Spec struct {
		HealthCheckExprs []kustomize.CustomHealthCheck `json:"healthCheckExprs"`
	} `json:"spec"`
}

type verdict struct {
	Kind        string `json:"kind"`
	Name        string `json:"name"`
	Flux        string `json:"flux"`
	FluxError   string `json:"fluxError,omitempty"`
	FluxKstatus string `json:"fluxKstatus"`
}

func main() {
	if len(os.Args) != 2 {
		fail(fmt.Errorf("usage: radfm-flux-health KUSTOMIZATION < objects"))
	}
	if err := eval(os.Args[1], os.Stdin, os.Stdout); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "radfm-flux-health:", err)
	os.Exit(1)
}

func eval(path string, in io.Reader, out io.Writer) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var k kustomization
	if err := yaml.Unmarshal(raw, &k); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	evaluators := map[string]*cel.StatusEvaluator{}
	for _, check := range k.Spec.HealthCheckExprs {
		e, err := cel.NewStatusEvaluator(&check.HealthCheckExpressions)
		if err != nil {
			return fmt.Errorf("%s: %s %s: %w", path, check.APIVersion, check.Kind, err)
		}
		evaluators[check.APIVersion+"/"+check.Kind] = e
	}
	input, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	doc, err := yaml.YAMLToJSON(input)
	if err != nil {
		return fmt.Errorf("stdin: %w", err)
	}
	decoded, _, err := unstructured.UnstructuredJSONScheme.Decode(doc, nil, nil)
	if err != nil {
		return fmt.Errorf("stdin: %w", err)
	}
	var objects []unstructured.Unstructured
	switch d := decoded.(type) {
	case *unstructured.UnstructuredList:
		objects = d.Items
	case *unstructured.Unstructured:
		objects = append(objects, *d)
	default:
		return fmt.Errorf("stdin: not an object or a List")
	}
	enc := json.NewEncoder(out)
	for i := range objects {
		obj := &objects[i]
		v := verdict{Kind: obj.GetKind(), Name: obj.GetName()}
		if e, ok := evaluators[obj.GetAPIVersion()+"/"+obj.GetKind()]; ok {
			// An expression that cannot be evaluated yet (no status at all) is what Flux
			// retries until the Kustomization's timeout.
			if res, err := e.Evaluate(context.Background(), obj); err != nil {
				v.Flux, v.FluxError = "Error", err.Error()
			} else {
				v.Flux = res.Status.String()
			}
		}
		res, err := fluxstatus.Compute(obj)
		if err != nil {
			return fmt.Errorf("%s %s: %w", v.Kind, v.Name, err)
		}
		v.FluxKstatus = res.Status.String()
		if err := enc.Encode(v); err != nil {
			return err
		}
	}
	return nil
}
