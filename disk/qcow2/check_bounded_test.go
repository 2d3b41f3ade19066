package qcow2

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// l1BombImage builds an image of 2 MiB clusters whose L1 table has n
// entries (the virtual size needs one), every one pointing at the same
// L2 table. The file is n*8 bytes of L1 plus a handful of clusters.
func l1BombImage(t *testing.T, n uint32) string {
	t.Helper()
	const cs = 2 << 20
	path := filepath.Join(t.TempDir(), "l1.qcow2")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Create(f, CreateOptions{Size: cs, ClusterSize: cs}); err != nil {
		t.Fatal(err)
	}
	// Layout after Create: 0 header, 1 refcount table, 2 refcount block,
	// 3 L1 (1 entry). Put the new L1 at cluster 4.., the L2 table after it.
	l1Off := uint64(4 * cs)
	l1Clusters := (uint64(n)*8 + cs - 1) / cs
	l2Off := l1Off + l1Clusters*cs
	l1 := make([]byte, uint64(n)*8)
	for i := uint32(0); i < n; i++ {
		be.PutUint64(l1[i*8:], l2Off|flagCopied)
	}
	if _, err := f.WriteAt(l1, int64(l1Off)); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(l2Off + cs)); err != nil {
		t.Fatal(err)
	}
	var hb [12]byte
	be.PutUint32(hb[0:], n)
	be.PutUint64(hb[4:], l1Off)
	if _, err := f.WriteAt(hb[:], 36); err != nil {
		t.Fatal(err)
	}
	return path
}

// bitmapBombImage builds a version 3 image (512-byte clusters) whose
// bitmaps extension names nb bitmaps, each with a bitmap table of 2^32-1
// entries at cluster 1: every table runs past the end of the file, so the
// check never spends its read budget on it, but it marks every cluster of
// the file as bitmap metadata for each bitmap.
func bitmapBombImage(t *testing.T, nb int, fileSize int64) string {
	t.Helper()
	const cs = 512
	path := filepath.Join(t.TempDir(), "bm.qcow2")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Create(f, CreateOptions{Size: 64 << 10, ClusterSize: cs}); err != nil {
		t.Fatal(err)
	}
	st, _ := f.Stat()
	dirOff := (st.Size() + cs - 1) / cs * cs
	dir := make([]byte, nb*32)
	for i := 0; i < nb; i++ {
		d := dir[i*32:]
		be.PutUint64(d[0:], cs)         // bitmap table offset: cluster 1
		be.PutUint32(d[8:], 0xffffffff) // bitmap table entries
		d[17] = 16                      // granularity bits
		be.PutUint16(d[18:], 1)         // name length
		d[24] = 'a'
	}
	if _, err := f.WriteAt(dir, dirOff); err != nil {
		t.Fatal(err)
	}
	hb := make([]byte, cs)
	if _, err := f.ReadAt(hb, 0); err != nil {
		t.Fatal(err)
	}
	be.PutUint64(hb[88:], be.Uint64(hb[88:])|autoclearBitmaps)
	clear(hb[112:])
	be.PutUint32(hb[112:], extBitmaps)
	be.PutUint32(hb[116:], 24)
	be.PutUint32(hb[120:], uint32(nb))
	be.PutUint64(hb[128:], uint64(len(dir)))
	be.PutUint64(hb[136:], uint64(dirOff))
	if _, err := f.WriteAt(hb, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(fileSize); err != nil {
		t.Fatal(err)
	}
	return path
}

// checkFinishes runs the check of path and fails if it takes more than a
// minute (the images below took hours before their fixes) or does not
// find the image corrupt.
func checkFinishes(t *testing.T, path string) {
	t.Helper()
	f := openFile(t, path, true)
	defer f.Close()
	type result struct {
		r   CheckResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := CheckWith(f, CheckOptions{})
		done <- result{r, err}
	}()
	select {
	case res := <-done:
		if res.err != nil {
			t.Fatalf("check: %v", res.err)
		}
		if res.r.Corruptions == 0 {
			t.Errorf("check found no corruption: %+v", res.r)
		}
	case <-time.After(time.Minute):
		t.Fatalf("check of %s still running after a minute", filepath.Base(path))
	}
}

// TestCheckDuplicateActiveL2Bounded: every entry of the active L1 table
// (4 Mi of them, 32 MiB) names the same 2 MiB L2 table. The check (which
// img verify, the upload gate, img check and a read-write open of a dirty
// image run) reads and walks that table once, counting its references
// as often as it is named, as it does for the snapshots' shared tables.
// Before the fix it walked it 4 Mi times, twice: hours of CPU for a
// 42 MiB file (from review).
func TestCheckDuplicateActiveL2Bounded(t *testing.T) {
	if testing.Short() {
		t.Skip("writes a 42 MiB image; skipped with -short")
	}
	checkFinishes(t, l1BombImage(t, maxL1Bytes/8))
}

// TestCheckBitmapTablesPastEOFBounded: 65535 bitmaps whose tables of
// 2^32-1 entries start at cluster 1 and run past the end of a 64 MiB
// file. Such a table is reported and neither counted nor marked as
// metadata. Before the fix each bitmap marked every cluster of the file
// (65535 x 131072 map operations, never charged to the read budget;
// from review).
func TestCheckBitmapTablesPastEOFBounded(t *testing.T) {
	checkFinishes(t, bitmapBombImage(t, 65535, 64<<20))
}
