package img_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fileSize returns path's length.
func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// TestResizeRaw runs img resize on raw files through the sandboxed plugin:
// growing (absolute and relative), shrinking only with --shrink, and
// refusals that leave the file as it was. qemu-img info agrees on the
// size where qemu-img is installed.
func TestResizeRaw(t *testing.T) {
	krunCore(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "disk.raw")
	content := []byte(strings.Repeat("krun-core resize ", 256))
	if err := os.WriteFile(p, content, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		args []string // after "resize"
		code int
		size int64  // the file's size after
		err  string // the whole stderr line after "krun-core img resize: PATH: " when refused
	}{
		{[]string{"--format", "raw", p, "64M"}, 0, 64 << 20, ""},
		{[]string{"-f", "raw", p, "+1M"}, 0, 65 << 20, ""},
		{[]string{"-f", "raw", p, "-1M"}, 1, 65 << 20,
			"shrinking from 68157440 to 67108864 bytes discards the data beyond the new end: pass --shrink to shrink"},
		{[]string{"-f", "raw", p, "32M"}, 1, 65 << 20,
			"shrinking from 68157440 to 33554432 bytes discards the data beyond the new end: pass --shrink to shrink"},
		{[]string{"-f", "raw", "--shrink", p, "-1M"}, 0, 64 << 20, ""},
		{[]string{"-f", "raw", p, "--shrink", "2M"}, 0, 2 << 20, ""},
		{[]string{"-f", "raw", p, "--shrink", "-2M"}, 1, 2 << 20, "the new size (0 bytes) must be positive"},
		{[]string{"-f", "raw", p, "--shrink", "-3M"}, 1, 2 << 20, "the new size (-1048576 bytes) must be positive"},
		{[]string{"-f", "raw", p, "+100"}, 1, 2 << 20, "the new size (2097252 bytes) is not a multiple of 512"},
		{[]string{"-f", "raw", p, "2T"}, 0, 2 << 40, ""},
		{[]string{"-f", "raw", p, "--shrink", "1M"}, 0, 1 << 20, ""},
		{[]string{"-f", "raw", p, "1M"}, 0, 1 << 20, ""},
	}
	for _, s := range steps {
		args := append([]string{"resize"}, s.args...)
		r := img(t, args...)
		if r.code != s.code {
			t.Fatalf("img %s: exit %d, want %d\n%s%s", strings.Join(args, " "), r.code, s.code, r.stdout, r.stderr)
		}
		if s.code == 0 && (r.stdout != "Image resized.\n" || r.stderr != "") {
			t.Errorf("img %s: stdout %q, stderr %q; want only \"Image resized.\"", strings.Join(args, " "), r.stdout, r.stderr)
		}
		// The plugin's refusals name the image (it holds only a descriptor).
		if want := "krun-core img resize: " + p + ": " + s.err + "\n"; s.code != 0 && (r.stderr != want || r.stdout != "") {
			t.Errorf("img %s: stderr %q, want %q", strings.Join(args, " "), r.stderr, want)
		}
		if got := fileSize(t, p); got != s.size {
			t.Fatalf("img %s: size %d, want %d", strings.Join(args, " "), got, s.size)
		}
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if string(b[:len(content)]) != string(content) {
		t.Error("the data at the start changed")
	}
	for _, c := range b[len(content):] {
		if c != 0 {
			t.Fatal("the area grown and cut again does not read as zeros")
		}
	}
	if qemuImgInstalled() {
		m := decodeJSON(t, qemuImg(t, "info", "-f", "raw", "--output", "json", p))
		if m["virtual-size"] != float64(1<<20) {
			t.Errorf("qemu-img info: virtual-size %v, want %d", m["virtual-size"], 1<<20)
		}
	}
}

// qemuImgInstalled says whether qemu-img can check results (optional in
// tests that do not need it).
func qemuImgInstalled() bool {
	_, err := exec.LookPath("qemu-img")
	return err == nil
}

// TestResizeInUse: resize takes the image's exclusive lock, so an image
// QEMU has open is refused with one line and nothing changes: a raw image
// QEMU writes, and a qcow2 image QEMU only reads (QEMU's raw reader shares
// write, and qemu-img resize proceeds there too; its qcow2 reader does
// not). The refusal comes before the plugin starts.
func TestResizeInUse(t *testing.T) {
	krunCore(t)
	qemuTool(t, "qemu-io")
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(raw, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	qcow := filepath.Join(dir, "disk.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", qcow, "1M")
	for _, c := range []struct {
		name, path, format string
		hold               []string
		lock               string
	}{
		{"qemu-io writes raw", raw, "raw", []string{"-f", "raw"}, "write lock"},
		{"qemu-io writes qcow2", qcow, "qcow2", nil, "write lock"},
		{"qemu-io reads qcow2", qcow, "qcow2", []string{"-r"}, "lock that does not share write"},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := fileSize(t, c.path)
			holdImage(t, c.path, c.hold...)
			r := img(t, "resize", "-f", c.format, c.path, "2M")
			want := "krun-core img resize: image " + c.path + " is in use by another process (" + c.lock + "): refusing to open it read-write\n"
			if r.code != 1 || r.stderr != want || r.stdout != "" {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit 1 and %q", r.code, r.stdout, r.stderr, want)
			}
			if got := fileSize(t, c.path); got != before {
				t.Errorf("a refused resize changed the file's size from %d to %d", before, got)
			}
		})
	}
	mustImg(t, "resize", "-f", "raw", raw, "2M") // once QEMU is gone
	if got := fileSize(t, raw); got != 2<<20 {
		t.Errorf("size %d after the lock was released, want %d", got, 2<<20)
	}
}
