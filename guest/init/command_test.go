package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	other := filepath.Join(dir, "other")
	os.MkdirAll(bin, 0o755)
	os.MkdirAll(other, 0o755)
	os.MkdirAll(filepath.Join(bin, "adir"), 0o755)
	write := func(p string, mode os.FileMode) {
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
	}
	write(filepath.Join(bin, "tool"), 0o755)
	write(filepath.Join(bin, "noexec"), 0o644)
	write(filepath.Join(other, "noexec"), 0o755)
	write(filepath.Join(other, "onlyhere"), 0o644)
	write(filepath.Join(dir, "local"), 0o700)
	path := bin + ":" + other

	tests := []struct {
		file string
		uid  uint32
		want string
		err  error
	}{
		{"tool", 0, filepath.Join(bin, "tool"), nil},
		{"noexec", 0, filepath.Join(other, "noexec"), nil}, // the first executable one wins
		{"onlyhere", 0, "", errNotExecutable},
		{"missing", 0, "", errNotFound},
		{"adir", 0, "", errNotExecutable},
		{"./local", 0, filepath.Join(dir, "local"), nil},
		{"local", 0, "", errNotFound},
		{filepath.Join(bin, "noexec"), 0, filepath.Join(bin, "noexec"), errNotExecutable},
		{"/nonexistent/x", 0, "/nonexistent/x", errNotFound},
		{filepath.Join(bin, "tool", "x"), 0, filepath.Join(bin, "tool", "x"), errNotFound},
		{"./local", 4242, filepath.Join(dir, "local"), errNotExecutable}, // owner-only x bit
	}
	for _, tt := range tests {
		got, err := lookPath(tt.file, path, dir, tt.uid, tt.uid, nil)
		if err != tt.err || (tt.want != "" && got != tt.want) {
			t.Errorf("lookPath(%q, uid %d) = %q, %v; want %q, %v", tt.file, tt.uid, got, err, tt.want, tt.err)
		}
	}
}
