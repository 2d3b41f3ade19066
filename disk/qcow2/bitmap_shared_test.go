package qcow2

import (
	"path/filepath"
	"testing"
)

// parsedHeader reads the parsed header of the image at p.
func parsedHeader(t *testing.T, p string) *header {
	t.Helper()
	f := openFile(t, p, true)
	defer f.Close()
	st, _ := f.Stat()
	h, err := readHeader(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestBitmapDirSharedWithDataIsCorrupt: guest cluster 0 mapped onto the
// bitmap directory's cluster (refcount 2, copied flag clear) is a
// corruption. Check called it clean, so img verify passed it, and a
// read-write open (serve) then rewrote the directory's in_use flags in
// what the guest reads as its data, unlike what img convert produced
// (from review, helper-84).
func TestBitmapDirSharedWithDataIsCorrupt(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", p, "1M")
	qio(t, p, "write -P 0xaa 0 64k")
	sh(t, "qemu-img", "bitmap", "--add", p, "b0")
	h := parsedHeader(t, p)
	if h.bitmaps == nil {
		t.Fatal("no bitmaps")
	}
	l := readLayout(t, p)
	l2 := int64(read64(t, p, l.l1) & l1OffsetMask)
	dirOff := h.bitmaps.dirOff
	t.Logf("bitmap directory at %#x, L2 at %#x", dirOff, l2)
	// Guest cluster 0 -> bitmap directory cluster, no copied flag.
	patch64(t, p, l2, dirOff)
	// Refcount of the directory cluster: 2 (16-bit refcounts).
	var b [2]byte
	b[1] = 2
	patch(t, p, l.rb+int64(dirOff/uint64(l.cs))*2, b[:])

	f := openFile(t, p, true)
	res, err := Check(f, RepairNone)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("check: corruptions=%d leaks=%d errors=%d %v", res.Corruptions, res.Leaks, res.CheckErrors, res.Messages)
	if res.Corruptions == 0 {
		t.Errorf("a bitmap directory that is also a guest data cluster passed the check")
	}
}

// TestZeroFlagWhereNotAllowedIsCorrupt: bit 0 of an L2 entry (the zero
// flag) in a version 2 image or one with extended L2 entries is a
// corruption to the check, as to the reader. The check passed it, so img
// verify did, and the first guest read under serve failed and set the
// image's corrupt bit (from review, helper-82).
func TestZeroFlagWhereNotAllowedIsCorrupt(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct{ name, opts string }{
		{"extended L2", "cluster_size=65536,extended_l2=on"},
		{"version 2", "cluster_size=65536,compat=0.10"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "x.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tc.opts, p, "4M")
			qio(t, p, "write -P 0x11 0 64k")
			l := readLayout(t, p)
			l2 := int64(read64(t, p, l.l1) & l1OffsetMask)
			entry := int64(8) // guest cluster 1
			if tc.name == "extended L2" {
				entry = 16 // 16-byte entries
			}
			patch64(t, p, l2+entry, 1)
			f := openFile(t, p, true)
			res, err := Check(f, RepairNone)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			if res.Corruptions == 0 {
				t.Errorf("the check passed an L2 zero flag the reader refuses: %v", res.Messages)
			}
		})
	}
}
