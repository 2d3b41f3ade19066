package qcow2

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// needQemu skips the test when the QEMU image tools are missing.
func needQemu(t testing.TB) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian package qemu-utils); it builds and cross-checks the test images", tool)
		}
	}
}

// sh runs a QEMU tool and fails the test on error.
func sh(t testing.TB, name string, args ...string) string {
	t.Helper()
	return shDir(t, "", name, args...)
}

// shDir is sh run in dir. QEMU 7.2 resolves a relative external data file
// name against its working directory, so tools working on such images run
// in the image's directory.
func shDir(t testing.TB, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qio runs qemu-io commands on a qcow2 image.
func qio(t testing.TB, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, path)
	out := shDir(t, filepath.Dir(path), "qemu-io", args...)
	if strings.Contains(out, "failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io %v: %s", cmds, out)
	}
}

// qemuRaw returns the virtual content of an image as qemu-img sees it.
func qemuRaw(t testing.TB, path string, extra ...string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "raw")
	args := append([]string{"convert"}, extra...)
	args = append(args, "-O", "raw", path, out)
	shDir(t, filepath.Dir(path), "qemu-img", args...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// qemuCheck runs qemu-img check and returns its JSON fields of interest.
type qemuCheckResult struct {
	Corruptions, Leaks, CheckErrors int
	Output                          string
}

func qemuCheck(t testing.TB, path string) qemuCheckResult {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "--output=json", path)
	cmd.Dir = filepath.Dir(path)
	out, _ := cmd.Output()
	var r qemuCheckResult
	r.Output = string(out)
	r.Corruptions = jsonInt(string(out), "corruptions")
	r.Leaks = jsonInt(string(out), "leaks")
	r.CheckErrors = jsonInt(string(out), "check-errors")
	if !strings.Contains(string(out), "check-errors") {
		// qemu-img could not check at all.
		cmd := exec.Command("qemu-img", "check", path)
		cmd.Dir = filepath.Dir(path)
		human, _ := cmd.CombinedOutput()
		r.CheckErrors = -1
		r.Output += string(human)
	}
	return r
}

func jsonInt(s, key string) int {
	i := strings.Index(s, `"`+key+`"`)
	if i < 0 {
		return 0
	}
	var v int
	rest := s[i+len(key)+2:]
	rest = strings.TrimLeft(rest, ": \n\t")
	fmt.Sscan(rest, &v)
	return v
}

func qemuClean(t testing.TB, path string) {
	t.Helper()
	r := qemuCheck(t, path)
	if r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
		human, _ := exec.Command("qemu-img", "check", path).CombinedOutput()
		t.Fatalf("qemu-img check %s not clean: %s\n%s", path, r.Output, human)
	}
}

// openFile opens path for the image under test.
func openFile(t testing.TB, path string, ro bool) *os.File {
	t.Helper()
	flag := os.O_RDWR
	if ro {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// layerOf opens a backing layer read-only.
func layerOf(t testing.TB, path string, format disk.Format) Layer {
	t.Helper()
	return Layer{File: openFile(t, path, true), Format: format, Path: path}
}

// openImage opens a qcow2 image with the given declared chain.
func openImage(t testing.TB, path string, ro bool, chain ...Layer) *Image {
	t.Helper()
	im, err := Open(openFile(t, path, ro), Options{ReadOnly: ro, Path: path, Backing: chain})
	if err != nil {
		t.Fatalf("Open %s: %v", path, err)
	}
	return im
}

// openKilledCopy opens, read-only, a copy of the file at path as it is
// now: what a plugin killed at this point leaves for the next one, opened
// apart from the image still open on path.
func openKilledCopy(t testing.TB, path string, chain ...Layer) *Image {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	killed := filepath.Join(t.TempDir(), "killed.qcow2")
	if err := os.WriteFile(killed, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return openImage(t, killed, true, chain...)
}

// compareImage reads all of im in assorted request sizes and compares it
// with want.
func compareImage(t testing.TB, im disk.Disk, want []byte, seed int64) {
	t.Helper()
	if im.Size() != int64(len(want)) {
		t.Fatalf("size %d, want %d", im.Size(), len(want))
	}
	got := make([]byte, len(want))
	// Sequential, 1 MiB requests.
	for off := 0; off < len(want); off += 1 << 20 {
		end := min(off+1<<20, len(want))
		if _, err := im.ReadAt(got[off:end], int64(off)); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", off, end-off, err)
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("content differs at byte %d (sequential read)", firstDiff(got, want))
	}
	// Random offsets and lengths.
	r := rand.New(rand.NewSource(seed))
	for i := 0; i < 300 && len(want) > 0; i++ {
		off := r.Intn(len(want))
		n := 1 + r.Intn(min(len(want)-off, 1+r.Intn(300<<10)))
		buf := make([]byte, n)
		if _, err := im.ReadAt(buf, int64(off)); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
		}
		if !bytes.Equal(buf, want[off:off+n]) {
			t.Fatalf("ReadAt(%d, %d) differs at byte %d", off, n, off+firstDiff(buf, want[off:off+n]))
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
