package kmod

import (
	"os"
	"path/filepath"
	"testing"
)

// TestFindModulesDirThroughALink: make kernel's cache/vmlinuz is a link
// to PKG/boot/vmlinuz-R; its modules are in PKG/lib/modules/R, next to the
// file the link names (from review: run --root with that kernel found
// none).
func TestFindModulesDirThroughALink(t *testing.T) {
	cache := t.TempDir()
	const rel = "9.99.0-42-amd64"
	pkg := filepath.Join(cache, "linux-image-"+rel)
	if err := os.MkdirAll(filepath.Join(pkg, "boot"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(pkg, "lib", "modules", rel, "kernel"), 0o755); err != nil {
		t.Fatal(err)
	}
	real := filepath.Join(pkg, "boot", "vmlinuz-"+rel)
	if err := os.WriteFile(real, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(cache, "vmlinuz")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	d, err := FindModulesDir(link, rel)
	if err != nil {
		t.Fatalf("make kernel's $cache/vmlinuz: %v", err)
	}
	if want := filepath.Join(pkg, "lib", "modules", rel); d != want {
		t.Fatalf("got %s, want %s", d, want)
	}
}
