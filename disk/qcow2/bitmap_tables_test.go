package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
)

// bitmapTable is one bitmap directory entry to write: its table's file
// offset and size in entries.
type bitmapTable struct {
	off  uint64
	size uint32
}

// withBitmapDir gives the image at p (made by qemu-img with one bitmap, so
// that its header has a bitmaps extension) a new bitmap directory at the
// end of the file naming tabs, and returns where the directory went.
func withBitmapDir(t *testing.T, p string, tabs []bitmapTable) uint64 {
	t.Helper()
	f := openFile(t, p, false)
	defer f.Close()
	st, _ := f.Stat()
	cs := uint64(readLayout(t, p).cs)
	dirOff := (uint64(st.Size()) + cs - 1) / cs * cs
	var dir []byte
	for i, tb := range tabs {
		var e [32]byte
		binary.BigEndian.PutUint64(e[0:], tb.off)
		binary.BigEndian.PutUint32(e[8:], tb.size)
		e[16] = 16 // granularity bits
		binary.BigEndian.PutUint16(e[18:], 4)
		copy(e[24:], fmt.Sprintf("%04x", i%0x10000))
		dir = append(dir, e[:28]...)
		dir = append(dir, 0, 0, 0, 0) // padding to 8 bytes
	}
	if _, err := f.WriteAt(dir, int64(dirOff)); err != nil {
		t.Fatal(err)
	}
	hdr := make([]byte, cs)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(hdr, []byte{0x23, 0x85, 0x28, 0x75})
	if i < 0 {
		t.Fatal("no bitmaps extension in the header")
	}
	var ext [24]byte
	binary.BigEndian.PutUint32(ext[0:], uint32(len(tabs)))
	binary.BigEndian.PutUint64(ext[8:], uint64(len(dir)))
	binary.BigEndian.PutUint64(ext[16:], dirOff)
	if _, err := f.WriteAt(ext[:], int64(i+8)); err != nil {
		t.Fatal(err)
	}
	return dirOff
}

// bitmapImage makes a qcow2 image of 64 KiB clusters with one bitmap,
// grown by extra zero clusters at its end, and returns its path and the
// offset of the first extra cluster.
func bitmapImage(t *testing.T, extra int64) (string, uint64) {
	t.Helper()
	needQemu(t)
	p := filepath.Join(t.TempDir(), "bm.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", p, "1M")
	sh(t, "qemu-img", "bitmap", "--add", p, "b0")
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	first := (st.Size() + 65535) / 65536 * 65536
	if err := os.Truncate(p, first+extra*65536); err != nil {
		t.Fatal(err)
	}
	return p, uint64(first)
}

// TestBitmapTablesSharedReadOnce: 65535 bitmaps naming one 8 MiB table
// made the check read and count the table once per bitmap, 512 GiB in
// all: it stopped at its 1 GiB read budget after about 6 s of CPU, for a
// file of 10 MiB (from review, helper-84). The tables' union is read once
// now, and the shared table is the corruption it is.
func TestBitmapTablesSharedReadOnce(t *testing.T) {
	const tabClusters = 128 // 8 MiB of entries
	p, first := bitmapImage(t, tabClusters)
	tabs := make([]bitmapTable, 65535)
	for i := range tabs {
		tabs[i] = bitmapTable{first, tabClusters * 65536 / 8}
	}
	withBitmapDir(t, p, tabs)
	f := openFile(t, p, true)
	defer f.Close()
	res, err := Check(f, RepairNone)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	if res.Corruptions == 0 {
		t.Fatalf("one table named by 65535 bitmaps passed the check: %v", res.Messages)
	}
}

// TestBitmapTablesOverlapCounted: overlapping tables count their clusters
// and the clusters they name once per table that covers them, as one walk
// per table did. Table A spans three clusters, table B starts at A's
// second and ends 8 bytes into A's third; A's first cluster names data
// cluster P, the cluster A and B share names Q. None of these clusters
// has a refcount, so the check reports each with its reference count.
func TestBitmapTablesOverlapCounted(t *testing.T) {
	p, first := bitmapImage(t, 5)
	const cs = 65536
	a, b3, pc, qc := first, first+2*cs, first+3*cs, first+4*cs
	patch64(t, p, int64(a), pc)
	patch64(t, p, int64(a+cs), qc)
	withBitmapDir(t, p, []bitmapTable{{a, 3 * cs / 8}, {a + cs, cs/8 + 1}})
	f := openFile(t, p, true)
	defer f.Close()
	res, err := Check(f, RepairNone)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	re := regexp.MustCompile(`^ERROR cluster (\d+) refcount=0 reference=(\d+)$`)
	got := map[uint64]int{}
	for _, m := range res.Messages {
		if s := re.FindStringSubmatch(m); s != nil {
			k, _ := strconv.ParseUint(s[1], 10, 64)
			n, _ := strconv.Atoi(s[2])
			got[k] = n
		}
	}
	want := map[uint64]int{a / cs: 1, a/cs + 1: 2, b3 / cs: 2, pc / cs: 1, qc / cs: 2}
	for k, n := range want {
		if got[k] != n {
			t.Errorf("cluster %d: %d references counted, want %d (messages %q)", k, got[k], n, res.Messages)
		}
	}
}
