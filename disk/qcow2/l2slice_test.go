package qcow2

import (
	"bytes"
	"math/rand"
	"path/filepath"
	"strconv"
	"testing"
)

// checkL2Meta compares the metadata map's "active L2 table" answer for
// every host cluster with the L2 tables the in-memory L1 table names.
func checkL2Meta(t *testing.T, im *Image, step string) {
	t.Helper()
	want := map[uint64]bool{}
	for _, e := range im.l1 {
		if off := e & l1OffsetMask; off != 0 {
			want[off/im.cs] = true
		}
	}
	bad := 0
	for c := uint64(0); c < im.fileClusters+8; c++ {
		got := im.meta.at(c)&metaL2 != 0
		if got != want[c] {
			if bad < 5 {
				t.Errorf("%s: cluster %d: at()=%v, active L2=%v", step, c, im.meta.at(c), want[c])
			}
			bad++
		}
	}
	if bad > 0 {
		t.Fatalf("%s: %d clusters with a wrong active-L2 answer", step, bad)
	}
}

// TestL2TablesTrackedAfterWrites: Open puts the active L2 tables in
// metaMap.l2; writes then allocate new tables (map), move tables a
// snapshot shares (clear of a slice entry) and discard. at() must name
// exactly the tables the L1 table points at, and the result must pass
// qemu-img check with the content qemu reads.
func TestL2TablesTrackedAfterWrites(t *testing.T) {
	needQemu(t)
	const cs = 512
	const l2span = cs / 8 * cs // 32 KiB per L2 table
	const size = 8 << 20       // 256 L2 tables
	p := filepath.Join(t.TempDir(), "a.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "8M")
	want := make([]byte, size)
	// Every other L2 region gets data before the snapshot.
	var cmds []string
	for r := 0; r < size/l2span; r += 2 {
		off := r * l2span
		cmds = append(cmds, "write -P 0x5a "+itoaR(off)+" 1024")
		for i := 0; i < 1024; i++ {
			want[off+i] = 0x5a
		}
	}
	qio(t, p, cmds...)
	sh(t, "qemu-img", "snapshot", "-c", "s1", p)
	// A second round after the snapshot on a few regions: tables of
	// the active image only (rc 1 after COW by qemu).
	qio(t, p, "write -P 0x11 0 512", "write -P 0x11 "+itoaR(4*l2span)+" 512")
	for i := 0; i < 512; i++ {
		want[i] = 0x11
		want[4*l2span+i] = 0x11
	}

	im := openImage(t, p, false)
	if len(im.meta.l2) == 0 {
		t.Fatal("no active L2 table in the slice after Open")
	}
	checkL2Meta(t, im, "open")
	rng := rand.New(rand.NewSource(1))
	buf := make([]byte, 700)
	for i := 0; i < 400; i++ {
		r := rng.Intn(size / l2span)
		off := r*l2span + rng.Intn(l2span-len(buf))
		rng.Read(buf)
		switch i % 7 {
		case 5:
			n := 2 * cs
			off &^= cs - 1
			if err := im.Discard(int64(off), int64(n)); err != nil {
				t.Fatal(err)
			}
			// Discarded content reads as zero (no backing file).
			for j := 0; j < n; j++ {
				want[off+j] = 0
			}
		default:
			if _, err := im.WriteAt(buf, int64(off)); err != nil {
				t.Fatalf("write %d at %d: %v", i, off, err)
			}
			copy(want[off:], buf)
		}
		checkL2Meta(t, im, "op "+itoaR(i))
		if i%50 == 49 {
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			checkL2Meta(t, im, "flush "+itoaR(i))
		}
	}
	got := make([]byte, size)
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		i := firstDiff(got, want)
		t.Fatalf("read back differs at %d", i)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	qemuClean(t, p)
	if q := qemuRaw(t, p); !bytes.Equal(q, want) {
		t.Fatalf("qemu reads different content at %d", firstDiff(q, want))
	}
	// Reopen: the slice again matches.
	im = openImage(t, p, false)
	checkL2Meta(t, im, "reopen")
	im.Close()
}

func itoaR(i int) string { return strconv.Itoa(i) }
