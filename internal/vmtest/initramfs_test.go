package vmtest

import (
	"bytes"
	"compress/gzip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/guest/initramfs/cpio"
	"github.com/krun-core/krun-core/guest/initramfs/kmod/kmodtest"
)

func TestInitramfsLayout(t *testing.T) {
	host := filepath.Join(t.TempDir(), "tool")
	if err := os.WriteFile(host, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	ib := NewInitramfs()
	// A fake /bin/sh lets Write run without busybox.
	ib.AddBytes("/bin/sh", []byte("fake"), 0o755)
	ib.AddFile("/opt/deep/dir/tool", host, 0o700)
	ib.AddSymlink("/usr/bin/tool", "/opt/deep/dir/tool")
	ib.SetInit("echo hi")
	out := filepath.Join(t.TempDir(), "initrd")
	if err := ib.Write(out); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	entries, err := cpio.Read(f)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]cpio.Entry{}
	for _, e := range entries {
		// Every parent must precede its child: the kernel creates nothing implicitly.
		if dir := filepath.Dir(e.Name); dir != "." {
			p, ok := seen[dir]
			if !ok || p.Mode&cpio.TypeMask != cpio.Dir {
				t.Errorf("%s precedes its directory %s", e.Name, dir)
			}
		}
		seen[e.Name] = e
	}
	for name, mode := range map[string]uint32{
		"init":                 cpio.Reg | 0o755,
		"dev/console":          cpio.Char | 0o600,
		"opt/deep/dir/tool":    cpio.Reg | 0o700,
		"usr/bin/tool":         cpio.Symlink | 0o777,
		"tmp":                  cpio.Dir | 0o1777,
		"etc/krun-e2e/test.sh": cpio.Reg | 0o755,
	} {
		if e, ok := seen[name]; !ok || e.Mode != mode {
			t.Errorf("%s: mode %#o present=%v, want %#o", name, e.Mode, ok, mode)
		}
	}
	if c := seen["dev/console"]; c.RdevMajor != 5 || c.RdevMinor != 1 {
		t.Errorf("/dev/console is %d:%d, want 5:1", c.RdevMajor, c.RdevMinor)
	}
	if !strings.Contains(string(seen["etc/krun-e2e/test.sh"].Data), "echo hi") {
		t.Errorf("test script lacks the user's script")
	}
	if !strings.Contains(string(seen["etc/krun-e2e/lib.sh"].Data), ib.ResultMarker()) {
		t.Errorf("guest helpers lack the result marker %q", ib.ResultMarker())
	}
}

func TestInitramfsGzip(t *testing.T) {
	ib := NewInitramfs()
	ib.AddBytes("/bin/sh", []byte("fake"), 0o755)
	ib.SetCompression(CompressGzip)
	out := filepath.Join(t.TempDir(), "initrd.gz")
	if err := ib.Write(out); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatalf("not gzip: %v", err)
	}
	entries, err := cpio.Read(zr)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range entries {
		found = found || e.Name == "init"
	}
	if !found {
		t.Errorf("no /init in the gzip archive")
	}
}

func TestInitramfsErrors(t *testing.T) {
	tests := []struct {
		name  string
		build func(ib *Initramfs)
	}{
		{"relative path", func(ib *Initramfs) { ib.AddBytes("bin/x", nil, 0o644) }},
		{"root", func(ib *Initramfs) { ib.AddDir("/", 0o755) }},
		{"missing host file", func(ib *Initramfs) { ib.AddFile("/x", "/nonexistent/krun-vmtest", 0o644) }},
		{"host dir", func(ib *Initramfs) { ib.AddFile("/x", "/", 0o644) }},
		{"file as parent", func(ib *Initramfs) {
			ib.AddBytes("/a", nil, 0o644)
			ib.AddBytes("/a/b", nil, 0o644)
		}},
		{"nil kernel", func(ib *Initramfs) { ib.AddModules(nil, "virtio_blk") }},
		{"no shell", func(ib *Initramfs) { delete(ib.nodes, "/bin/sh") }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ib := NewInitramfs()
			ib.AddBytes("/bin/sh", []byte("fake"), 0o755)
			tc.build(ib)
			if err := ib.Write(filepath.Join(t.TempDir(), "initrd")); err == nil {
				t.Errorf("Write succeeded")
			}
		})
	}
}

func TestInitramfsModules(t *testing.T) {
	k := &Kernel{Release: "9.9.9-test", ModulesDir: kmodtest.WriteTree(t)}
	ib := NewInitramfs()
	ib.AddBytes("/bin/sh", []byte("fake"), 0o755)
	ib.AddModules(k, "virtio_blk")
	ib.AddModules(k, "virtio_pci") // shares deps: each module once
	ib.SetModuleParams("virtio-pci", "force_legacy=1")
	out := filepath.Join(t.TempDir(), "initrd")
	if err := ib.Write(out); err != nil {
		t.Fatal(err)
	}
	if g := strings.Join(ib.Modules(), " "); g != "virtio virtio_ring virtio_blk virtio_pci" {
		t.Errorf("modules %q", g)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	entries, err := cpio.Read(f)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	for _, e := range entries {
		files[e.Name] = string(e.Data)
	}
	init := files["init"]
	iv, ir, ip := strings.Index(init, "/virtio.ko"), strings.Index(init, "/virtio_ring.ko"), strings.Index(init, "/virtio_pci.ko' force_legacy=1")
	if iv < 0 || ir < 0 || ip < 0 || ip < iv || ip < ir {
		t.Errorf("/init does not insmod virtio and virtio_ring before virtio_pci with its parameter:\n%s", init)
	}
	dep := files["lib/modules/9.9.9-test/modules.dep"]
	if !strings.Contains(dep, "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n") {
		t.Errorf("modules.dep:\n%s", dep)
	}
	if !bytes.HasPrefix([]byte(files["lib/modules/9.9.9-test/kernel/drivers/virtio/virtio_pci.ko"]), []byte("\x7fELF")) {
		t.Errorf("virtio_pci.ko.zst was not stored decompressed as virtio_pci.ko")
	}

	other := &Kernel{Release: "1.0.0-other", ModulesDir: k.ModulesDir}
	ib.AddModules(other, "virtio")
	if err := ib.Write(out); err == nil || !strings.Contains(err.Error(), "already added") {
		t.Errorf("mixing kernels: err = %v", err)
	}
}
