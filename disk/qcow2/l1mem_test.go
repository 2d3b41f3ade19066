package qcow2

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// TestHugeActiveL1Memory: an image whose active L1 table has the largest
// size Open accepts (4 Mi entries), each naming a distinct L2 table,
// keeps the L1 table and one 8-byte entry per L2 table after Open (about
// 64 MiB), not a map entry per table: 210 to 270 MiB before, near the
// plugin's 1 GiB RLIMIT_DATA with a refcount table and snapshots (from
// review).
func TestHugeActiveL1Memory(t *testing.T) {
	const cs = 512
	p := filepath.Join(t.TempDir(), "l1.qcow2")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: 1 << 20, ClusterSize: cs}); err != nil {
		t.Fatal(err)
	}
	st, _ := f.Stat()
	l1Off := uint64(st.Size()+cs-1) &^ (cs - 1)
	const n = maxL1Bytes / 8
	b := make([]byte, n*8)
	for i := 0; i < n; i++ {
		binary.BigEndian.PutUint64(b[8*i:], l1Off+uint64(n*8)+uint64(i)*cs)
	}
	if _, err := f.WriteAt(b, int64(l1Off)); err != nil {
		t.Fatal(err)
	}
	var h [12]byte
	binary.BigEndian.PutUint32(h[0:], n)
	binary.BigEndian.PutUint64(h[4:], l1Off)
	if _, err := f.WriteAt(h[:], 36); err != nil { // l1_size, l1_table_offset
		t.Fatal(err)
	}
	f.Close()
	for _, ro := range []bool{true, false} {
		runtime.GC()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		f, _ := os.OpenFile(p, os.O_RDWR, 0)
		im, err := Open(f, Options{ReadOnly: ro, Path: p})
		runtime.GC() // what Open keeps, not what it let go
		runtime.ReadMemStats(&m1)
		kept := int64(m1.HeapAlloc) - int64(m0.HeapAlloc)
		t.Logf("ro=%v: open err=%v, allocated %d MiB, kept %d MiB", ro, err, (m1.TotalAlloc-m0.TotalAlloc)>>20, kept>>20)
		if err != nil {
			t.Fatalf("ro=%v: %v", ro, err)
		}
		if kept > 96<<20 {
			t.Errorf("ro=%v: a 33 MiB image keeps %d MiB of heap after Open", ro, kept>>20)
		}
		if im != nil {
			im.Close()
		} else {
			f.Close()
		}
	}
}
