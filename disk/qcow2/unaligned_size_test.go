package qcow2

import (
	"encoding/binary"
	"path/filepath"
	"testing"
)

// TestUnalignedHeaderSizeAsQemu: a qcow2 header whose size field
// is not a multiple of 512 (qemu-img never writes one, other writers and
// hand edits do). QEMU 7.2 takes size/512 whole sectors (qcow2_do_open:
// total_sectors = header.size / BDRV_SECTOR_SIZE), so qemu-img info says
// 999936 for 1000000 and qemu-img convert writes 999936 bytes; krun-core's
// img info says 1000000 and img convert -O raw writes 1000000 bytes, the
// 64 extra bytes being ones QEMU never shows the guest.
func TestUnalignedHeaderSizeAsQemu(t *testing.T) {
	needQemu(t)
	p := filepath.Join(t.TempDir(), "u.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "1M")
	qio(t, p, "write -P 7 0 1M")
	f := openFile(t, p, false)
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], 1000000)
	if _, err := f.WriteAt(b[:], 24); err != nil {
		t.Fatal(err)
	}
	f.Close()
	want := qemuSize(t, p)
	f = openFile(t, p, true)
	defer f.Close()
	in, err := ReadInfo(f)
	if err != nil {
		t.Fatal(err)
	}
	if in.VirtualSize != want {
		t.Errorf("ReadInfo: virtual size %d, qemu-img info %d", in.VirtualSize, want)
	}
	im, err := Open(f, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if im.Size() != want {
		t.Errorf("Open: Size() %d (what img convert copies), qemu-img %d", im.Size(), want)
	}
}
