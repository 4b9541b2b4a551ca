// Command radfm-health judges objects the way GitOps tools do, with those tools' own code:
// kstatus (sigs.k8s.io/cli-utils, what Flux's health checks use) and Argo CD's Lua health
// evaluation (util/lua, fed by util/settings reading an argocd-cm ConfigMap). radfm's tests use
// it so that health is checked against the real libraries, not a reimplementation of them.
//
//	radfm-health test DIR
//	    runs every DIR/<group>/<Kind>/health_test.yaml against the health.lua beside it, in Argo
//	    CD's own test format (resource_customizations upstream); exits 1 on any mismatch.
//	radfm-health eval ARGOCD_CM
//	    reads one object or a List (JSON or YAML) on stdin and prints one JSON line per object:
//	    {"kind","name","kstatus","kstatusMessage","argocd","argocdMessage"}, with Argo CD's
//	    health from the overrides of the argocd-cm ConfigMap in file ARGOCD_CM.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/argoproj/argo-cd/v3/util/lua"
	"github.com/argoproj/argo-cd/v3/util/settings"
	"github.com/argoproj/gitops-engine/pkg/health"
	log "github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

func main() {
	log.SetLevel(log.WarnLevel)
	if len(os.Args) != 3 {
		fail(fmt.Errorf("usage: radfm-health test DIR | radfm-health eval ARGOCD_CM < objects"))
	}
	var err error
	switch os.Args[1] {
	case "test":
		err = runTests(os.Args[2])
	case "eval":
		err = eval(os.Args[2], os.Stdin, os.Stdout)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "radfm-health:", err)
	os.Exit(1)
}

type healthTests struct {
	Tests []struct {
		InputPath    string              `json:"inputPath"`
		HealthStatus health.HealthStatus `json:"healthStatus"`
	} `json:"tests"`
}

// runTests is Argo CD's TestLuaHealthScript over DIR: the health.lua of each kind against its
// health_test.yaml cases.
func runTests(dir string) error {
	scripts, err := filepath.Glob(filepath.Join(dir, "*", "*", "health.lua"))
	if err != nil {
		return err
	}
	if len(scripts) == 0 {
		return fmt.Errorf("no */*/health.lua under %s", dir)
	}
	failed := 0
	for _, script := range scripts {
		kindDir := filepath.Dir(script)
		var cases healthTests
		if err := readYAML(filepath.Join(kindDir, "health_test.yaml"), &cases); err != nil {
			return err
		}
		if len(cases.Tests) == 0 {
			return fmt.Errorf("%s: no tests", kindDir)
		}
		lua_, err := os.ReadFile(script)
		if err != nil {
			return err
		}
		for _, c := range cases.Tests {
			obj := &unstructured.Unstructured{}
			if err := readYAML(filepath.Join(kindDir, c.InputPath), &obj.Object); err != nil {
				return err
			}
			vm := lua.VM{}
			got, err := vm.ExecuteHealthLua(obj, string(lua_))
			if err != nil {
				return fmt.Errorf("%s %s: %w", kindDir, c.InputPath, err)
			}
			if *got != c.HealthStatus {
				failed++
				fmt.Printf("FAIL %s %s: got %+v, want %+v\n", kindDir, c.InputPath, *got, c.HealthStatus)
			} else {
				fmt.Printf("ok   %s %s: %s\n", kindDir, c.InputPath, got.Status)
			}
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d health test(s) failed", failed)
	}
	return nil
}

type verdict struct {
	Kind           string `json:"kind"`
	Name           string `json:"name"`
	Kstatus        string `json:"kstatus"`
	KstatusMessage string `json:"kstatusMessage"`
	Argocd         string `json:"argocd"`
	ArgocdMessage  string `json:"argocdMessage"`
}

// eval judges every object on stdin with kstatus and with Argo CD's health overrides as its
// settings manager reads them from the argocd-cm ConfigMap in file cmPath.
func eval(cmPath string, in io.Reader, out io.Writer) error {
	var cm corev1.ConfigMap
	if err := readYAML(cmPath, &cm); err != nil {
		return err
	}
	if cm.Namespace == "" {
		cm.Namespace = "argocd"
	}
	client := fake.NewClientset(&cm)
	mgr := settings.NewSettingsManager(context.Background(), client, cm.Namespace)
	overrides, err := mgr.GetResourceOverrides()
	if err != nil {
		return fmt.Errorf("%s: %w", cmPath, err)
	}
	raw, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	// Decoded as the API machinery decodes objects, so that integers stay int64 for kstatus.
	doc, err := yaml.YAMLToJSON(raw)
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
		res, err := status.Compute(obj)
		if err != nil {
			return fmt.Errorf("kstatus of %s %s: %w", v.Kind, v.Name, err)
		}
		v.Kstatus, v.KstatusMessage = res.Status.String(), res.Message
		hs, err := lua.ResourceHealthOverrides(overrides).GetResourceHealth(obj)
		if err != nil {
			return fmt.Errorf("argo cd health of %s %s: %w", v.Kind, v.Name, err)
		}
		if hs != nil {
			v.Argocd, v.ArgocdMessage = string(hs.Status), hs.Message
		}
		if err := enc.Encode(v); err != nil {
			return err
		}
	}
	return nil
}

func readYAML(path string, into any) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := yaml.Unmarshal(raw, into); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
