package qcow2

import (
	"fmt"
	"path/filepath"
	"runtime"
	"testing"
)

// TestWriteHeapGrowsWithRequest (from review, helper-87; fixed: a long
// write is written and linked in parts, maxBatchLinks): one guest OUT request becomes one WriteAt
// per descriptor, and a descriptor may be as long as the guest's RAM (the
// device does not enforce the size_max of 1 MiB it advertises; a request
// may carry up to 4 GiB). Into unallocated 512-byte clusters, WriteAt keeps
// a pendingLink (80 bytes) per cluster until the request ends, plus a
// dirty L2 table per 64 clusters: the heap a request needs grows with its
// size (about 0.8 bytes allocated per byte written), where a plugin runs
// under RLIMIT_DATA 1 GiB. A 4 GiB descriptor needs over a GiB of heap:
// the plugin dies (Go's out-of-memory is fatal), and the disk with it.
func TestWriteHeapGrowsWithRequest(t *testing.T) {
	needQemu(t)
	tests := []struct {
		name    string
		cluster int
	}{
		{"cs512", 512},
		{"cs64k", 65536},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			alloc := func(mb int) uint64 {
				p := filepath.Join(t.TempDir(), "i.qcow2")
				sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", fmt.Sprintf("cluster_size=%d", tc.cluster), p, fmt.Sprint(64<<20))
				im := openImage(t, p, false)
				defer im.Close()
				buf := make([]byte, mb<<20)
				runtime.GC()
				var a, b runtime.MemStats
				runtime.ReadMemStats(&a)
				if _, err := im.WriteAt(buf, 0); err != nil {
					t.Fatal(err)
				}
				runtime.ReadMemStats(&b)
				return b.TotalAlloc - a.TotalAlloc
			}
			small, large := alloc(4), alloc(32)
			t.Logf("4 MiB write: %d KiB allocated; 32 MiB write: %d KiB", small>>10, large>>10)
			// Per-request memory must not scale with the request: allow
			// a fixed 2 MiB beyond what a small request needs.
			if large > small+2<<20 {
				t.Fatalf("a 32 MiB write allocates %d MiB (a 4 MiB one %d MiB): heap per request grows with its size",
					large>>20, small>>20)
			}
		})
	}
}
