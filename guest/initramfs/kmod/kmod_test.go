package kmod

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/guest/initramfs/kmod/kmodtest"
)

func TestResolveModules(t *testing.T) {
	idx, err := NewIndex(kmodtest.WriteTree(t))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		names   []string
		want    string // load order
		wantErr string
	}{
		{[]string{"virtio_blk"}, "virtio virtio_ring virtio_blk", ""},
		{[]string{"virtio_console"}, "virtio virtio_ring virtio_console", ""}, // .ko.xz
		{[]string{"virtio_pci", "virtio_blk"}, "virtio_ring virtio virtio_pci virtio_blk", ""},
		{[]string{"ext4"}, "crc32c_generic jbd2 mbcache ext4", ""},
		{[]string{"kvm-amd"}, "irqbypass kvm kvm_amd", ""}, // '-' == '_', builtin dep dropped
		{[]string{"vfat"}, "", ""},                         // built in: nothing to load
		{[]string{"a"}, "", "cycle"},
		{[]string{"nope"}, "", "module nope not found"},
		{[]string{"needs_missing"}, "", "nowhere (needed by needs_missing) not found"},
		{[]string{"not_elf"}, "", "parse module ELF"},
		{[]string{"no_modinfo"}, "", "no .modinfo"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.names, ","), func(t *testing.T) {
			mods, err := idx.Resolve(tc.names)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range mods {
				got = append(got, m.Name)
				if !strings.HasSuffix(m.Rel, ".ko") || !bytes.HasPrefix(m.Image, []byte("\x7fELF")) {
					t.Errorf("%s: rel %q, image not a decompressed ELF", m.Name, m.Rel)
				}
			}
			if g := strings.Join(got, " "); g != tc.want {
				t.Errorf("order %q, want %q", g, tc.want)
			}
		})
	}
}

func TestReadModuleRejects(t *testing.T) {
	dir := t.TempDir()
	for name, data := range map[string]string{"bad.ko.xz": "not xz", "bad.ko.gz": "not gz", "bad.ko.zst": "not zstd", "x.txt": "x"} {
		p := dir + "/" + name
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadModule(p); err == nil {
			t.Errorf("%s accepted", name)
		}
	}
	if _, err := ReadModule(dir + "/missing.ko"); err == nil {
		t.Error("missing file accepted")
	}
}

// TestModulesOrder: with a modules.order the index takes names from it
// (the file's real ending is found on lookup: .ko.zst for virtio_pci), a
// stale entry does not hide the real file, and a module the list lacks is
// still found by walking the tree.
func TestModulesOrder(t *testing.T) {
	dir := kmodtest.WriteTree(t)
	order := "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n" +
		"kernel/drivers/virtio/virtio_pci.ko\nkernel/moved/away/virtio_blk.ko\n/abs/evil.ko\n../evil2.ko\n"
	if err := os.WriteFile(dir+"/modules.order", []byte(order), 0o644); err != nil {
		t.Fatal(err)
	}
	idx, err := NewIndex(dir)
	if err != nil {
		t.Fatal(err)
	}
	if idx.walked {
		t.Fatal("walked the tree although modules.order is there")
	}
	mods, err := idx.Resolve([]string{"virtio_pci"})
	if err != nil {
		t.Fatal(err)
	}
	if len(mods) != 3 || mods[2].Rel != "kernel/drivers/virtio/virtio_pci.ko" || idx.files["virtio_pci"] != "kernel/drivers/virtio/virtio_pci.ko.zst" {
		t.Fatalf("resolved %+v, files %v", mods, idx.files)
	}
	if idx.walked {
		t.Error("walked the tree for modules modules.order lists")
	}
	for _, name := range []string{"virtio_blk", "virtio_console"} { // stale entry; not listed
		if _, err := idx.Resolve([]string{name}); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, ok := idx.ordered["evil"]; ok {
		t.Error("absolute path taken from modules.order")
	}
	if _, ok := idx.ordered["evil2"]; ok {
		t.Error("path outside the tree taken from modules.order")
	}
	if _, err := NewIndex(t.TempDir()); err == nil {
		t.Error("a directory without kernel/ was indexed")
	}
}
