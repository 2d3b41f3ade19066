// Package kmodtest builds fake kernel module trees for tests of code that
// resolves modules.
package kmodtest

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// Module builds a minimal ELF64 relocatable object with a .modinfo
// section holding the given key=value strings.
func Module(modinfo ...string) []byte {
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

// WriteTree writes a fake module tree lib/modules/9.9.9-test under a
// temporary directory and returns its path: virtio, virtio_ring (.ko),
// virtio_pci (.ko.zst), virtio_blk (.ko.gz) and virtio_console (.ko.xz),
// ext4 with a crypto softdep, kvm_amd with a built-in dependency, a
// dependency cycle (a, b), a missing dependency (needs_missing), a file that
// is not ELF (not_elf), one without .modinfo (no_modinfo), and a
// modules.builtin naming builtin_dep and vfat.
func WriteTree(t testing.TB) string {
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
	put("kernel/drivers/virtio/virtio_ring.ko", Module("name=virtio_ring", "depends="))
	put("kernel/drivers/virtio/virtio.ko", Module("name=virtio", "depends="))
	put("kernel/drivers/virtio/virtio_pci.ko.zst", zst(Module("name=virtio_pci", "depends=virtio_ring,virtio")))
	xzc := func(b []byte) []byte {
		var buf bytes.Buffer
		xw, err := xz.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		xw.Write(b)
		if err := xw.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	put("kernel/drivers/char/virtio_console.ko.xz", xzc(Module("name=virtio_console", "depends=virtio,virtio_ring")))
	put("kernel/drivers/block/virtio_blk.ko.gz", gz(Module("name=virtio_blk", "depends=virtio,virtio_ring")))
	put("kernel/fs/ext4/ext4.ko", Module("softdep=pre: crypto-crc32c", "name=ext4", "depends=jbd2,mbcache"))
	put("kernel/fs/jbd2/jbd2.ko", Module("name=jbd2", "depends="))
	put("kernel/fs/mbcache.ko", Module("name=mbcache", "depends="))
	put("kernel/crypto/crc32c_generic.ko", Module("name=crc32c_generic", "depends="))
	put("kernel/arch/x86/kvm/kvm-amd.ko", Module("name=kvm_amd", "depends=kvm,builtin_dep"))
	put("kernel/arch/x86/kvm/kvm.ko", Module("name=kvm", "depends=irqbypass"))
	put("kernel/virt/lib/irqbypass.ko", Module("name=irqbypass", "depends="))
	put("kernel/loop/a.ko", Module("name=a", "depends=b"))
	put("kernel/loop/b.ko", Module("name=b", "depends=a"))
	put("kernel/broken/needs_missing.ko", Module("name=needs_missing", "depends=nowhere"))
	put("kernel/broken/not_elf.ko", []byte("not an ELF file"))
	noInfo := Module()[:64] // ELF header only, with no section table
	binary.LittleEndian.PutUint64(noInfo[40:], 0)
	binary.LittleEndian.PutUint32(noInfo[60:], 0)
	put("kernel/broken/no_modinfo.ko", noInfo)
	put("modules.builtin", []byte("kernel/drivers/base/builtin_dep.ko\nkernel/fs/fat/vfat.ko\n"))
	return dir
}
