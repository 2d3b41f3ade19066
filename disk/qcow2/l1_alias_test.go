package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// aliasedImage makes an image of 4 KiB clusters with one data cluster
// written at 0, whose L1 entries 0 and 2 then name the same L2 table;
// dirty also sets its dirty bit (lazy refcounts).
func aliasedImage(t *testing.T, dirty bool) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.qcow2")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	// 4 KiB clusters: one L2 table maps 2 MiB.
	if err := Create(f, CreateOptions{Size: 8 << 20, ClusterSize: 4096, LazyRefcounts: dirty}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	im := openImage(t, p, false)
	if _, err := im.WriteAt(bytes.Repeat([]byte{0xa5}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	f = openFile(t, p, false)
	defer f.Close()
	var hb [80]byte
	if _, err := f.ReadAt(hb[:], 0); err != nil {
		t.Fatal(err)
	}
	l1Off := int64(binary.BigEndian.Uint64(hb[40:]))
	var e [8]byte
	if _, err := f.ReadAt(e[:], l1Off); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint64(e[:])&l1OffsetMask == 0 {
		t.Fatal("L1[0] is empty after a write; the test proves nothing")
	}
	if _, err := f.WriteAt(e[:], l1Off+16); err != nil { // L1[2] = L1[0]
		t.Fatal(err)
	}
	if dirty {
		binary.BigEndian.PutUint64(hb[72:], binary.BigEndian.Uint64(hb[72:])|incompatDirty)
		if _, err := f.WriteAt(hb[72:80], 72); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// refusedUnchanged opens p read-write, expects ErrCorrupt naming want, and
// checks that the refused open left the image's bytes as they were.
func refusedUnchanged(t *testing.T, p, want string) {
	t.Helper()
	before, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	im, err := Open(openFile(t, p, false), Options{Path: p})
	if err == nil {
		im.Close()
		t.Fatal("a read-write open accepted two L1 entries naming one L2 table")
	}
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), want) {
		t.Fatalf("Open: %v, want ErrCorrupt naming %q", err, want)
	}
	if after, _ := os.ReadFile(p); !bytes.Equal(before, after) {
		t.Fatalf("the refused open changed the image (first difference at byte %d)", firstDiff(before, after))
	}
}

// TestSharedL2TableRefusedWritable: a hostile image whose two active L1
// entries name the same L2 table makes two virtual ranges share their
// mappings. Reads of it are harmless, but two writes to the aliased
// clusters were serialized by their virtual cluster, not by the L2 entry
// they share, so both could replace one old cluster and free it twice. A
// read-write open now refuses such an image, as it refuses two refcount
// table entries naming one block; a read-only open serves it.
func TestSharedL2TableRefusedWritable(t *testing.T) {
	p := aliasedImage(t, false)
	refusedUnchanged(t, p, "L1 table entries 0 and 2")
	im := openImage(t, p, true)
	defer im.Close()
	got := make([]byte, 4096)
	if _, err := im.ReadAt(got, 4<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{0xa5}, 4096)) {
		t.Fatal("read-only open: the aliased range does not read the shared table's data")
	}
}

// TestDirtyAliasedL1RefusedUnchanged (from review): the refcount repair of
// a dirty image accepts two L1 entries naming one L2 table, so a dirty
// image with that alias was repaired (refcounts, COPIED flags, the dirty
// bit written) before the read-write open refused it.
func TestDirtyAliasedL1RefusedUnchanged(t *testing.T) {
	refusedUnchanged(t, aliasedImage(t, true), "L1 table entries 0 and 2")
}
