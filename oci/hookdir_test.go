package oci

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestFailedCreatePoststopRunsInTheBundle: the poststop hooks a failed
// create runs run in the bundle directory, as create's other hooks do and
// as runc's (its create changes into the bundle, and its destroy of the
// failed container runs there): they ran in the caller's directory, so a
// hook naming files relative to the bundle found them after a delete but
// not after a failed create.
func TestFailedCreatePoststopRunsInTheBundle(t *testing.T) {
	r := newRT(t)
	out := filepath.Join(t.TempDir(), "poststop")
	b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{
			CreateRuntime: []specs.Hook{{Path: "/bin/false"}},
			Poststop:      []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", "pwd -P > " + out}}},
		}
	})
	want, err := filepath.EvalSymlinks(b)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, code := r.run(nil, nil, "create", "--bundle", b, "pfd"); code == 0 {
		t.Fatal("create succeeded")
	}
	got, err := os.ReadFile(out)
	if err != nil || strings.TrimSpace(string(got)) != want {
		t.Errorf("the poststop hook of the failed create ran in %q (%v), want the bundle %s", got, err, want)
	}
}
