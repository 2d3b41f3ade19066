package vmtest

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// fakeModule builds a minimal ELF64 relocatable object with a .modinfo
// section holding the given key=value strings.
func fakeModule(modinfo ...string) []byte {
	info := []byte(strings.Join(modinfo, "\x00") + "\x00")
	shstr := []byte("\x00.modinfo\x00.shstrtab\x00")
	const ehsize, shentsize = 64, 64
	infoOff := uint64(ehsize)
	strOff := infoOff + uint64(len(info))
	shOff := (strOff + uint64(len(shstr)) + 7) &^ 7
	b := make([]byte, shOff+3*shentsize)
	copy(b, "\x7fELF")
	b[4], b[5], b[6] = 2, 1, 1 // 64-bit, little endian, version
	le := binary.LittleEndian
	le.PutUint16(b[16:], 1)  // ET_REL
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[40:], shOff)
	le.PutUint16(b[52:], ehsize)
	le.PutUint16(b[58:], shentsize)
	le.PutUint16(b[60:], 3) // shnum
	le.PutUint16(b[62:], 2) // shstrndx
	copy(b[infoOff:], info)
	copy(b[strOff:], shstr)
	sec := func(i int, name uint32, typ uint32, off, size uint64) {
		s := b[shOff+uint64(i)*shentsize:]
		le.PutUint32(s[0:], name)
		le.PutUint32(s[4:], typ)
		le.PutUint64(s[24:], off)
		le.PutUint64(s[32:], size)
		le.PutUint64(s[48:], 1)
	}
	sec(1, 1, 1 /* PROGBITS */, infoOff, uint64(len(info)))
	sec(2, 10, 3 /* STRTAB */, strOff, uint64(len(shstr)))
	return b
}

func writeFakeKernel(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "lib", "modules", "9.9.9-test")
	put := func(rel string, data []byte) {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	gz := func(b []byte) []byte {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		zw.Write(b)
		zw.Close()
		return buf.Bytes()
	}
	zst := func(b []byte) []byte {
		enc, err := zstd.NewWriter(nil)
		if err != nil {
			t.Fatal(err)
		}
		defer enc.Close()
		return enc.EncodeAll(b, nil)
	}
	put("kernel/drivers/virtio/virtio_ring.ko", fakeModule("name=virtio_ring", "depends="))
	put("kernel/drivers/virtio/virtio.ko", fakeModule("name=virtio", "depends="))
	put("kernel/drivers/virtio/virtio_pci.ko.zst", zst(fakeModule("name=virtio_pci", "depends=virtio_ring,virtio")))
	put("kernel/drivers/block/virtio_blk.ko.gz", gz(fakeModule("name=virtio_blk", "depends=virtio,virtio_ring")))
	put("kernel/fs/ext4/ext4.ko", fakeModule("softdep=pre: crypto-crc32c", "name=ext4", "depends=jbd2,mbcache"))
	put("kernel/fs/jbd2/jbd2.ko", fakeModule("name=jbd2", "depends="))
	put("kernel/fs/mbcache.ko", fakeModule("name=mbcache", "depends="))
	put("kernel/crypto/crc32c_generic.ko", fakeModule("name=crc32c_generic", "depends="))
	put("kernel/arch/x86/kvm/kvm-amd.ko", fakeModule("name=kvm_amd", "depends=kvm,builtin_dep"))
	put("kernel/arch/x86/kvm/kvm.ko", fakeModule("name=kvm", "depends=irqbypass"))
	put("kernel/virt/lib/irqbypass.ko", fakeModule("name=irqbypass", "depends="))
	put("kernel/loop/a.ko", fakeModule("name=a", "depends=b"))
	put("kernel/loop/b.ko", fakeModule("name=b", "depends=a"))
	put("kernel/broken/needs_missing.ko", fakeModule("name=needs_missing", "depends=nowhere"))
	put("kernel/broken/not_elf.ko", []byte("not an ELF file"))
	noInfo := fakeModule()[:64] // ELF header only, with no section table
	binary.LittleEndian.PutUint64(noInfo[40:], 0)
	binary.LittleEndian.PutUint32(noInfo[60:], 0)
	put("kernel/broken/no_modinfo.ko", noInfo)
	put("modules.builtin", []byte("kernel/drivers/base/builtin_dep.ko\nkernel/fs/fat/vfat.ko\n"))
	return dir
}

func TestResolveModules(t *testing.T) {
	idx, err := indexModules(writeFakeKernel(t))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		names   []string
		want    string // load order
		wantErr string
	}{
		{[]string{"virtio_blk"}, "virtio virtio_ring virtio_blk", ""},
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
			mods, err := resolveModules(context.Background(), idx, tc.names)
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

func TestInitramfsModules(t *testing.T) {
	k := &Kernel{Release: "9.9.9-test", ModulesDir: writeFakeKernel(t)}
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
	entries, err := readCpio(f)
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
