package vmtest

import (
	"os"
	"strings"
	"testing"
)

func TestBinSetPrebuiltDir(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("KRUN_E2E_BIN_DIR", dir)
	b := BinSet{Name: "x", Pkgs: map[string]string{"nope": "example.invalid/nope"}}
	if got := b.Dir(t); got != dir {
		t.Fatalf("Dir = %q, want the prebuilt %q", got, dir)
	}
	b.Remove()
	if _, err := os.Stat(dir); err != nil {
		t.Fatal("Remove deleted a KRUN_E2E_BIN_DIR directory")
	}
}

func TestBinSetBuildError(t *testing.T) {
	t.Setenv("KRUN_E2E_BIN_DIR", "")
	b := BinSet{Name: "x", Pkgs: map[string]string{"nope": "github.com/krun-core/krun-core/no/such/package"}}
	dir, err := b.build()
	if dir != "" {
		defer os.RemoveAll(dir)
	}
	if err == nil || !strings.Contains(err.Error(), "no/such/package") {
		t.Fatalf("build error = %v, want one naming the package", err)
	}
}
