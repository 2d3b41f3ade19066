package qcow2

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// snapshotImage builds, without QEMU, a version 3 image of 512-byte
// clusters whose snapshot table holds nsnap snapshots with L1 tables of
// l1Entries entries: all sharing one table, or each with its own (of which
// only the first ntables are distinct when ntables > 0). Entry i of each
// L1 table points at an L2 cluster of its own for i < 64. The refcounts do
// not account for any of it, which read-only and read-write opens do not
// look at. It returns the path, the offsets of the snapshot L1 tables and
// the L2 offset entry 0 of each points at.
func snapshotImage(t *testing.T, nsnap int, l1Entries uint32, ntables int) (path string, l1s, l2s []uint64) {
	t.Helper()
	const cs = 512
	p := filepath.Join(t.TempDir(), "snapshots.qcow2")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Create(f, CreateOptions{Size: 1 << 20, ClusterSize: cs}); err != nil {
		t.Fatal(err)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	end := uint64(st.Size()+cs-1) &^ (cs - 1)
	tableBytes := (uint64(l1Entries)*8 + cs - 1) &^ (cs - 1)
	// L2 clusters the snapshot tables point at live past everything else.
	l2Base := end + uint64(ntables)*tableBytes + 8<<20
	for i := 0; i < ntables; i++ {
		off := end + uint64(i)*tableBytes
		l1s = append(l1s, off)
		l2s = append(l2s, l2Base+uint64(i*64)*cs)
		n := min(int(l1Entries), 64)
		b := make([]byte, 8*n)
		for j := 0; j < n; j++ {
			binary.BigEndian.PutUint64(b[8*j:], l2Base+uint64(i*64+j)*cs)
		}
		if _, err := f.WriteAt(b, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	snapOff := l2Base + uint64(ntables*64)*cs
	var tab []byte
	for i := 0; i < nsnap; i++ {
		id := strconv.Itoa(i + 1)
		e := make([]byte, 40+16)
		binary.BigEndian.PutUint64(e[0:], l1s[i%ntables])
		binary.BigEndian.PutUint32(e[8:], l1Entries)
		binary.BigEndian.PutUint16(e[12:], uint16(len(id)))
		binary.BigEndian.PutUint16(e[14:], uint16(len(id)))
		binary.BigEndian.PutUint32(e[36:], 16)    // extra data: vm state size, disk size
		binary.BigEndian.PutUint64(e[48:], 1<<20) // disk size
		e = append(append(e, id...), id...)
		for len(e)%8 != 0 {
			e = append(e, 0)
		}
		tab = append(tab, e...)
	}
	if _, err := f.WriteAt(tab, int64(snapOff)); err != nil {
		t.Fatal(err)
	}
	var h [12]byte
	binary.BigEndian.PutUint32(h[0:], uint32(nsnap))
	binary.BigEndian.PutUint64(h[4:], snapOff)
	if _, err := f.WriteAt(h[:], 60); err != nil { // nb_snapshots, snapshots_offset
		t.Fatal(err)
	}
	return p, l1s, l2s
}

// TestManySnapshotsBoundedOverlapWork: the overlap map of an image with
// 65,536 snapshots costs work in proportion to its distinct tables, never
// snapshots times table clusters (65,536 × 65,536 map entries for one
// shared 32 MiB L1 table of 512-byte clusters), and the snapshot tables it
// reads stay within snapshotL1Budget.
func TestManySnapshotsBoundedOverlapWork(t *testing.T) {
	const maxL1 = maxL1Bytes / 8
	cases := []struct {
		name      string
		nsnap     int
		l1Entries uint32
		ntables   int
		maxWork   uint64
		untracked int // tables whose L2 tables are past the budget
	}{
		{"65536 share one 32 MiB table", 65536, maxL1, 1, 1 << 12, 1},
		{"65536 share one 16 MiB table", 65536, snapshotL1Budget, 1, snapshotL1Budget + 1<<12, 0},
		{"65536 tables of one cluster", 65536, 64, 65536, 3 * snapshotL1Budget, 65536 - snapshotL1Budget/64},
		{"3 distinct 8 MiB tables", 65536, snapshotL1Budget / 2, 3, snapshotL1Budget + 1<<12, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, l1s, l2s := snapshotImage(t, tc.nsnap, tc.l1Entries, tc.ntables)
			for _, ro := range []bool{true, false} {
				im := openImage(t, p, ro)
				mm := im.meta
				if mm.work > tc.maxWork {
					t.Errorf("read-only=%v: overlap map work %d, want at most %d", ro, mm.work, tc.maxWork)
				}
				if len(mm.ranges) > tc.ntables+8 {
					t.Errorf("%d ranges for %d distinct snapshot tables", len(mm.ranges), tc.ntables)
				}
				cs := im.cs
				tableClusters := divRoundUp(uint64(tc.l1Entries)*8, cs)
				for i, off := range l1s {
					for _, c := range []uint64{off / cs, off/cs + tableClusters - 1} {
						if im.meta.at(c)&metaSnapL1 == 0 {
							t.Fatalf("cluster %d of snapshot table %d not marked", c, i)
						}
					}
					// Entry 0 of table i points at its own L2 cluster.
					tracked := im.meta.at(l2s[i]/cs)&metaSnapL2 != 0
					if want := i < tc.ntables-tc.untracked; tracked != want {
						t.Fatalf("table %d: L2 cluster tracked %v, want %v", i, tracked, want)
					}
				}
				if k := im.meta.at(l1s[len(l1s)-1]/cs + tableClusters); k&metaSnapL1 != 0 {
					t.Fatalf("cluster past the last table marked %s", k)
				}
				if err := im.Close(); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestMetaMapSegments checks the flattened lookup against a per-cluster
// model for overlapping, repeated and removed ranges.
func TestMetaMapSegments(t *testing.T) {
	mm := newMetaMap()
	model := map[uint64]map[metaRange]int{}
	add := func(start, n uint64, k metaKind, delta int) {
		r := metaRange{start, start + n, k}
		for c := start; c < start+n; c++ {
			if model[c] == nil {
				model[c] = map[metaRange]int{}
			}
			model[c][r] += delta
			if model[c][r] == 0 {
				delete(model[c], r)
			}
		}
		if delta > 0 {
			mm.addRange(start, n, k)
		} else {
			mm.removeRange(start, n, k)
		}
	}
	verify := func(step string) {
		for c := uint64(0); c < 64; c++ {
			var want metaKind
			for r := range model[c] {
				want |= r.kind
			}
			if got := mm.at(c); got != want {
				t.Fatalf("%s: cluster %d holds %s, want %s (%s)", step, c, got, want, mm)
			}
		}
		for i := 1; i < len(mm.segs); i++ {
			if a, b := mm.segs[i-1], mm.segs[i]; a.end > b.start || a.start >= a.end || (a.end == b.start && a.kind == b.kind) {
				t.Fatalf("%s: segments %v and %v overlap, are empty or unmerged", step, a, b)
			}
		}
	}
	add(0, 1, metaHeader, 1)
	add(4, 10, metaL1, 1)
	add(8, 4, metaSnapL1, 1)
	add(8, 4, metaSnapL1, 1) // shared table: counted, not duplicated
	add(10, 20, metaRefTable, 1)
	add(14, 2, metaSnapL1, 1)
	verify("added")
	if len(mm.ranges) != 5 {
		t.Fatalf("%d ranges, want 5 (one repeated)", len(mm.ranges))
	}
	add(8, 4, metaSnapL1, -1)
	verify("one of two shared removed")
	add(8, 4, metaSnapL1, -1)
	add(10, 20, metaRefTable, -1)
	verify("removed")
	add(30, 5, metaRefTable, 1)
	add(35, 5, metaRefTable, 1)
	verify("adjacent")
}
