package fuseclient

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/krun-core/krun-core/testguest"
)

// Ring is a Transport over a virtqueue of a testguest.Guest: each request
// is copied into guest memory and posted as one chain (readable buffers,
// then the writable ones). Requests from several goroutines are in flight
// at the same time; a reaper goroutine hands completions back.
type Ring struct {
	mem   *testguest.Memory
	ring  *testguest.Ring
	split int
	// Timeout bounds one request; 0 means 30 s.
	Timeout time.Duration

	// sync: one request at a time, its caller waits on the ring itself
	// (NewSyncRing); syncMu holds the ring for it, and the fields below.
	sync   bool
	syncMu sync.Mutex
	done   []testguest.Completion
	// abandoned holds the buffers of requests that timed out, by head,
	// until the device completes them: it may still write the reply.
	abandoned map[uint16][]uint64

	once   sync.Once
	stop   context.CancelFunc
	reaped chan struct{}
	err    error // set before reaped is closed
}

// NewRing returns a transport on ring. split > 0 cuts requests and replies
// into descriptors of at most split bytes (a guest's scattered pages).
// Close stops it.
func NewRing(mem *testguest.Memory, ring *testguest.Ring, split int) *Ring {
	return &Ring{mem: mem, ring: ring, split: split}
}

// NewSyncRing returns a transport on ring that has one request in flight
// at a time and waits for its reply in the caller's goroutine, without a
// reaper: a round trip then costs no hand-off between goroutines, which a
// benchmark of a back-end's latency wants. Close stops nothing.
func NewSyncRing(mem *testguest.Memory, ring *testguest.Ring, split int) *Ring {
	return &Ring{mem: mem, ring: ring, split: split, sync: true}
}

func (r *Ring) start() {
	if r.sync {
		return
	}
	r.once.Do(func() {
		ctx, cancel := context.WithCancel(context.Background())
		r.stop = cancel
		r.reaped = make(chan struct{})
		go func() {
			defer close(r.reaped)
			for {
				done, err := r.ring.Wait(ctx)
				if err != nil {
					r.err = err
					return
				}
				for _, c := range done {
					if ch, ok := c.Token.(chan uint32); ok {
						ch <- c.Len
					}
				}
			}
		}()
	})
}

// Close stops the reaper.
func (r *Ring) Close() {
	if r.sync {
		return
	}
	r.start()
	r.stop()
	<-r.reaped
}

// RoundTrip implements Transport.
func (r *Ring) RoundTrip(req [][]byte, replyCap int) ([]byte, error) {
	r.start()
	total := 0
	for _, b := range req {
		total += len(b)
	}
	in, err := r.mem.Alloc(uint64(max(total, 1)), 64)
	if err != nil {
		return nil, err
	}
	// A request that timed out keeps its buffers: the device may still
	// read the request and write the reply. The sync transport frees
	// them when the device completes it; the reaper's leaks them.
	bufs := []uint64{in}
	keep := false
	defer func() {
		if !keep {
			for _, b := range bufs {
				r.mem.Free(b)
			}
		}
	}()
	inb, _ := r.mem.Bytes(in, uint64(total))
	// Scatter as finely as asked, but a chain may not be longer than its
	// ring (virtio 1.2, 2.7.5.3.1; devices refuse one that is).
	split := r.split
	for split > 0 && countSegs(req, replyCap, split) > int(r.ring.Size()) {
		split *= 2
	}
	var segs []testguest.Segment
	off := 0
	for _, b := range req {
		copy(inb[off:], b)
		segs = appendSegs(segs, in+uint64(off), len(b), split, false)
		off += len(b)
	}
	var out uint64
	if replyCap > 0 {
		out, err = r.mem.Alloc(uint64(replyCap), 64)
		if err != nil {
			return nil, err
		}
		bufs = append(bufs, out)
		segs = appendSegs(segs, out, replyCap, split, true)
	}
	if len(segs) == 0 {
		return nil, fmt.Errorf("empty request")
	}
	to := r.Timeout
	if to == 0 {
		to = 30 * time.Second
	}
	if r.sync {
		b, err := r.syncTrip(segs, bufs, out, replyCap, to)
		if errors.Is(err, errTimedOut) {
			keep = true
		}
		return b, err
	}
	deadline := time.NewTimer(to)
	defer deadline.Stop()
	ch := make(chan uint32, 1)
	for {
		_, err := r.ring.Post(segs, ch)
		if err == nil {
			break
		}
		if !errors.Is(err, testguest.ErrRingFull) {
			return nil, err
		}
		select {
		case <-deadline.C:
			return nil, fmt.Errorf("ring stayed full: %w", err)
		case <-time.After(50 * time.Microsecond):
		}
	}
	if _, err := r.ring.Kick(); err != nil {
		return nil, err
	}
	var n uint32
	select {
	case n = <-ch:
	case <-r.reaped:
		return nil, fmt.Errorf("wait for the reply: %w", r.err)
	case <-deadline.C:
		keep = true
		return nil, fmt.Errorf("no reply within %v", to)
	}
	return r.reply(out, replyCap, n)
}

// errTimedOut: the device did not complete a request in time.
var errTimedOut = errors.New("no reply in time")

// syncTrip posts segs and waits for their completion in this goroutine
// (NewSyncRing). bufs are the request's buffers: after a timeout the
// ring keeps them until the device completes the chain, and frees them
// then; such a late completion is skipped.
func (r *Ring) syncTrip(segs []testguest.Segment, bufs []uint64, out uint64, replyCap int, to time.Duration) ([]byte, error) {
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	head, err := r.ring.Post(segs, nil)
	if err != nil {
		return nil, err
	}
	if _, err := r.ring.Kick(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), to)
	defer cancel()
	for {
		r.done, err = r.ring.WaitInto(ctx, r.done)
		if errors.Is(err, context.DeadlineExceeded) {
			if r.abandoned == nil {
				r.abandoned = make(map[uint16][]uint64)
			}
			r.abandoned[head] = bufs
			return nil, fmt.Errorf("%w (%v)", errTimedOut, to)
		}
		if err != nil {
			return nil, fmt.Errorf("wait for the reply: %w", err)
		}
		var mine *testguest.Completion
		for i, c := range r.done {
			if late, ok := r.abandoned[c.Head]; ok && c.Head != head {
				delete(r.abandoned, c.Head)
				for _, b := range late {
					r.mem.Free(b)
				}
				continue
			}
			if c.Head != head || mine != nil {
				return nil, fmt.Errorf("device completed descriptor %d, want %d", c.Head, head)
			}
			mine = &r.done[i]
		}
		if mine != nil {
			return r.reply(out, replyCap, mine.Len)
		}
	}
}

// reply copies out the n bytes the device wrote into a reply buffer.
func (r *Ring) reply(out uint64, replyCap int, n uint32) ([]byte, error) {
	if int(n) > replyCap {
		return nil, fmt.Errorf("device reports %d bytes written into %d", n, replyCap)
	}
	if replyCap == 0 {
		return nil, nil
	}
	b, _ := r.mem.Bytes(out, uint64(n))
	return append([]byte(nil), b...), nil
}

// countSegs is how many descriptors appendSegs makes for a request.
func countSegs(req [][]byte, replyCap, split int) int {
	n := (replyCap + split - 1) / split
	for _, b := range req {
		n += (len(b) + split - 1) / split
	}
	return n
}

func appendSegs(segs []testguest.Segment, addr uint64, n, split int, w bool) []testguest.Segment {
	for n > 0 {
		k := n
		if split > 0 && k > split {
			k = split
		}
		segs = append(segs, testguest.Segment{Addr: addr, Len: uint32(k), Writable: w})
		addr += uint64(k)
		n -= k
	}
	return segs
}
