package kmod

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeBzImage returns a setup area whose kernel_version points at version.
func fakeBzImage(version string, protocol uint16) []byte {
	img := make([]byte, 0x4000)
	copy(img[hdrMagicOff:], "HdrS")
	binary.LittleEndian.PutUint16(img[hdrVersionOff:], protocol)
	const at = 0x3000
	binary.LittleEndian.PutUint16(img[kernelVersOff:], at-0x200)
	copy(img[at:], version+"\x00")
	return img
}

func TestReleaseFromBzImage(t *testing.T) {
	tests := []struct {
		name string
		img  []byte
		want string
		err  string
	}{
		{"debian", fakeBzImage("6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3", 0x20f), "6.1.0-57-amd64", ""},
		{"bare", fakeBzImage("6.12.9+krun", 0x20f), "6.12.9+krun", ""},
		{"short", []byte("MZ"), "", "not a bzImage"},
		{"old protocol", fakeBzImage("6.1.0", 0x1ff), "", "no kernel_version"},
		{"garbage version", fakeBzImage("hello world", 0x20f), "", "does not start with a release"},
		{"unterminated", func() []byte {
			img := fakeBzImage("", 0x20f)
			for i := 0x3000; i < len(img); i++ {
				img[i] = '1'
			}
			return img
		}(), "", "not terminated"},
		{"pointer outside", func() []byte {
			img := fakeBzImage("6.1.0", 0x20f)
			binary.LittleEndian.PutUint16(img[kernelVersOff:], 0xff00)
			return img
		}(), "", "outside"},
		{"null pointer", func() []byte {
			img := fakeBzImage("6.1.0", 0x20f)
			binary.LittleEndian.PutUint16(img[kernelVersOff:], 0)
			return img
		}(), "", "no kernel_version string"},
	}
	for _, tt := range tests {
		got, err := ReleaseFromBzImage(tt.img)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%s: %q, %v; want error %q", tt.name, got, err, tt.err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%s: %q, %v; want %q", tt.name, got, err, tt.want)
		}
	}
}

func TestReleaseFromBanner(t *testing.T) {
	img := []byte("\x7fELF....Linux version %s\x00....Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1")
	if r, err := ReleaseFromBanner(img); err != nil || r != "6.1.0-57-amd64" {
		t.Errorf("banner: %q %v", r, err)
	}
	if _, err := ReleaseFromBanner([]byte("no banner")); err == nil {
		t.Error("no banner accepted")
	}
}

func TestReleaseAndModulesDirOfFiles(t *testing.T) {
	root := t.TempDir()
	boot := filepath.Join(root, "boot")
	os.MkdirAll(boot, 0o755)
	kpath := filepath.Join(boot, "vmlinuz-9.9.9-test")
	if err := os.WriteFile(kpath, fakeBzImage("9.9.9-test (x) #1", 0x20f), 0o644); err != nil {
		t.Fatal(err)
	}
	elfPath := filepath.Join(boot, "vmlinux")
	if err := os.WriteFile(elfPath, []byte("\x7fELF\x02\x01 junk Linux version 9.9.9-test (x) #1"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{kpath, elfPath} {
		if r, err := Release(p); err != nil || r != "9.9.9-test" {
			t.Errorf("Release(%s) = %q, %v", p, r, err)
		}
	}
	if _, err := FindModulesDir(kpath, "9.9.9-test"); err == nil {
		t.Error("found a module tree that does not exist")
	}
	mods := filepath.Join(root, "usr", "lib", "modules", "9.9.9-test")
	os.MkdirAll(filepath.Join(mods, "kernel"), 0o755)
	if d, err := FindModulesDir(kpath, "9.9.9-test"); err != nil || d != mods {
		t.Errorf("FindModulesDir = %q, %v; want %s", d, err, mods)
	}
	mods2 := filepath.Join(root, "lib", "modules", "9.9.9-test")
	os.MkdirAll(filepath.Join(mods2, "kernel"), 0o755)
	if d, err := FindModulesDir(kpath, "9.9.9-test"); err != nil || d != mods2 {
		t.Errorf("FindModulesDir = %q, %v; want %s (lib before usr/lib)", d, err, mods2)
	}
	if _, err := FindModulesDir(kpath, "../../etc"); err == nil {
		t.Error("a release with a path in it was accepted")
	}
	if _, err := Release(filepath.Join(root, "missing")); err == nil {
		t.Error("missing kernel accepted")
	}
}

// TestDebianKernel checks release detection and module lookup against the
// kernel package the end-to-end tests cache, when it is there.
func TestDebianKernel(t *testing.T) {
	home, _ := os.UserHomeDir()
	cache := os.Getenv("KRUN_TEST_CACHE")
	if cache == "" {
		cache = filepath.Join(home, ".cache", "krun-core-test")
	}
	kernels, _ := filepath.Glob(filepath.Join(cache, "deb", "linux-image-*", "boot", "vmlinuz-*"))
	if len(kernels) == 0 {
		t.Skip("no Debian kernel package in the test cache (an end-to-end test run fetches it)")
	}
	k := kernels[0]
	want := strings.TrimPrefix(filepath.Base(k), "vmlinuz-")
	r, err := Release(k)
	if err != nil || r != want {
		t.Fatalf("Release(%s) = %q, %v; want %q", k, r, err, want)
	}
	if elfs, _ := filepath.Glob(filepath.Join(filepath.Dir(k), "vmlinux-pvh-*")); len(elfs) > 0 {
		if r, err := Release(elfs[0]); err != nil || r != want {
			t.Errorf("Release(%s) = %q, %v; want %q", elfs[0], r, err, want)
		}
	}
	dir, err := FindModulesDir(k, r)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := NewIndex(dir)
	if err != nil {
		t.Fatal(err)
	}
	mods, err := idx.Resolve([]string{"virtio_pci", "virtio_mmio", "virtiofs", "virtio_console", "virtio_net"})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range mods {
		names = append(names, m.Name)
	}
	t.Logf("load order: %s", strings.Join(names, " "))
	for _, n := range []string{"fuse", "virtiofs", "virtio_console", "net_failover", "virtio_net"} {
		if !strings.Contains(" "+strings.Join(names, " ")+" ", " "+n+" ") {
			t.Errorf("%s missing from %v", n, names)
		}
	}
}
