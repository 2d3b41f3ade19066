package blk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// rig is a blk device on a raw image served in-process over a socketpair,
// driven by the Go test guest through real rings in shared memory.
type rig struct {
	path  string
	dev   *blk.Device
	guest *testguest.Guest
	done  chan error
}

func newRig(t testing.TB, size int64, ro bool, queues, workers int) *rig {
	return newRigWrapped(t, size, ro, queues, workers, nil)
}

// slowDisk adds a fixed latency to every read, like a disk that is not in
// the page cache.
type slowDisk struct {
	*raw.Disk
	delay time.Duration
}

func (s slowDisk) ReadAt(p []byte, off int64) (int, error) {
	time.Sleep(s.delay)
	return s.Disk.ReadAt(p, off)
}

func (s slowDisk) ReadvAt(bufs [][]byte, off int64) (int, error) {
	time.Sleep(s.delay)
	return s.Disk.ReadvAt(bufs, off)
}

func newRigWrapped(t testing.TB, size int64, ro bool, queues, workers int, wrap func(*raw.Disk) disk.Disk) *rig {
	t.Helper()
	return newRigConfig(t, size, ro, blk.Config{NumQueues: queues, QueueWorkers: workers}, wrap)
}

// newRigConfig is newRigWrapped with the device's configuration (Disk and
// Serial are filled in).
func newRigConfig(t testing.TB, size int64, ro bool, cfg blk.Config, wrap func(*raw.Disk) disk.Disk) *rig {
	t.Helper()
	return newRigRing(t, size, ro, cfg, wrap, 0)
}

// newRigRing is newRigConfig with the size of the guest's rings (0: the
// test guest's default), which may be smaller than the device's largest,
// as QEMU's vhost-user-blk-pci (128) is.
func newRigRing(t testing.TB, size int64, ro bool, cfg blk.Config, wrap func(*raw.Disk) disk.Disk, ringSize uint16) *rig {
	t.Helper()
	queues := max(cfg.NumQueues, 1)
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	mode := os.O_RDWR
	if ro {
		mode = os.O_RDONLY
	}
	f, err := os.OpenFile(path, mode, 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := raw.Open(f, raw.Options{ReadOnly: ro})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	var dd disk.Disk = d
	if wrap != nil {
		dd = wrap(d)
	}
	cfg.Disk, cfg.Serial = dd, "rig-serial"
	dev, err := blk.New(cfg)
	if err != nil {
		t.Fatal(err)
	}

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	back := os.NewFile(uintptr(fds[0]), "backend")
	front := os.NewFile(uintptr(fds[1]), "frontend")
	ctx, cancel := context.WithCancel(context.Background())
	r := &rig{path: path, dev: dev, done: make(chan error, 1)}
	go func() {
		r.done <- backend.Serve(ctx, back, dev, nil)
		back.Close()
	}()
	c, err := frontend.NewFromFile(front)
	front.Close()
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	g, err := testguest.Start(c, testguest.Options{
		NumQueues: queues,
		Features:  testguest.BlkFeatures,
		MemSize:   128 << 20,
		QueueSize: ringSize,
	})
	if err != nil {
		c.Close()
		cancel()
		t.Fatal(err)
	}
	r.guest = g
	t.Cleanup(func() {
		g.Close()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("backend.Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("back-end did not stop after the front-end disconnected")
		}
		cancel()
	})
	return r
}

func (r *rig) blk(t testing.TB, q int) *testguest.Blk {
	t.Helper()
	b, err := testguest.NewBlk(r.guest, q)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func fill(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i) + byte(i>>9)*13
	}
	return b
}

func seg(sector uint64, n, flags uint32) []byte {
	s := make([]byte, 16)
	binary.LittleEndian.PutUint64(s, sector)
	binary.LittleEndian.PutUint32(s[8:], n)
	binary.LittleEndian.PutUint32(s[12:], flags)
	return s
}

func status(err error) int {
	var se *testguest.BlkStatusError
	if errors.As(err, &se) {
		return int(se.Status)
	}
	if err == nil {
		return blk.StatusOK
	}
	return -1
}

func TestVhostUserReadWrite(t *testing.T) {
	for _, workers := range []int{1, 8} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) { testReadWrite(t, workers) })
	}
}

func testReadWrite(t *testing.T, workers int) {
	const size = 16 << 20
	r := newRig(t, size, false, 2, workers)
	ctx := context.Background()
	want := uint64(testguest.BlkFFlush | testguest.BlkFDiscard | testguest.BlkFWriteZeroes | testguest.BlkFMQ | testguest.BlkFSegMax)
	if f := r.guest.Features(); f&want != want || f&testguest.BlkFRO != 0 {
		t.Fatalf("negotiated features %#x lack %#x or have RO", f, want)
	}
	b0, b1 := r.blk(t, 0), r.blk(t, 1)
	if b0.Config.Capacity != size/512 || b0.Config.NumQueues != 2 || b0.Config.BlkSize != 512 {
		t.Fatalf("config %+v", b0.Config)
	}
	if id, err := b0.GetID(ctx); err != nil || id != "rig-serial" {
		t.Fatalf("GetID = %q, %v", id, err)
	}

	// Both queues at once, each with a batch of requests in flight.
	var wg sync.WaitGroup
	for q, b := range []*testguest.Blk{b0, b1} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var reqs []*testguest.BlkRequest
			for i := 0; i < 64; i++ {
				sector := uint64(q*16384 + i*24)
				reqs = append(reqs, &testguest.BlkRequest{Type: testguest.BlkTOut, Sector: sector, Data: fill(8192, byte(q*64+i))})
			}
			if err := b.Do(ctx, reqs); err != nil {
				t.Error(err)
				return
			}
			for _, rq := range reqs {
				if rq.Err != nil {
					t.Errorf("queue %d write: %v", q, rq.Err)
					return
				}
			}
			for i, rq := range reqs {
				got := make([]byte, 8192)
				if err := b.Read(ctx, rq.Sector, got); err != nil {
					t.Errorf("queue %d read: %v", q, err)
					return
				}
				if !bytes.Equal(got, fill(8192, byte(q*64+i))) {
					t.Errorf("queue %d request %d reads back different data", q, i)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := b0.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// The host file holds what the guest wrote.
	img, err := os.ReadFile(r.path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img[16384*512:16384*512+8192], fill(8192, 64)) {
		t.Fatal("image file does not hold queue 1's first write")
	}

	// Last sector, then one past the end.
	if err := b1.Write(ctx, size/512-1, fill(512, 7)); err != nil {
		t.Fatal(err)
	}
	if err := b1.Read(ctx, size/512-1, make([]byte, 1024)); status(err) != blk.StatusIOErr {
		t.Fatalf("read across the end: %v", err)
	}

	// Discard and write zeroes read back as zeroes.
	if err := b0.Do(ctx, []*testguest.BlkRequest{
		{Type: testguest.BlkTDiscard, Data: seg(0, 16, 0)},
		{Type: testguest.BlkTWriteZeroes, Data: append(seg(24, 8, 0), seg(48, 16, 1)...)},
	}); err != nil {
		t.Fatal(err)
	}
	for _, s := range []uint64{0, 24, 48} {
		got := make([]byte, 4096)
		if err := b0.Read(ctx, s, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, make([]byte, 4096)) {
			t.Fatalf("sector %d not zero after discard/write zeroes", s)
		}
	}
	// Discard with the unmap flag is UNSUPP.
	unmap := &testguest.BlkRequest{Type: testguest.BlkTDiscard, Data: seg(0, 8, 1)}
	if err := b0.Do(ctx, []*testguest.BlkRequest{unmap}); err != nil {
		t.Fatal(err)
	}
	if status(unmap.Err) != blk.StatusUnsupp {
		t.Fatalf("discard with unmap: %v, want UNSUPP", unmap.Err)
	}
	st := r.dev.Stats()
	if st.Writes < 129 || st.Reads < 129 || st.Discards != 2 || st.BadFlags != 1 || st.WriteZeroes != 1 || st.OutOfRange != 1 || st.GetIDs != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestVhostUserReadOnly(t *testing.T) {
	r := newRig(t, 1<<20, true, 1, 0)
	ctx := context.Background()
	if r.guest.Features()&testguest.BlkFRO == 0 {
		t.Fatal("VIRTIO_BLK_F_RO not negotiated for a read-only disk")
	}
	if r.guest.Features()&(testguest.BlkFDiscard|testguest.BlkFWriteZeroes) != 0 {
		t.Fatal("read-only disk offers discard/write zeroes")
	}
	b := r.blk(t, 0)
	if err := b.Read(ctx, 0, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	for _, rq := range []*testguest.BlkRequest{
		{Type: testguest.BlkTOut, Sector: 0, Data: fill(512, 1)},
		{Type: testguest.BlkTDiscard, Data: seg(0, 8, 0)},
		{Type: testguest.BlkTWriteZeroes, Data: seg(0, 8, 0)},
	} {
		if err := b.Do(ctx, []*testguest.BlkRequest{rq}); err != nil {
			t.Fatal(err)
		}
		if status(rq.Err) != blk.StatusIOErr {
			t.Errorf("type %d on a read-only disk: %v, want IOERR", rq.Type, rq.Err)
		}
	}
	img, _ := os.ReadFile(r.path)
	if !bytes.Equal(img, make([]byte, 1<<20)) {
		t.Fatal("read-only image changed")
	}
	if got := r.dev.Stats().ReadOnly; got != 3 {
		t.Fatalf("ReadOnly counter %d, want 3", got)
	}
}

// BenchmarkVhostUser measures the whole path — Go test guest, rings in
// shared memory, eventfd kicks and calls, the back-end framework, this
// device and disk/raw — for 4 KiB random reads at queue depth 1 and 32 and
// 1 MiB sequential reads and writes. The image sits in the page cache, so
// this is the device's overhead, not the storage's speed.
func BenchmarkVhostUser(b *testing.B) {
	const size = 256 << 20
	for _, bc := range []struct {
		name  string
		typ   uint32
		bs    int
		depth int
	}{
		{"randread-4k-qd1", testguest.BlkTIn, 4096, 1},
		{"randread-4k-qd32", testguest.BlkTIn, 4096, 32},
		{"randwrite-4k-qd32", testguest.BlkTOut, 4096, 32},
		{"seqread-1m-qd4", testguest.BlkTIn, 1 << 20, 4},
		{"seqwrite-1m-qd4", testguest.BlkTOut, 1 << 20, 4},
	} {
		for _, workers := range []int{1, blk.DefaultQueueWorkers} {
			b.Run(fmt.Sprintf("%s/workers=%d", bc.name, workers), func(b *testing.B) {
				r := newRig(b, size, false, 1, workers)
				if err := os.WriteFile(r.path, fill(size, 3), 0o600); err != nil {
					b.Fatal(err)
				}
				bk := r.blk(b, 0)
				ctx := context.Background()
				reqs := make([]*testguest.BlkRequest, bc.depth)
				for i := range reqs {
					reqs[i] = &testguest.BlkRequest{Type: bc.typ, Data: make([]byte, bc.bs)}
				}
				blocks := uint64(size / bc.bs)
				seq := uint64(0)
				b.SetBytes(int64(bc.bs * bc.depth))
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					for _, rq := range reqs {
						if bc.bs == 4096 {
							seq = seq*6364136223846793005 + 1442695040888963407
							rq.Sector = (seq >> 33) % blocks * 8
						} else {
							rq.Sector = (uint64(i*bc.depth) + uint64(len(reqs))) % blocks * uint64(bc.bs/512)
						}
					}
					if err := bk.Do(ctx, reqs); err != nil {
						b.Fatal(err)
					}
					for _, rq := range reqs {
						if rq.Err != nil {
							b.Fatal(rq.Err)
						}
					}
				}
				b.ReportMetric(float64(b.N*bc.depth)/b.Elapsed().Seconds(), "IOPS")
			})
		}
	}
}

// TestVhostUserStopWithRequestsInFlight stops the ring (GET_VRING_BASE)
// while a batch of requests is in flight: every request the back-end took
// must be completed, so the used ring accounts for exactly the next
// available index it reports.
func TestVhostUserStopWithRequestsInFlight(t *testing.T) {
	for _, workers := range []int{1, 8} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			r := newRig(t, 64<<20, false, 1, workers)
			ring := r.guest.Rings[0]
			mem := r.guest.Mem
			const n = 100
			for i := 0; i < n; i++ {
				buf, err := mem.Alloc(4096+1<<20, 4096)
				if err != nil {
					t.Fatal(err)
				}
				b, _ := mem.Bytes(buf, 32)
				binary.LittleEndian.PutUint32(b, testguest.BlkTIn)
				binary.LittleEndian.PutUint64(b[8:], uint64(i)*2048)
				segs := []testguest.Segment{{Addr: buf, Len: 16}, {Addr: buf + 4096, Len: 1 << 20, Writable: true}, {Addr: buf + 16, Len: 1, Writable: true}}
				if _, err := ring.Post(segs, i); err != nil {
					t.Fatal(err)
				}
			}
			if err := ring.KickAlways(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Millisecond)
			base, err := r.guest.StopQueue(0)
			if err != nil {
				t.Fatal(err)
			}
			if base > n {
				t.Fatalf("vring base %d beyond the %d posted", base, n)
			}
			if used := ring.UsedIdx(); uint32(used) != base {
				t.Fatalf("back-end took %d requests but completed %d", base, used)
			}
			t.Logf("%d of %d requests taken before the stop", base, n)
		})
	}
}

// BenchmarkVhostUserSlowDisk shows what requests in flight per queue buy
// when the disk takes its time (200 µs per read): at queue depth 32 one
// synchronous worker is bound by the latency, eight overlap it.
func BenchmarkVhostUserSlowDisk(b *testing.B) {
	for _, workers := range []int{1, blk.DefaultQueueWorkers} {
		b.Run(fmt.Sprintf("randread-4k-qd32/workers=%d", workers), func(b *testing.B) {
			r := newRigWrapped(b, 64<<20, false, 1, workers, func(d *raw.Disk) disk.Disk {
				return slowDisk{Disk: d, delay: 200 * time.Microsecond}
			})
			bk := r.blk(b, 0)
			reqs := make([]*testguest.BlkRequest, 32)
			for i := range reqs {
				reqs[i] = &testguest.BlkRequest{Type: testguest.BlkTIn, Sector: uint64(i) * 8, Data: make([]byte, 4096)}
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := bk.Do(context.Background(), reqs); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*len(reqs))/b.Elapsed().Seconds(), "IOPS")
		})
	}
}

// TestVhostUserMalformed mixes malformed chains (a buffer outside guest
// memory) and hostile requests (short header, bad length, past the end)
// with good ones in one batch: the bad ones fail alone, the ring keeps
// running, the good ones complete.
func TestVhostUserMalformed(t *testing.T) {
	for _, workers := range []int{1, 8} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			r := newRig(t, 1<<20, false, 1, workers)
			ring := r.guest.Rings[0]
			mem := r.guest.Mem
			type req struct {
				name   string
				segs   func(buf uint64) []testguest.Segment
				status int // -1: malformed chain, used length 0
			}
			hdr := func(buf uint64, typ uint32, sector uint64) {
				b, _ := mem.Bytes(buf, 16)
				binary.LittleEndian.PutUint32(b, typ)
				binary.LittleEndian.PutUint64(b[8:], sector)
			}
			reqs := []req{
				{"good read", func(buf uint64) []testguest.Segment {
					hdr(buf, testguest.BlkTIn, 8)
					return []testguest.Segment{{Addr: buf, Len: 16}, {Addr: buf + 4096, Len: 4096, Writable: true}, {Addr: buf + 16, Len: 1, Writable: true}}
				}, blk.StatusOK},
				{"buffer outside memory", func(buf uint64) []testguest.Segment {
					hdr(buf, testguest.BlkTIn, 8)
					return []testguest.Segment{{Addr: buf, Len: 16}, {Addr: 1 << 40, Len: 4096, Writable: true}, {Addr: buf + 16, Len: 1, Writable: true}}
				}, -1},
				{"short header", func(buf uint64) []testguest.Segment {
					hdr(buf, testguest.BlkTIn, 8)
					return []testguest.Segment{{Addr: buf, Len: 8}, {Addr: buf + 16, Len: 1, Writable: true}}
				}, blk.StatusIOErr},
				{"odd length", func(buf uint64) []testguest.Segment {
					hdr(buf, testguest.BlkTOut, 8)
					return []testguest.Segment{{Addr: buf, Len: 16}, {Addr: buf + 4096, Len: 1000}, {Addr: buf + 16, Len: 1, Writable: true}}
				}, blk.StatusIOErr},
				{"past the end", func(buf uint64) []testguest.Segment {
					hdr(buf, testguest.BlkTIn, 2047)
					return []testguest.Segment{{Addr: buf, Len: 16}, {Addr: buf + 4096, Len: 1024, Writable: true}, {Addr: buf + 16, Len: 1, Writable: true}}
				}, blk.StatusIOErr},
				{"good write", func(buf uint64) []testguest.Segment {
					hdr(buf, testguest.BlkTOut, 16)
					return []testguest.Segment{{Addr: buf, Len: 16}, {Addr: buf + 4096, Len: 512}, {Addr: buf + 16, Len: 1, Writable: true}}
				}, blk.StatusOK},
			}
			bufs := map[int]uint64{}
			for round := 0; round < 5; round++ {
				for i, rq := range reqs {
					buf, err := mem.Alloc(8192, 4096)
					if err != nil {
						t.Fatal(err)
					}
					st, _ := mem.Bytes(buf+16, 1)
					st[0] = 0xff
					bufs[round*len(reqs)+i] = buf
					if _, err := ring.Post(rq.segs(buf), round*len(reqs)+i); err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := ring.KickAlways(); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			for seen := 0; seen < 5*len(reqs); {
				cs, err := ring.Wait(ctx)
				if err != nil {
					t.Fatalf("after %d completions: %v", seen, err)
				}
				for _, c := range cs {
					seen++
					k := c.Token.(int)
					rq := reqs[k%len(reqs)]
					st, _ := mem.Bytes(bufs[k]+16, 1)
					if rq.status < 0 {
						if c.Len != 0 {
							t.Errorf("%s: used length %d, want 0", rq.name, c.Len)
						}
						continue
					}
					if int(st[0]) != rq.status {
						t.Errorf("%s: status %d, want %d", rq.name, st[0], rq.status)
					}
				}
			}
			if st := r.dev.Stats(); st.ShortHeader != 5 || st.BadLength != 5 || st.OutOfRange != 5 || st.Reads != 10 || st.Writes != 10 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

// overlapDisk records how many writes, and how many reads, are on the disk
// at once; each one lasts a while so that workers overlap.
type overlapDisk struct {
	*raw.Disk
	writes, reads       atomic.Int32
	maxWrites, maxReads atomic.Int32
	// mixed counts the reads that began while a write was on the disk,
	// and the writes that began while a read was.
	mixed atomic.Int32
}

func (o *overlapDisk) enter(n, peak *atomic.Int32) func() {
	v := n.Add(1)
	for {
		p := peak.Load()
		if v <= p || peak.CompareAndSwap(p, v) {
			break
		}
	}
	time.Sleep(2 * time.Millisecond)
	return func() { n.Add(-1) }
}

func (o *overlapDisk) WritevAt(bufs [][]byte, off int64) (int, error) {
	if o.reads.Load() > 0 {
		o.mixed.Add(1)
	}
	defer o.enter(&o.writes, &o.maxWrites)()
	return o.Disk.WritevAt(bufs, off)
}

func (o *overlapDisk) ReadvAt(bufs [][]byte, off int64) (int, error) {
	if o.writes.Load() > 0 {
		o.mixed.Add(1)
	}
	defer o.enter(&o.reads, &o.maxReads)()
	return o.Disk.ReadvAt(bufs, off)
}

// TestSerialWrites: with SerialWrites one write at a time reaches the disk
// and reads still overlap; without it, writes overlap too. Every write
// lands.
func TestSerialWrites(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial=%v", serial), func(t *testing.T) {
			var od *overlapDisk
			r := newRigConfig(t, 8<<20, false, blk.Config{QueueWorkers: 8, SerialWrites: serial}, func(d *raw.Disk) disk.Disk {
				od = &overlapDisk{Disk: d}
				return od
			})
			bk := r.blk(t, 0)
			var reqs []*testguest.BlkRequest
			for i := range 32 {
				reqs = append(reqs, &testguest.BlkRequest{Type: testguest.BlkTOut, Sector: uint64(i) * 8, Data: fill(4096, byte(i+1))})
			}
			if err := bk.Do(context.Background(), reqs); err != nil {
				t.Fatal(err)
			}
			for i, q := range reqs {
				if q.Err != nil {
					t.Fatalf("write %d: %v", i, q.Err)
				}
			}
			reqs = reqs[:0]
			for i := range 32 {
				reqs = append(reqs, &testguest.BlkRequest{Type: testguest.BlkTIn, Sector: uint64(i) * 8, Data: make([]byte, 4096)})
			}
			if err := bk.Do(context.Background(), reqs); err != nil {
				t.Fatal(err)
			}
			for i, q := range reqs {
				if q.Err != nil || !bytes.Equal(q.Data, fill(4096, byte(i+1))) {
					t.Fatalf("read back %d: %v, data differs: %v", i, q.Err, !bytes.Equal(q.Data, fill(4096, byte(i+1))))
				}
			}
			mw, mr := od.maxWrites.Load(), od.maxReads.Load()
			if serial && mw != 1 {
				t.Errorf("SerialWrites: %d writes on the disk at once, want 1", mw)
			}
			if !serial && mw < 2 {
				t.Errorf("without SerialWrites: at most %d write on the disk at once, want overlap", mw)
			}
			if mr < 2 {
				t.Errorf("at most %d read on the disk at once, want overlap", mr)
			}
		})
	}
}

// doBlk posts reqs at once and fails the test on any error.
func doBlk(t *testing.T, bk *testguest.Blk, reqs ...*testguest.BlkRequest) {
	t.Helper()
	if err := bk.Do(context.Background(), reqs); err != nil {
		t.Fatal(err)
	}
	for i, q := range reqs {
		if q.Err != nil {
			t.Fatalf("request %d: %v", i, q.Err)
		}
	}
}

// startStream sends 96 writes in batches of four: each batch passes at
// least three of them through Inline, so the queue is in a stream of
// writes (writeStreak) afterwards.
func startStream(t *testing.T, bk *testguest.Blk, write func() *testguest.BlkRequest) {
	t.Helper()
	for range 24 {
		doBlk(t, bk, write(), write(), write(), write())
	}
}

// TestLongWriteStream: with SerialWrites, a stream of long writes is served
// on the ring's goroutine (a read posted behind writes then waits for
// them), and a read ends the stream: the next long writes go to workers
// again, and a read behind them overlaps them. Every write lands.
func TestLongWriteStream(t *testing.T) {
	var od *overlapDisk
	r := newRigConfig(t, 8<<20, false, blk.Config{QueueWorkers: 8, SerialWrites: true}, func(d *raw.Disk) disk.Disk {
		od = &overlapDisk{Disk: d}
		return od
	})
	bk := r.blk(t, 0)
	const size = 128 << 10 // longer than a write served inline anyway
	n := 0
	write := func() *testguest.BlkRequest {
		n++
		return &testguest.BlkRequest{Type: testguest.BlkTOut, Sector: uint64(n%64) * size / 512, Data: fill(size, byte(n))}
	}
	read := func() *testguest.BlkRequest {
		return &testguest.BlkRequest{Type: testguest.BlkTIn, Sector: 0, Data: make([]byte, 4096)}
	}
	do := func(reqs ...*testguest.BlkRequest) { t.Helper(); doBlk(t, bk, reqs...) }
	startStream(t, bk, write)
	before := od.mixed.Load()
	do(write(), write(), write(), read())
	if got := od.mixed.Load() - before; got != 0 {
		t.Fatalf("in a stream of writes, a read behind three writes overlapped them %d times", got)
	}
	before = od.mixed.Load()
	do(write(), write(), write(), read())
	if got := od.mixed.Load() - before; got == 0 {
		t.Fatalf("after a read, a read behind three long writes did not overlap them: the writes were not on workers")
	}
	if mw := od.maxWrites.Load(); mw != 1 {
		t.Fatalf("%d writes on the disk at once, want 1", mw)
	}
	// The last 64 writes, read back.
	for i := n - 63; i <= n; i++ {
		got := make([]byte, size)
		if err := bk.Read(context.Background(), uint64(i%64)*size/512, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, fill(size, byte(i))) {
			t.Fatalf("write %d did not land", i)
		}
	}
}

// pubDisk: writes last 1 ms, reads are immediate; after the read is done it
// counts the writes that begin while the read's completion is still not
// visible in the used ring.
type pubDisk struct {
	*raw.Disk
	used          func() uint16
	elems         []byte // the used ring's elements
	qsize         uint16
	base          atomic.Int32 // used idx before the batch, -1: not armed
	readDone      atomic.Bool
	hidden        atomic.Int32 // writes begun after the read, before it was published
	total, atRead atomic.Int32
}

func (p *pubDisk) WritevAt(bufs [][]byte, off int64) (int, error) {
	if p.readDone.Load() && !p.published() {
		p.hidden.Add(1)
	}
	p.total.Add(1)
	time.Sleep(time.Millisecond)
	return p.Disk.WritevAt(bufs, off)
}

// published: the read (4097 bytes written) is among the used elements
// the driver can see.
func (p *pubDisk) published() bool {
	for i := uint16(p.base.Load()); i != p.used(); i++ {
		e := p.elems[8*uint64(i%p.qsize):]
		if binary.LittleEndian.Uint32(e[4:]) == 4097 {
			return true
		}
	}
	return false
}

func (p *pubDisk) ReadvAt(bufs [][]byte, off int64) (int, error) {
	time.Sleep(20 * time.Millisecond) // a read not in the page cache
	n, err := p.Disk.ReadvAt(bufs, off)
	if p.base.Load() >= 0 {
		p.readDone.Store(true)
		p.atRead.Store(p.total.Load())
	}
	return n, err
}

// TestReadPublishedInWriteStream: a read behind 62 writes of a stream, with
// 120 more writes behind it, is served on a worker while the ring's
// goroutine serves the writes (or waits for the write lock behind the
// workers'): the driver sees the read as soon as it is done, not when the
// ring's goroutine next publishes (found in review: 102 writes later).
func TestReadPublishedInWriteStream(t *testing.T) {
	var pd *pubDisk
	r := newRigRing(t, 32<<20, false, blk.Config{QueueWorkers: 8, SerialWrites: true}, func(d *raw.Disk) disk.Disk {
		pd = &pubDisk{Disk: d}
		pd.base.Store(-1)
		return pd
	}, 1024)
	ring := r.guest.Rings[0]
	pd.used = ring.UsedIdx
	_, _, usedAddr := ring.Addrs()
	mem, err := r.guest.Mem.Bytes(usedAddr+4, 8*uint64(ring.Size()))
	if err != nil {
		t.Fatal(err)
	}
	pd.elems, pd.qsize = mem, ring.Size()
	bk := r.blk(t, 0)
	const size = 128 << 10
	n := 0
	write := func() *testguest.BlkRequest {
		n++
		return &testguest.BlkRequest{Type: testguest.BlkTOut, Sector: uint64(n%200) * size / 512, Data: fill(size, byte(n))}
	}
	do := func(reqs ...*testguest.BlkRequest) { t.Helper(); doBlk(t, bk, reqs...) }
	startStream(t, bk, write)
	var reqs []*testguest.BlkRequest
	for range 62 {
		reqs = append(reqs, write())
	}
	reqs = append(reqs, &testguest.BlkRequest{Type: testguest.BlkTIn, Sector: 0, Data: make([]byte, 4096)})
	for range 120 {
		reqs = append(reqs, write())
	}
	pd.total.Store(0)
	pd.base.Store(int32(ring.UsedIdx()))
	do(reqs...)
	t.Logf("writes begun when the read was done: %d of %d; hidden %d", pd.atRead.Load(), pd.total.Load(), pd.hidden.Load())
	// One write may begin between the read's return from the disk and
	// its completion's publication, microseconds later.
	if h := pd.hidden.Load(); h > 1 {
		t.Errorf("the read was done, but %d writes queued behind it began before the driver could see it", h)
	}
}

// waitDisk's Discard waits (5 s at most) for a read to reach the disk:
// the read must get past the discard in flight.
type waitDisk struct {
	*raw.Disk
	once sync.Once
	read chan struct{}
}

func (w *waitDisk) Discard(off, n int64) error {
	select {
	case <-w.read:
		return w.Disk.Discard(off, n)
	case <-time.After(5 * time.Second):
		return errors.New("no read got past the discard in 5 s")
	}
}

func (w *waitDisk) ReadvAt(bufs [][]byte, off int64) (int, error) {
	w.once.Do(func() { close(w.read) })
	return w.Disk.ReadvAt(bufs, off)
}

// TestReadPassesLongDiscard: a read posted behind a DISCARD that takes its
// time (a range of gigabytes) completes while the discard is in flight,
// with SerialWrites (a qcow2 or raw image in a regular file) or without:
// with it, the discard was served on the ring's goroutine as a write, and
// the read waited until it ended (found in review).
func TestReadPassesLongDiscard(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial=%v", serial), func(t *testing.T) {
			r := newRigConfig(t, 8<<20, false, blk.Config{QueueWorkers: 4, SerialWrites: serial}, func(d *raw.Disk) disk.Disk {
				return &waitDisk{Disk: d, read: make(chan struct{})}
			})
			bk := r.blk(t, 0)
			discard := &testguest.BlkRequest{Type: testguest.BlkTDiscard, Data: seg(0, 8<<20/512, 0)}
			read := &testguest.BlkRequest{Type: testguest.BlkTIn, Sector: 8, Data: make([]byte, 4096)}
			doBlk(t, bk, discard, read)
		})
	}
}

// TestReadPassesLongDiscardsOnEveryWorker: as many long DISCARDs as the
// queue has workers, then a read: the read still gets a worker and
// completes while the discards are in flight. A guest discarding a large
// disk sends many such requests at once (each range at most just under
// 2 GiB); with every worker taken by one, a read waited in the workers'
// queue until a discard ended, whatever the image did to let it in
// (found in review, helper-134).
func TestReadPassesLongDiscardsOnEveryWorker(t *testing.T) {
	const workers = 4
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial=%v", serial), func(t *testing.T) {
			r := newRigConfig(t, 8<<20, false, blk.Config{QueueWorkers: workers, SerialWrites: serial}, func(d *raw.Disk) disk.Disk {
				return &waitDisk{Disk: d, read: make(chan struct{})}
			})
			bk := r.blk(t, 0)
			var reqs []*testguest.BlkRequest
			for i := range workers + 2 {
				reqs = append(reqs, &testguest.BlkRequest{Type: testguest.BlkTDiscard, Data: seg(uint64(i)*8, 8, 0)})
			}
			reqs = append(reqs, &testguest.BlkRequest{Type: testguest.BlkTIn, Sector: 8, Data: make([]byte, 4096)})
			doBlk(t, bk, reqs...)
		})
	}
}
