package qcow2

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// TestLeakedRefcountsPastEndIgnored: refcounts of clusters past the end of
// the image file are leaks (nothing may reference such a cluster), and the
// allocator must not skip over them. An image of 1-bit refcounts whose
// first refcount block is all ones passes a check (in-file leaks only, as
// qemu-img check counts them); before the fix its first guest write
// placed the new cluster 32 GiB out, the first zero refcount, and the
// file's size went with it (from review, helper-84).
func TestLeakedRefcountsPastEndIgnored(t *testing.T) {
	for _, tc := range []struct {
		name string
		bits int
		cs   int64
	}{
		{"1-bit-64k", 1, 64 << 10},
		{"16-bit-64k", 16, 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "leak.qcow2")
			f, err := os.Create(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := Create(f, CreateOptions{Size: 1 << 30, ClusterSize: tc.cs, RefcountBits: tc.bits}); err != nil {
				t.Fatal(err)
			}
			fillFirstRefblock(t, f, tc.cs)
			st, _ := f.Stat()
			small := st.Size()
			f.Close()
			perBlock := tc.cs * 8 / int64(tc.bits)
			if perBlock*tc.cs <= 64<<20 {
				t.Fatalf("one refcount block covers only %d bytes; the test proves nothing", perBlock*tc.cs)
			}

			// What verify looks at: no corruption.
			res, err := Check(openFile(t, p, true), RepairNone)
			if err != nil || res.Corruptions+res.CheckErrors != 0 {
				t.Fatalf("check of the prepared image: %+v, %v", res, err)
			}

			data := bytes.Repeat([]byte{0x5a}, int(tc.cs))
			writeStaysSmall(t, openImage(t, p, false), p, small, data, 3*tc.cs)

			res, err = Check(openFile(t, p, true), RepairNone)
			if err != nil || res.Corruptions+res.CheckErrors != 0 {
				t.Fatalf("check after the write: %+v, %v", res, err)
			}
			ro := openImage(t, p, true)
			defer ro.Close()
			got := make([]byte, tc.cs)
			if _, err := ro.ReadAt(got, 3*tc.cs); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, data))
			}
		})
	}
}

// writeStaysSmall writes data at off through im, flushes and closes it,
// and fails unless the image file at p, small bytes before, grew by less
// than 64 MiB.
func writeStaysSmall(t *testing.T, im *Image, p string, small int64, data []byte, off int64) {
	t.Helper()
	if _, err := im.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > small+64<<20 {
		t.Fatalf("a %d-byte image grew to %d bytes with one %d-byte write", small, st.Size(), len(data))
	}
}

// fillFirstRefblock sets every refcount of the first refcount block of the
// image in f (cs-byte clusters) to its maximum of 1 bit or more: all ones.
func fillFirstRefblock(t *testing.T, f *os.File, cs int64) {
	t.Helper()
	var hb [64]byte
	if _, err := f.ReadAt(hb[:], 0); err != nil {
		t.Fatal(err)
	}
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(binary.BigEndian.Uint64(hb[48:]))); err != nil {
		t.Fatal(err)
	}
	rb := int64(binary.BigEndian.Uint64(e[:]) & rtOffsetMask)
	if rb == 0 {
		t.Fatal("no first refcount block; the test proves nothing")
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xff}, int(cs)), rb); err != nil {
		t.Fatal(err)
	}
}
