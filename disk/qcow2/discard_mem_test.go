package qcow2

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/disk"
)

// TestLongDiscardStaysWithinTheCache: one guest DISCARD range (the device's
// limit: just under 2 GiB) over a backing file on a version 3 image with
// 512-byte clusters gives every cluster a zero entry in a new, dirty L2
// table. The tables behind are written back as the request goes, within
// CacheBytes, as between requests: they were all kept until it ended,
// about 48 MiB of heap here and far more for 32 such ranges in one request
// (from review).
func TestLongDiscardStaysWithinTheCache(t *testing.T) {
	if testing.Short() {
		t.Skip("discards 2 GiB in 512-byte clusters (about 10 s); skipped with -short")
	}
	const cs = 512
	const rng = 1<<31 - 8<<9 // DefaultMaxSectors * 512
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	bf, _ := os.Create(base)
	bf.Truncate(4 << 30)
	bf.Close()
	p := filepath.Join(dir, "ov.qcow2")
	f, _ := os.Create(p)
	if err := Create(f, CreateOptions{Size: 4 << 30, ClusterSize: cs, BackingFile: base, BackingFormat: disk.Raw}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	im, err := Open(openFile(t, p, false), Options{Path: p, Backing: []Layer{layerOf(t, base, disk.Raw)}, CacheBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			im.Close()
		}
	}()
	pieces := 0
	im.pieceHook = func(uint64) { pieces++ }
	// The heap other tests left is collected first and not counted.
	runtime.GC()
	var m0 runtime.MemStats
	runtime.ReadMemStats(&m0)
	heap0 := m0.HeapInuse
	stop := make(chan struct{})
	var peak atomic.Uint64
	done := make(chan struct{})
	go func() {
		defer close(done)
		var m runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			runtime.ReadMemStats(&m)
			if m.HeapInuse > heap0 {
				peak.Store(max(peak.Load(), m.HeapInuse-heap0))
			}
		}
	}()
	start := time.Now()
	err = im.Discard(0, rng)
	close(stop)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("discard of %d MiB in %v; peak heap growth %d MiB; CacheBytes 1 MiB", rng>>20, time.Since(start), peak.Load()>>20)
	if p := peak.Load(); p > 16<<20 {
		t.Fatalf("one discard range held %d MiB of heap (cache bound 1 MiB)", p>>20)
	}
	// Served in pieces, the lock released between them (zeroOrDiscard).
	if want := rng / cs / defaultPieceClusters; pieces < want {
		t.Fatalf("%d pieces, want %d at least", pieces, want)
	}
	got := make([]byte, 1<<20)
	for _, off := range []int64{0, rng/2 - 4096, rng - 1<<20} {
		if _, err := im.ReadAt(got, off); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
			t.Fatalf("read at %d after the discard: %v (zeroes expected)", off, err)
		}
	}
	closed = true
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("qemu-img"); err == nil {
		qemuClean(t, p)
	}
}
