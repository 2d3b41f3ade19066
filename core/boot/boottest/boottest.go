// Package boottest makes kernel images for tests: files that pass the
// checks krun-core makes of a kernel before it boots one (the bzImage
// setup header, the release string), with no kernel in them.
package boottest

import (
	"encoding/binary"
	"os"
	"testing"
)

// FakeBzImage returns the first 2 KiB of a bzImage of the given release:
// boot flag, "HdrS", boot protocol 2.15, loaded high, a 64-bit entry
// point, and kernel_version pointing at the release string. It boots
// nothing.
func FakeBzImage(release string) []byte {
	le := binary.LittleEndian
	img := make([]byte, 0x800)
	img[0x1f1] = 1                      // setup_sects
	le.PutUint16(img[0x1fe:], 0xaa55)   // boot_flag
	img[0x200], img[0x201] = 0xeb, 0x66 // jump: the header ends at 0x268
	copy(img[0x202:], "HdrS")           // header
	le.PutUint16(img[0x206:], 0x020f)   // version 2.15
	le.PutUint16(img[0x20e:], 0x0200)   // kernel_version: 0x200 past 0x200
	img[0x211] = 0x01                   // loadflags: LOADED_HIGH
	le.PutUint16(img[0x236:], 0x0001)   // xloadflags: XLF_KERNEL_64
	copy(img[0x400:], release+" (test@krun-core) #1 SMP\x00")
	return img
}

// WriteFakeBzImage writes FakeBzImage(release) at path.
func WriteFakeBzImage(t testing.TB, path, release string) {
	t.Helper()
	if err := os.WriteFile(path, FakeBzImage(release), 0o644); err != nil {
		t.Fatal(err)
	}
}
