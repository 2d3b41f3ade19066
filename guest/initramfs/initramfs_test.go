package initramfs

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/guest/initconfig"
	"github.com/krun-core/krun-core/guest/initramfs/cpio"
	"github.com/krun-core/krun-core/guest/initramfs/kmod/kmodtest"
)

var fakeInit = []byte("\x7fELF fake krun-init")

func TestBuild(t *testing.T) {
	cfg := initconfig.New("/bin/echo", "hi")
	data, res, err := BuildBytes(Options{
		Init: fakeInit, Config: cfg,
		Modules:    []string{"virtio-pci", "virtio_console"},
		ModulesDir: kmodtest.WriteTree(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range res.Modules {
		names = append(names, m.Name)
	}
	if g := strings.Join(names, " "); g != "virtio_ring virtio virtio_pci virtio_console" {
		t.Errorf("module order %q", g)
	}
	entries, err := cpio.Read(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]cpio.Entry{}
	for _, e := range entries {
		if i := strings.LastIndexByte(e.Name, '/'); i > 0 {
			if p, ok := seen[e.Name[:i]]; !ok || p.Mode&cpio.TypeMask != cpio.Dir {
				t.Errorf("%s precedes its directory", e.Name)
			}
		}
		seen[e.Name] = e
	}
	for name, mode := range map[string]uint32{
		"init": cpio.Reg | 0o755, "krun/config.json": cpio.Reg | 0o644, "krun/modules": cpio.Reg | 0o644,
		"dev/console": cpio.Char | 0o600, "proc": cpio.Dir | 0o755, "sys": cpio.Dir | 0o755,
		"newroot": cpio.Dir | 0o755, "tmp": cpio.Dir | 0o1777,
		"lib/modules/9.9.9-test/kernel/drivers/char/virtio_console.ko": cpio.Reg | 0o644,
	} {
		if e, ok := seen[name]; !ok || e.Mode != mode {
			t.Errorf("%s: present %v mode %#o, want %#o", name, ok, e.Mode, mode)
		}
	}
	if !bytes.Equal(seen["init"].Data, fakeInit) {
		t.Error("/init is not the krun-init binary")
	}
	got, err := initconfig.Parse(seen["krun/config.json"].Data)
	if err != nil || got.Args[1] != "hi" {
		t.Errorf("config: %+v %v", got, err)
	}
	wantOrder := "/lib/modules/9.9.9-test/kernel/drivers/virtio/virtio_ring.ko\n" +
		"/lib/modules/9.9.9-test/kernel/drivers/virtio/virtio.ko\n" +
		"/lib/modules/9.9.9-test/kernel/drivers/virtio/virtio_pci.ko\n" +
		"/lib/modules/9.9.9-test/kernel/drivers/char/virtio_console.ko\n"
	if g := string(seen["krun/modules"].Data); g != wantOrder {
		t.Errorf("/krun/modules:\n%s\nwant\n%s", g, wantOrder)
	}
	if !bytes.HasPrefix(seen["lib/modules/9.9.9-test/kernel/drivers/char/virtio_console.ko"].Data, []byte("\x7fELF")) {
		t.Error("xz module not stored uncompressed")
	}
}

func TestBuildNoModules(t *testing.T) {
	data, res, err := BuildBytes(Options{Init: fakeInit, Config: initconfig.New("true")})
	if err != nil || len(res.Modules) != 0 {
		t.Fatal(err)
	}
	entries, err := cpio.Read(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name == "krun/modules" && len(e.Data) != 0 {
			t.Errorf("/krun/modules = %q", e.Data)
		}
	}
}

func TestBuildRejects(t *testing.T) {
	tree := kmodtest.WriteTree(t)
	bad := initconfig.New()
	tests := map[string]Options{
		"no init":         {Config: initconfig.New("x")},
		"init not elf":    {Init: []byte("#!/bin/sh"), Config: initconfig.New("x")},
		"no config":       {Init: fakeInit},
		"invalid config":  {Init: fakeInit, Config: bad},
		"no module tree":  {Init: fakeInit, Config: initconfig.New("x"), Modules: []string{"virtio"}},
		"missing module":  {Init: fakeInit, Config: initconfig.New("x"), Modules: []string{"nope"}, ModulesDir: tree},
		"bad module tree": {Init: fakeInit, Config: initconfig.New("x"), Modules: []string{"virtio"}, ModulesDir: "/nonexistent"},
	}
	for name, o := range tests {
		if _, _, err := BuildBytes(o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// BenchmarkBuildDebian measures what `run --root` pays at every start:
// resolving and reading the virtio modules of the Debian kernel the
// end-to-end tests cache, and writing the archive in memory.
func BenchmarkBuildDebian(b *testing.B) {
	home, _ := os.UserHomeDir()
	cache := os.Getenv("KRUN_TEST_CACHE")
	if cache == "" {
		cache = filepath.Join(home, ".cache", "krun-core-test")
	}
	trees, _ := filepath.Glob(filepath.Join(cache, "deb", "linux-image-*", "lib", "modules", "*"))
	if len(trees) == 0 {
		b.Skip("no Debian kernel package in the test cache (an end-to-end test run fetches it)")
	}
	init := append([]byte("\x7fELF"), make([]byte, 4<<20)...) // krun-init's size
	o := Options{Init: init, Config: initconfig.New("true"), ModulesDir: trees[0],
		Modules: []string{"virtio_mmio", "virtiofs", "virtio_console", "virtio_net"}}
	for b.Loop() {
		if _, _, err := BuildBytes(o); err != nil {
			b.Fatal(err)
		}
	}
}
