package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAppendFdRefused opens an image through an fd with O_APPEND (an
// inherited fd may have it). Linux places every pwrite on it at the end
// of the file, so the header's dirty bit, tables and guest data would all
// land past the end: a read-write open refuses it, a read-only one is fine.
func TestAppendFdRefused(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	before, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_APPEND|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	af := os.NewFile(uintptr(fd), p)
	defer af.Close()
	im, err := Open(af, Options{Path: p})
	if err == nil {
		_, werr := im.WriteAt(bytes.Repeat([]byte{1}, 512), 0)
		im.Close()
		after, _ := os.ReadFile(p)
		t.Fatalf("read-write Open of an O_APPEND fd succeeded; a write at 0 (%v) took the file from %d to %d bytes", werr, len(before), len(after))
	}
	if !strings.Contains(err.Error(), "O_APPEND") {
		t.Errorf("error %q does not name O_APPEND", err)
	}
	if after, _ := os.ReadFile(p); !bytes.Equal(after, before) {
		t.Fatal("the refused open changed the file")
	}
	im, err = Open(af, Options{Path: p, ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only Open of an O_APPEND fd: %v", err)
	}
	im.Close()
}
