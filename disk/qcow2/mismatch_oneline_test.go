package qcow2

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// TestMismatchErrorIsOneLine (from review): the backing and data file mismatch
// errors printed the recorded name through sanitize, but also the path it
// resolves to (want) raw, so a recorded name with a newline or an escape
// sequence reached the one-line error (and the terminal) unsanitized.
func TestMismatchErrorIsOneLine(t *testing.T) {
	dir := t.TempDir()
	declared := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(declared, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	hostile := "evil\nkrun-core: all good\x1b[2K"
	for _, tc := range []struct {
		name string
		co   CreateOptions
		o    func(p string) Options
	}{
		{"backing", CreateOptions{Size: 1 << 20, BackingFile: hostile, BackingFormat: disk.Raw},
			func(p string) Options {
				return Options{Path: p, ReadOnly: true, Backing: []Layer{layerOf(t, declared, disk.Raw)}}
			}},
	} {
		p := filepath.Join(dir, tc.name+".qcow2")
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := Create(f, tc.co); err != nil {
			t.Fatalf("Create: %v", err)
		}
		f.Close()
		im, err := Open(openFile(t, p, true), tc.o(p))
		if err == nil {
			im.Close()
			t.Fatalf("%s: Open accepted a mismatched chain", tc.name)
		}
		if !errors.Is(err, ErrBacking) {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if msg := err.Error(); strings.ContainsAny(msg, "\n\x1b") {
			t.Errorf("%s: error is not one safe line: %q", tc.name, msg)
		}
	}
}

// TestDataFileMismatchErrorIsOneLine is the same for a recorded
// external data file name.
func TestDataFileMismatchErrorIsOneLine(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "d.raw"), p, "1M")
	// Rewrite the recorded data file name in place (same length, so the
	// header extension keeps its layout): "d.raw" -> "\n\x1b[2K" is 5 bytes.
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(b[:4096]), filepath.Join(dir, "d.raw"))
	if i < 0 {
		t.Fatal("data file name not found in the header")
	}
	j := i + len(dir) + 1
	copy(b[j:], "\n\x1b[2K")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "other.raw")
	if err := os.WriteFile(other, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = Open(openFile(t, p, true), Options{Path: p, ReadOnly: true,
		DataFile: &Layer{File: openFile(t, other, true), Format: disk.Raw, Path: other}})
	if err == nil || !errors.Is(err, ErrBacking) || !errors.Is(err, ErrDataFile) {
		t.Fatalf("Open: %v", err)
	}
	if msg := err.Error(); strings.ContainsAny(msg, "\n\x1b") {
		t.Errorf("error is not one safe line: %q", msg)
	}
	// Worded for what it is, not as a backing chain (found in review,
	// helper-130: "backing chain mismatch: image ... names external data
	// file").
	if msg := err.Error(); !strings.HasPrefix(msg, "data file mismatch: ") {
		t.Errorf("error %q, want it to start with \"data file mismatch: \"", msg)
	}
}
