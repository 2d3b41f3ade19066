package vmtest

import (
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// KVMProbePackage is a tiny static program that runs a few real-mode
// instructions through /dev/kvm and prints "KVMPROBE ok"; build it with
// BuildStatic to check, inside a nested guest, that KVM really runs code.
const KVMProbePackage = "github.com/krun-core/krun-core/internal/vmtest/internal/kvmprobe"

// goTool finds the go command: on PATH, else next to this test's GOROOT.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// BuildStatic builds the Go main package pkg (an import path such as
// "github.com/krun-core/krun-core/cmd/krun-core") as a static binary
// (CGO_ENABLED=0, -trimpath) for linux/amd64 into a temp dir and returns
// its path, ready for Initramfs.AddFile. It fails the test on error.
func BuildStatic(t testing.TB, pkg string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), path.Base(pkg))
	cmd := exec.CommandContext(testContext(t), goTool(), "build", "-trimpath", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("vmtest: go build %s: %v\n%s", pkg, err, strings.TrimSpace(string(b)))
	}
	return out
}
