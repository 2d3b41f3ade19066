package vmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"testing"
)

// BinSet builds a set of Go main packages, static (CGO_ENABLED=0), into one
// directory, once per test process: krun-core finds its plugins next to
// itself, so an end-to-end test builds them side by side. When
// KRUN_E2E_BIN_DIR is set, it names a directory of prebuilt binaries and
// nothing is built.
//
//	var bins = vmtest.BinSet{Name: "blk", Pkgs: map[string]string{
//		"krun-core": "github.com/krun-core/krun-core/cmd/krun-core", ...}}
//	func TestMain(m *testing.M) { code := m.Run(); bins.Remove(); os.Exit(code) }
type BinSet struct {
	Name string            // names the temporary directory
	Pkgs map[string]string // output file name -> import path

	once sync.Once
	dir  string
	err  error
}

// Dir returns the directory holding the binaries, building them on the
// first call; a build failure fails the test.
func (b *BinSet) Dir(t testing.TB) string {
	t.Helper()
	if d := os.Getenv("KRUN_E2E_BIN_DIR"); d != "" {
		return d
	}
	b.once.Do(func() { b.dir, b.err = b.build() })
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.dir
}

func (b *BinSet) build() (string, error) {
	dir, err := os.MkdirTemp("", "krun-e2e-"+b.Name+"-bin")
	if err != nil {
		return "", err
	}
	names := make([]string, 0, len(b.Pkgs))
	for n := range b.Pkgs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, out := range names {
		pkg := b.Pkgs[out]
		cmd := exec.Command(goTool(), "build", "-trimpath", "-o", filepath.Join(dir, out), pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if o, err := cmd.CombinedOutput(); err != nil {
			return dir, fmt.Errorf("vmtest: go build %s: %v\n%s", pkg, err, o)
		}
	}
	return dir, nil
}

// Remove deletes the built binaries (never a KRUN_E2E_BIN_DIR directory).
func (b *BinSet) Remove() {
	if b.dir != "" && os.Getenv("KRUN_E2E_BIN_DIR") == "" {
		os.RemoveAll(b.dir)
	}
}
