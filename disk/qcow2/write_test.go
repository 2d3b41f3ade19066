package qcow2

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/disk"
)

// TestPartialWriteToFreshCluster: a write smaller than a cluster that
// allocates a new cluster writes only its own bytes when the rest of the
// cluster reads as zeros anyway (no backing data under it), and the whole
// cluster when the rest must come from the backing file; a write over
// several fresh clusters, which the pool hands out consecutively, is one
// write. Either way the image reads back the write surrounded by what was
// there before, also after it is closed and opened again.
func TestPartialWriteToFreshCluster(t *testing.T) {
	const cs = 64 << 10
	for _, tc := range []struct {
		name      string
		backing   byte // 0: no backing file
		off, n    int64
		wantWrite int // length of the data write that carries the payload
	}{
		{"no backing", 0, 3*cs + 8192, 4096, 4096},
		{"backing under it", 0xAA, 3*cs + 8192, 4096, cs},
		// Consecutive fresh clusters take one write.
		{"1 MiB, fresh clusters", 0, cs, 1 << 20, 1 << 20},
		{"1 MiB from mid-cluster", 0, cs + 4096, 1 << 20, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			co := CreateOptions{Size: 4 << 20}
			var chain []Layer
			if tc.backing != 0 {
				bp := filepath.Join(dir, "base.raw")
				if err := os.WriteFile(bp, bytes.Repeat([]byte{tc.backing}, 4<<20), 0o644); err != nil {
					t.Fatal(err)
				}
				co.BackingFile, co.BackingFormat = bp, disk.Raw
				chain = []Layer{layerOf(t, bp, disk.Raw)}
			}
			f, err := os.Create(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := Create(f, co); err != nil {
				t.Fatal(err)
			}
			f.Close()

			im := openImage(t, p, false, chain...)
			rec := &recorder{ioFile: im.f}
			im.f, im.data = rec, rec
			payload := bytes.Repeat([]byte{0x5C}, int(tc.n))
			off := tc.off
			if _, err := im.WriteAt(payload, off); err != nil {
				t.Fatal(err)
			}
			got := -1
			for _, e := range rec.log {
				if bytes.Contains(e.data, payload) {
					got = len(e.data)
				}
			}
			if got != tc.wantWrite {
				t.Errorf("the payload went out in a write of %d bytes, want %d", got, tc.wantWrite)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}

			want := bytes.Repeat([]byte{tc.backing}, 4<<20)
			copy(want[off:], payload)
			if tc.backing != 0 {
				chain = []Layer{layerOf(t, co.BackingFile, disk.Raw)}
			}
			im = openImage(t, p, true, chain...)
			defer im.Close()
			compareImage(t, im, want, 1)
		})
	}
}

// TestAllocatingWritesDoNotSync: a stream of allocating writes with no
// FLUSH refills the cluster pool several times, and each refill makes its
// refcounts (and the file's new end) durable with durable writes of their
// own, not with a sync of the whole file, which would write out every
// guest write since the last one. TestCrashLeaksAtWorst checks that the
// order still holds across a power failure.
func TestAllocatingWritesDoNotSync(t *testing.T) {
	needQemu(t)
	p := filepath.Join(t.TempDir(), "img.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", p, "64M")
	// The L2 table exists already: a new one is made durable before the
	// L1 entry that points to it (persist), which is not what this
	// counts.
	qio(t, p, "write -P 0x11 0 64k")
	im := openImage(t, p, false)
	rec := &recorder{ioFile: im.f}
	im.f, im.data = rec, rec
	buf := bytes.Repeat([]byte{0xA5}, 1<<20)
	const n = 3 * poolFirstBytes >> 20 // MiB: three pools (a 64 MiB image keeps its pools at 4 MiB)
	for i := range n {
		if _, err := im.WriteAt(buf, int64(1+i)<<20); err != nil {
			t.Fatal(err)
		}
	}
	syncs, durable := 0, 0
	for _, e := range rec.log {
		switch {
		case e.data == nil:
			syncs++
		case e.durable:
			durable++
		}
	}
	if syncs != 0 || durable < 3 {
		t.Errorf("%d MiB of allocating writes: %d syncs and %d durable writes, want none and at least 3 (a pool refill makes two)", n, syncs, durable)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im = openImage(t, p, true)
	defer im.Close()
	got := make([]byte, 1<<20)
	for i := range n {
		if _, err := im.ReadAt(got, int64(1+i)<<20); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, buf) {
			t.Fatalf("MiB %d reads back %d bytes different", i, len(got)-bytes.Count(got, []byte{0xA5}))
		}
	}
	if q := qemuCheck(t, p); q.Corruptions != 0 || q.CheckErrors != 0 {
		t.Fatalf("qemu-img check: %s", q.Output)
	}
}

// TestWriteDurable: writeDurable writes what it is given where it is told,
// inside the file and past its end.
func TestWriteDurable(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, w := range []struct {
		off  int64
		data string
	}{{0, "hello"}, {3, "LO, world"}, {1 << 20, "far"}} {
		if err := writeDurable(f, []byte(w.data), w.off); err != nil {
			t.Fatalf("writeDurable(%q at %d): %v", w.data, w.off, err)
		}
	}
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 1<<20+3 || string(b[:12]) != "helLO, world" || string(b[1<<20:]) != "far" {
		t.Errorf("file of %d bytes starting %q, ending %q", len(b), b[:min(12, len(b))], b[max(0, len(b)-3):])
	}
}

// TestPoolGrows: each refill doubles the next pool, from 64 clusters (or
// 4 MiB) up to 32 MiB, 4096 clusters and a sixteenth of the virtual size.
func TestPoolGrows(t *testing.T) {
	for _, tc := range []struct {
		name        string
		cs, size    uint64
		wantFirst   uint64
		wantLargest uint64
	}{
		{"64k clusters, 100 GiB", 64 << 10, 100 << 30, 64, 512},
		{"64k clusters, 256 MiB", 64 << 10, 256 << 20, 64, 256},
		{"64k clusters, 16 MiB", 64 << 10, 16 << 20, 64, 64},
		{"4k clusters, 100 GiB", 4 << 10, 100 << 30, 64, 4096},
		{"2M clusters, 100 GiB", 2 << 20, 100 << 30, 2, 16},
		{"512 B clusters, 1 GiB", 512, 1 << 30, 64, 4096},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := &Image{cs: tc.cs, size: int64(tc.size)}
			n := im.poolClusters()
			if n != tc.wantFirst {
				t.Fatalf("first pool %d clusters, want %d", n, tc.wantFirst)
			}
			for range 20 {
				im.growPool(n)
				next := im.poolClusters()
				if next > 2*n {
					t.Fatalf("pool of %d clusters followed by %d", n, next)
				}
				n = next
			}
			if n != tc.wantLargest {
				t.Errorf("pools grow to %d clusters, want %d", n, tc.wantLargest)
			}
		})
	}
}

// TestRefillReusesGaps: once pools have grown, a refill still takes a gap
// that discards freed inside the file if it holds a first pool (64
// clusters here), a shorter pool then, instead of passing it for a run of
// the grown size further on.
func TestRefillReusesGaps(t *testing.T) {
	needQemu(t)
	p := filepath.Join(t.TempDir(), "img.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", p, "256M")
	im := openImage(t, p, false)
	defer im.Close()
	if _, err := im.WriteAt(bytes.Repeat([]byte{0x77}, 16<<20), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Discard(4<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := im.Flush(); err != nil { // applies the frees
		t.Fatal(err)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.releasePool(); err != nil {
		t.Fatal(err)
	}
	im.poolNext = 256 // 16 MiB, this image's largest pool
	gap, n, err := im.findFreeRun(256, 1)
	if err != nil {
		t.Fatal(err)
	}
	if n != 64 {
		t.Fatalf("the discarded 4 MiB left a free run of %d clusters at %d, want 64", n, gap)
	}
	if err := im.refillPool(); err != nil {
		t.Fatal(err)
	}
	if im.pool != [2]uint64{gap, 64} {
		t.Errorf("refill took clusters %d+%d, want the gap %d+64", im.pool[0], im.pool[1], gap)
	}
	if im.poolClusters() != 256 {
		t.Errorf("next pool %d clusters, want 256: a short run does not shrink the pools", im.poolClusters())
	}
}

// TestWriteDurableFallback: where pwritev2 or RWF_DSYNC is missing (an
// old kernel: ENOSYS, EINVAL; a file system: EOPNOTSUPP), writeDurable
// writes with pwrite and syncs; another error is returned as it is.
func TestWriteDurableFallback(t *testing.T) {
	for _, tc := range []struct {
		errno    unix.Errno
		fallback bool
	}{{unix.ENOSYS, true}, {unix.EINVAL, true}, {unix.EOPNOTSUPP, true}, {unix.EIO, false}, {unix.ENOSPC, false}} {
		t.Run(tc.errno.Error(), func(t *testing.T) {
			f, err := os.Create(filepath.Join(t.TempDir(), "f"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			calls := 0
			fail := func(int, [][]byte, int64, int) (int, error) { calls++; return 0, tc.errno }
			err = writeDurableWith(fail, f, []byte("data"), 8)
			b, _ := os.ReadFile(f.Name())
			switch {
			case calls != 1:
				t.Fatalf("pwritev2 called %d times, want 1", calls)
			case tc.fallback && (err != nil || string(b) != "\x00\x00\x00\x00\x00\x00\x00\x00data"):
				t.Fatalf("fallback: err %v, file %q", err, b)
			case !tc.fallback && !errors.Is(err, tc.errno):
				t.Fatalf("err %v, want %v", err, tc.errno)
			case !tc.fallback && len(b) != 0:
				t.Fatalf("wrote %q after %v", b, tc.errno)
			}
		})
	}
}
