package vmtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// DynamicProgram returns the files that place a dynamically linked host
// program (qemu-storage-daemon, virtiofsd, passt) in a guest's initramfs at
// its own path, with the shared libraries ldd names, so that it runs in the
// outer guest of a nested test. It skips the test when ldd cannot tell.
func DynamicProgram(t testing.TB, path string) []File {
	t.Helper()
	files := []File{{Dst: path, Src: path, Mode: 0o755}}
	out, err := exec.Command("ldd", path).Output()
	if err != nil {
		t.Skipf("ldd %s: %v", path, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if !strings.HasPrefix(f, "/") {
				continue
			}
			if _, err := os.Stat(f); err != nil {
				continue
			}
			real, err := filepath.EvalSymlinks(f)
			if err != nil {
				t.Fatal(err)
			}
			files = append(files, File{Dst: f, Src: real, Mode: 0o755})
		}
	}
	return files
}
