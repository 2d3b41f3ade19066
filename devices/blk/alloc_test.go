package blk_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// readRig serves a 64 MiB raw image and returns a function that runs n
// 4 KiB random reads through the device, depth at a time, with a driver
// that allocates nothing (direct descriptors, fixed buffers, WaitInto):
// what it allocates is the back-end's, kick included.
func readRig(tb testing.TB, workers, depth int) func(n int) {
	tb.Helper()
	const size = 64 << 20
	path := filepath.Join(tb.TempDir(), "disk.img")
	if err := os.WriteFile(path, fill(size, 1), 0o600); err != nil {
		tb.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		tb.Fatal(err)
	}
	d, err := raw.Open(f, raw.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	dev, err := blk.New(blk.Config{Disk: d, QueueWorkers: workers})
	if err != nil {
		tb.Fatal(err)
	}
	back, front, err := vhostuser.SocketPair()
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- backend.Serve(ctx, back, dev, nil); back.Close() }()
	c, err := frontend.NewFromFile(front)
	front.Close()
	if err != nil {
		tb.Fatal(err)
	}
	g, err := testguest.Start(c, testguest.Options{Features: testguest.BlkFeatures, NoIndirect: true})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		g.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			tb.Error("back-end did not stop")
		}
		cancel()
	})
	ring := g.Rings[0]
	type req struct {
		buf  uint64
		hdr  []byte
		segs []testguest.Segment
	}
	reqs := make([]req, depth)
	for i := range reqs {
		buf, err := g.Mem.Alloc(8192, 4096)
		if err != nil {
			tb.Fatal(err)
		}
		hdr, _ := g.Mem.Bytes(buf, 16)
		binary.LittleEndian.PutUint32(hdr, testguest.BlkTIn)
		reqs[i] = req{buf, hdr, []testguest.Segment{{Addr: buf, Len: 16}, {Addr: buf + 4096, Len: 4096, Writable: true}, {Addr: buf + 16, Len: 1, Writable: true}}}
	}
	free := make([]int, 0, depth)
	for i := range reqs {
		free = append(free, i)
	}
	completions := make([]testguest.Completion, 0, depth)
	seq := uint64(1)
	bg := context.Background()
	return func(n int) {
		inflight := 0
		for i := 0; i < n || inflight > 0; {
			for len(free) > 0 && i < n {
				k := free[len(free)-1]
				free = free[:len(free)-1]
				seq = seq*6364136223846793005 + 1442695040888963407
				binary.LittleEndian.PutUint64(reqs[k].hdr[8:], (seq>>33)%(size/4096)*8)
				// The token is an int: no allocation.
				if _, err := ring.Post(reqs[k].segs, k); err != nil {
					tb.Fatal(err)
				}
				inflight++
				i++
			}
			if _, err := ring.Kick(); err != nil {
				tb.Fatal(err)
			}
			var err error
			if completions, err = ring.WaitInto(bg, completions); err != nil {
				tb.Fatal(err)
			}
			for _, c := range completions {
				if c.Len != 4097 {
					tb.Fatalf("read completed with %d bytes", c.Len)
				}
				free = append(free, c.Token.(int))
				inflight--
			}
		}
	}
}

// TestRequestPathNoAlloc: a 4 KiB read through the whole back-end — kick,
// ring engine, worker hand-off, preadv into guest memory, used element,
// notification — allocates nothing once warm.
func TestRequestPathNoAlloc(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates: no allocation count under -race")
	}
	for _, workers := range []int{1, blk.DefaultQueueWorkers} {
		for _, depth := range []int{1, 16} {
			t.Run(fmt.Sprintf("workers=%d/depth=%d", workers, depth), func(t *testing.T) {
				run := readRig(t, workers, depth)
				run(200)
				if a := testing.AllocsPerRun(100, func() { run(depth) }); a != 0 {
					t.Fatalf("%v allocations per %d requests", a, depth)
				}
			})
		}
	}
}

// BenchmarkRequestPath is 4 KiB random reads from the page cache through
// the whole back-end with a driver that allocates nothing, so allocs/op
// is the back-end's per request, kick included (0).
func BenchmarkRequestPath(b *testing.B) {
	for _, workers := range []int{1, blk.DefaultQueueWorkers} {
		for _, depth := range []int{1, 32} {
			b.Run(fmt.Sprintf("randread-4k-qd%d/workers=%d", depth, workers), func(b *testing.B) {
				run := readRig(b, workers, depth)
				run(1000)
				b.ReportAllocs()
				b.SetBytes(4096)
				b.ResetTimer()
				run(b.N)
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
			})
		}
	}
}

// raceEnabled is set in builds with the race detector (race_test.go).
var raceEnabled bool
