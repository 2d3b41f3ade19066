package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestWriteRegularFile: resolv.conf is written into the user's root by
// PID 1, which must not block on a FIFO there (nothing would ever open
// its other end: the VM would hang before the command starts) nor open a
// device; a regular file, also through a symbolic link, is replaced, and
// a missing one created.
func TestWriteRegularFile(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("fifo", filepath.Join(dir, "to-fifo")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "old"), []byte("a much longer old content\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("old", filepath.Join(dir, "to-old")); err != nil {
		t.Fatal(err)
	}
	// A dangling link (/etc/resolv.conf -> /run/resolv.conf, its
	// directory there) is followed and its target made, as by any
	// program's open(O_CREAT).
	if err := os.Symlink("made", filepath.Join(dir, "to-missing")); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, path, read, wantErr string
	}{
		{name: "dangling link", path: "to-missing", read: "made"},
		{name: "fifo", path: "fifo", wantErr: "not a regular file"},
		{name: "link to fifo", path: "to-fifo", wantErr: "not a regular file"},
		{name: "device", path: "/dev/null", wantErr: "not a regular file"},
		{name: "directory", path: dir, wantErr: "not a regular file"},
		{name: "missing", path: "new", read: "new"},
		{name: "link to regular", path: "to-old", read: "old"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := tt.path
			if !filepath.IsAbs(p) {
				p = filepath.Join(dir, p)
			}
			done := make(chan error, 1)
			go func() { done <- writeRegularFile(p, []byte("nameserver 10.0.2.3\n")) }()
			var err error
			select {
			case err = <-done:
			case <-time.After(3 * time.Second):
				// Unblock the writer so the test binary can end.
				if f, oerr := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0); oerr == nil {
					defer f.Close()
				}
				t.Fatalf("writeRegularFile(%s) blocked", tt.path)
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("writeRegularFile(%s) = %v, want an error with %q", tt.path, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("writeRegularFile(%s): %v", tt.path, err)
			}
			b, err := os.ReadFile(filepath.Join(dir, tt.read))
			if err != nil || string(b) != "nameserver 10.0.2.3\n" {
				t.Fatalf("%s holds %q, %v", tt.read, b, err)
			}
		})
	}
}
