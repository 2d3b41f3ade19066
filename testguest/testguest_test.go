package testguest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/vhostuser/frontend"
	"github.com/krun-core/krun-core/virtq"
	"golang.org/x/sys/unix"
)

func newMem(t *testing.T, base, size uint64) *Memory {
	t.Helper()
	m, err := NewMemory(base, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestAllocator(t *testing.T) {
	m := newMem(t, 0x10000, 64<<10)
	total := m.FreeBytes()
	if total != 64<<10 {
		t.Fatalf("free %d", total)
	}
	a, err := m.Alloc(100, 4096)
	if err != nil || a != 0x10000 {
		t.Fatalf("first alloc %#x %v", a, err)
	}
	b, err := m.Alloc(10, 8)
	if err != nil || b != 0x10000+100+4 {
		t.Fatalf("second alloc %#x %v, want %#x", b, err, 0x10000+104)
	}
	c, err := m.Alloc(4096, 4096)
	if err != nil || c%4096 != 0 || c < b+10 {
		t.Fatalf("aligned alloc %#x %v", c, err)
	}
	// Allocations are zeroed, even when reused.
	buf, _ := m.Bytes(a, 100)
	for i := range buf {
		buf[i] = 0xff
	}
	if err := m.Free(a); err != nil {
		t.Fatal(err)
	}
	a2, err := m.Alloc(100, 4096)
	if err != nil || a2 != a {
		t.Fatalf("realloc %#x %v", a2, err)
	}
	buf, _ = m.Bytes(a2, 100)
	if !bytes.Equal(buf, make([]byte, 100)) {
		t.Fatal("reused allocation not zeroed")
	}
	if err := m.Free(a2 + 1); err == nil {
		t.Fatal("free of a non-allocation accepted")
	}
	for _, x := range []uint64{a2, b, c} {
		if err := m.Free(x); err != nil {
			t.Fatal(err)
		}
	}
	if m.FreeBytes() != total || len(m.free) != 1 {
		t.Fatalf("after freeing everything: %d bytes in %d extents", m.FreeBytes(), len(m.free))
	}
	if _, err := m.Alloc(65<<10, 8); !errors.Is(err, ErrNoGuestMemory) {
		t.Fatalf("oversized alloc: %v", err)
	}
	if _, err := m.Alloc(8, 3); err == nil {
		t.Fatal("alignment 3 accepted")
	}
	// Fill memory with small pieces, free every other one, then the rest:
	// everything coalesces back.
	var all []uint64
	for {
		x, err := m.Alloc(1000, 8)
		if err != nil {
			break
		}
		all = append(all, x)
	}
	if len(all) != 64<<10/1000 {
		t.Fatalf("%d allocations of 1000 bytes in 64 KiB", len(all))
	}
	for i := 0; i < len(all); i += 2 {
		m.Free(all[i])
	}
	for i := 1; i < len(all); i += 2 {
		m.Free(all[i])
	}
	if m.FreeBytes() != total || len(m.free) != 1 {
		t.Fatalf("fragmented: %d bytes in %d extents", m.FreeBytes(), len(m.free))
	}
}

func TestMemoryRegions(t *testing.T) {
	m := newMem(t, 1<<30, 10*4096)
	rs := m.Regions(3)
	if len(rs) != 3 {
		t.Fatalf("%d regions", len(rs))
	}
	var next, size uint64 = 1 << 30, 0
	for i, r := range rs {
		if r.GuestAddr != next || r.UserAddr != r.GuestAddr+UserOffset || r.MmapOffset != r.GuestAddr-(1<<30) || r.Size%4096 != 0 || r.File != m.File() {
			t.Fatalf("region %d: %+v", i, r.MemRegion)
		}
		next += r.Size
		size += r.Size
	}
	if size != m.Size() {
		t.Fatalf("regions cover %d of %d bytes", size, m.Size())
	}
	if _, err := m.Bytes(1<<30+m.Size()-1, 2); err == nil {
		t.Fatal("range past the end accepted")
	}
	if _, err := m.Bytes(0, 1); err == nil {
		t.Fatal("range below the base accepted")
	}
	if _, err := NewMemory(123, 4096); err == nil {
		t.Fatal("unaligned base accepted")
	}
}

// device maps the guest's memfd and serves ring r with virtq, in process.
func device(t *testing.T, m *Memory, r *Ring) *virtq.Queue {
	t.Helper()
	gm, err := guestmem.Map([]guestmem.Region{{GuestAddr: guestmem.Addr(m.Base()), Size: m.Size(), UserAddr: m.UserAddr(m.Base()), File: m.File()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gm.Close() })
	d, a, u := r.Addrs()
	q, err := virtq.NewQueue(gm, virtq.Config{Size: r.Size(), DescTable: guestmem.Addr(d), AvailRing: guestmem.Addr(a), UsedRing: guestmem.Addr(u), EventIdx: r.opt.EventIdx, Indirect: r.opt.Indirect})
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// TestRingAgainstVirtq drives the driver ring against the device-side
// virtq implementation on the same shared memory.
func TestRingAgainstVirtq(t *testing.T) {
	for _, opt := range []RingOptions{
		{Size: 8},
		{Size: 8, Indirect: true},
		{Size: 8, EventIdx: true},
		{Size: 1},
		{Size: 256, EventIdx: true, Indirect: true},
	} {
		t.Run(fmt.Sprintf("%+v", opt), func(t *testing.T) {
			m := newMem(t, 0, 1<<20)
			r, err := NewRing(m, 0, opt)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			q := device(t, m, r)
			var c virtq.Chain
			for round := 0; round < 3*int(opt.Size)+5; round++ {
				msg := fmt.Sprintf("round %d", round)
				in, _ := m.Alloc(uint64(len(msg)), 1)
				out, _ := m.Alloc(64, 1)
				b, _ := m.Bytes(in, uint64(len(msg)))
				copy(b, msg)
				segs := []Segment{{Addr: in, Len: uint32(len(msg))}, {Addr: out, Len: 64, Writable: true}}
				if opt.Size == 1 && !opt.Indirect {
					segs = segs[:1]
				}
				head, err := r.Post(segs, round)
				if err != nil {
					t.Fatal(err)
				}
				ok, err := q.Pop(&c)
				if err != nil || !ok || c.Head != head {
					t.Fatalf("pop: %v %v head %d want %d", ok, err, c.Head, head)
				}
				got := make([]byte, c.ReadableLen())
				c.ReadFull(got)
				if string(got) != msg || c.WritableLen() != uint64(len(segs)-1)*64 {
					t.Fatalf("device saw %q, %d writable", got, c.WritableLen())
				}
				c.Write([]byte("ok"))
				if err := q.Push(c.Head, c.Written()); err != nil {
					t.Fatal(err)
				}
				done := r.Reap()
				if len(done) != 1 || done[0].Token != round || done[0].Head != head || done[0].Len != c.Written() {
					t.Fatalf("reap %+v", done)
				}
				m.Free(in)
				m.Free(out)
			}
			if r.Free() != int(opt.Size) {
				t.Fatalf("%d descriptors free after all completions, want %d", r.Free(), opt.Size)
			}
		})
	}
}

func TestRingFullAndOutOfOrder(t *testing.T) {
	m := newMem(t, 0, 1<<20)
	r, err := NewRing(m, 0, RingOptions{Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	q := device(t, m, r)
	seg := func(w bool) Segment { return Segment{Addr: 0x8000, Len: 8, Writable: w} }
	if _, err := r.Post([]Segment{seg(false), seg(true)}, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Post([]Segment{seg(false), seg(true)}, "b"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Post([]Segment{seg(false)}, "c"); !errors.Is(err, ErrRingFull) {
		t.Fatalf("post on a full ring: %v", err)
	}
	if _, err := r.Post(nil, "d"); err == nil {
		t.Fatal("empty chain accepted")
	}
	var c1, c2 virtq.Chain
	q.Pop(&c1)
	q.Pop(&c2)
	// Complete out of order.
	q.Push(c2.Head, 2)
	q.Push(c1.Head, 1)
	done := r.Reap()
	if len(done) != 2 || done[0].Token != "b" || done[1].Token != "a" {
		t.Fatalf("reap %+v", done)
	}
	// Freed descriptors are reusable: two more 2-descriptor chains fit.
	for _, tok := range []string{"e", "f"} {
		if _, err := r.Post([]Segment{seg(false), seg(true)}, tok); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []string{"e", "f"} {
		var c virtq.Chain
		if ok, err := q.Pop(&c); !ok || err != nil || c.ReadableLen() != 8 || c.WritableLen() != 8 {
			t.Fatalf("pop %s: %v %v", want, ok, err)
		}
		q.Push(c.Head, 0)
	}
	if done := r.Reap(); len(done) != 2 || done[0].Token != "e" || done[1].Token != "f" {
		t.Fatalf("reap %+v", done)
	}
}

func TestKickSuppression(t *testing.T) {
	for _, eventIdx := range []bool{false, true} {
		t.Run(fmt.Sprintf("event idx %v", eventIdx), func(t *testing.T) {
			m := newMem(t, 0, 1<<20)
			r, err := NewRing(m, 0, RingOptions{Size: 16, EventIdx: eventIdx})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			q := device(t, m, r)
			post := func() {
				if _, err := r.Post([]Segment{{Addr: 0x8000, Len: 8}}, nil); err != nil {
					t.Fatal(err)
				}
			}
			post()
			if sent, _ := r.Kick(); !sent {
				t.Fatal("first kick suppressed")
			}
			// The device is busy: notifications off.
			q.DisableNotification()
			var c virtq.Chain
			q.Pop(&c)
			if !eventIdx {
				post()
				if sent, _ := r.Kick(); sent {
					t.Fatal("kick sent while the device disabled notifications")
				}
				q.Pop(&c)
			}
			if more := q.EnableNotification(); more {
				t.Fatal("device sees more work than posted")
			}
			post()
			if sent, _ := r.Kick(); !sent {
				t.Fatal("kick suppressed after the device re-enabled notifications")
			}
			post()
			if sent, _ := r.Kick(); sent && eventIdx {
				t.Fatal("second kick sent although avail_event was passed already")
			}
			if r.Kicks() == 0 {
				t.Fatal("kick counter not counting")
			}
		})
	}
}

func TestWaitPollingAndCancel(t *testing.T) {
	m := newMem(t, 0, 1<<20)
	for _, poll := range []bool{false, true} {
		r, err := NewRing(m, 0, RingOptions{Size: 4, PollCall: poll})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
		if _, err := r.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("poll %v: wait with nothing in flight: %v", poll, err)
		}
		cancel()
		r.Close()
	}
}

func TestWaitEndsOnHangup(t *testing.T) {
	for _, poll := range []bool{false, true} {
		m := newMem(t, 0, 1<<20)
		r, err := NewRing(m, 0, RingOptions{Size: 4, PollCall: poll})
		if err != nil {
			t.Fatal(err)
		}
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		backend := os.NewFile(uintptr(fds[1]), "back-end")
		c, err := frontend.NewFromFile(os.NewFile(uintptr(fds[0]), "front-end"))
		if err != nil {
			t.Fatal(err)
		}
		g := &Guest{Client: c, Mem: m, Rings: []*Ring{r}}
		g.watchHangup(c)

		// Alive: the wait runs to its context's end across several looks.
		ctx, cancel := context.WithTimeout(context.Background(), 3*hangupEvery)
		if _, err := r.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("poll %v: wait on a live back-end: %v", poll, err)
		}
		cancel()
		// Gone while waiting: the wait ends after a look or two, long
		// before its context (10 s).
		time.AfterFunc(20*time.Millisecond, func() { backend.Close() })
		ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
		start := time.Now()
		_, err = r.Wait(ctx)
		cancel()
		if !errors.Is(err, ErrBackendGone) {
			t.Fatalf("poll %v: wait after a hang-up: %v", poll, err)
		}
		if d := time.Since(start); d > 2*time.Second { // a look every hangupEvery; the slack is for a loaded machine
			t.Errorf("poll %v: the hang-up was noticed after %v", poll, d)
		}
		// A later wait fails at once, and Close stops the (ended) watcher.
		if _, err := r.Wait(context.Background()); !errors.Is(err, ErrBackendGone) {
			t.Fatalf("poll %v: second wait: %v", poll, err)
		}
		g.unwatch()
		c.Close()
		r.Close()
	}
}

func TestWatcherStopsWithoutHangup(t *testing.T) {
	m := newMem(t, 0, 1<<20)
	r, err := NewRing(m, 0, RingOptions{Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	backend := os.NewFile(uintptr(fds[1]), "back-end")
	defer backend.Close()
	c, err := frontend.NewFromFile(os.NewFile(uintptr(fds[0]), "front-end"))
	if err != nil {
		t.Fatal(err)
	}
	g := &Guest{Client: c, Mem: m, Rings: []*Ring{r}}
	g.watchHangup(c)
	// Our own close (Close, Reconnect) is no hang-up of the back-end:
	// the watcher is stopped first and the ring stays usable.
	g.unwatch()
	c.Close()
	time.Sleep(2 * hangupEvery)
	if r.gone.Load() {
		t.Fatal("ring marked gone after the guest closed its own side")
	}
}

func TestSocketHungUp(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	peer := os.NewFile(uintptr(fds[1]), "peer")
	f := os.NewFile(uintptr(fds[0]), "ours")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	if socketHungUp(uc) {
		t.Fatal("hung up while the peer is open")
	}
	if _, err := peer.Write([]byte("reply")); err != nil {
		t.Fatal(err)
	}
	if socketHungUp(uc) {
		t.Fatal("hung up with a reply waiting and the peer open")
	}
	peer.Close()
	if !socketHungUp(uc) {
		t.Fatal("not hung up after the peer closed")
	}
	uc.Close()
	if !socketHungUp(uc) {
		t.Fatal("not hung up after our side closed")
	}
}
