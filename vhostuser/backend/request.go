package backend

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/krun-core/krun-core/virtq"
)

// Request is one descriptor chain taken from a ring, in flight until the
// device completes it. Requests are pooled by the ring: after Complete the
// device must not touch it (or its chain's buffers) again.
type Request struct {
	chain     virtq.Chain
	e         *engine
	next      *Request // free list
	state     atomic.Uint32
	malformed bool // a malformed chain: not counted as a request
	// resubmitted: taken again from the inflight region (a previous
	// back-end took it), not from the available ring
	resubmitted bool
	worker      int // the goroutine that runs Handle: 0 the ring's, 1.. a worker's
	// long: the handler's Offload took it for a long request (see
	// engine.startLong); set by dispatch for every request it hands on.
	long bool
}

// Chain is the request's descriptor chain: its device-readable and
// device-writable bytes, with cursors (see virtq.Chain).
func (r *Request) Chain() *virtq.Chain { return &r.chain }

// Worker says which of the ring's goroutines runs Handle for the request:
// 0 for the ring goroutine, 1 to QueueConfig.Workers for the pool's. No
// two Handle calls with the same Worker run at once, so a device can keep
// scratch space per worker, indexed by it, without locking.
func (r *Request) Worker() int { return r.worker }

// Queue is the index of the ring the request came from.
func (r *Request) Queue() int { return r.e.index }

// Complete gives the chain back to the driver with written bytes in its
// device-writable buffers (the used element's length). It may be called
// from any goroutine, once: the request goes back to the ring's pool, so
// a second call may hit the next chain the pool handed it to (caught and
// logged only while the request is free).
//
// written past the chain's writable bytes is a device bug: the driver is
// told the writable length instead (virtio 1.2, 2.7.8.2: a driver that
// trusts the length would read past its buffers), and the first one on
// each ring is logged.
func (r *Request) Complete(written uint32) {
	if !r.state.CompareAndSwap(reqTaken, reqFree) {
		r.e.log.Error("device completed a request that is not in flight (completed twice?)", "queue", r.e.index)
		return
	}
	if !r.malformed {
		r.e.stats.requests.Add(1)
	}
	if max := r.chain.WritableLen(); uint64(written) > max {
		if r.e.loggedOverclaim.CompareAndSwap(false, true) {
			r.e.log.Error("device completed a request with more bytes written than its writable buffers hold; the driver is told the buffers' length (further ones on this ring are not logged)",
				"queue", r.e.index, "written", written, "writable", max)
		}
		written = uint32(max)
	}
	r.e.complete(r, written)
}

// Malformed counts the request as malformed (a guest driver bug or a
// hostile guest: the ring's Malformed counter; the first one of each ring
// start is logged). The device still completes it.
func (r *Request) Malformed(err error) { r.e.countMalformed(err) }

// Buffers is a Producer's access to its ring: it takes the chains the
// driver posted when it has something to put in them.
type Buffers struct{ e *engine }

// Take returns the next chain the driver made available as a request, or
// nil when there is none (or MaxInFlight requests are in flight). A
// malformed chain comes back with an error wrapping virtq.ErrMalformedChain
// (already counted): the caller completes it, with nothing written. Any
// other error means the ring is unusable; the producer returns it.
func (b *Buffers) Take() (*Request, error) {
	e := b.e
	r := e.get()
	if r == nil {
		return nil, nil
	}
	ok, err := e.pop(r)
	if err != nil && !errors.Is(err, virtq.ErrMalformedChain) {
		e.put(r)
		return nil, fmt.Errorf("queue %d: %w", e.index, err)
	}
	if !ok && err == nil {
		e.put(r)
		return nil, nil
	}
	if err := e.take(r); err != nil {
		return nil, err
	}
	if err != nil {
		e.countMalformed(err)
		r.malformed = true
		return r, err
	}
	return r, nil
}

// QueueSize is the ring's size: the entries of its descriptor table.
func (b *Buffers) QueueSize() int { return int(b.e.q.Size()) }

// Untake gives back requests taken and not completed, which must be the
// last ones taken: the driver sees nothing, and the next Take returns the
// same chains again. (A virtio-net device that took buffers for a frame
// that turns out not to fit gives them back rather than hold them while
// it waits for more.) The error, from an inflight region that faults (a
// front-end truncated it), means the ring is unusable; the producer
// returns it.
func (b *Buffers) Untake(reqs []*Request) error {
	e := b.e
	var popped uint16
	var again []uint16
	var fault error
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range reqs {
		if !r.state.CompareAndSwap(reqTaken, reqFree) {
			continue
		}
		if r.resubmitted {
			// Still marked: it goes back to the heads to resubmit,
			// which are taken before anything new.
			again = append(again, r.chain.Head)
			e.stats.resubmitted.Add(^uint64(0))
		} else {
			popped++
			if e.track != nil && fault == nil {
				fault = e.protect(func() { e.track.unmark(r.chain.Head) })
			}
		}
		e.release(r)
	}
	e.q.Unpop(popped)
	if len(again) > 0 {
		*e.resubmit = append(again, *e.resubmit...)
	}
	if fault != nil {
		return fmt.Errorf("queue %d: unmark a request in the inflight region: %w", e.index, fault)
	}
	return nil
}

// Publish makes the requests completed so far visible to the driver, at
// once (a virtio-net device publishes the buffers of one frame together).
// It does not interrupt the driver: see Notify.
func (b *Buffers) Publish() error {
	if err := b.e.publishOnly(); err != nil {
		return fmt.Errorf("queue %d: %w", b.e.index, err)
	}
	return nil
}

// Notify interrupts the driver if it asked to be for what was published
// since the last Notify (EVENT_IDX, or VRING_AVAIL_F_NO_INTERRUPT), so a
// producer can publish a burst piece by piece and interrupt once.
func (b *Buffers) Notify() error {
	if err := b.e.notify(); err != nil {
		return fmt.Errorf("queue %d: %w", b.e.index, err)
	}
	return nil
}

// Pending reports how many chains the driver has made available and the
// device has not taken, the ones a previous back-end left in flight
// (taken first) included.
func (b *Buffers) Pending() (int, error) {
	n, err := b.e.q.Pending()
	if err != nil {
		return 0, err
	}
	if b.e.resubmit != nil {
		return int(n) + len(*b.e.resubmit), nil
	}
	return int(n), nil
}

// EnableKicks asks the driver to kick when it makes chains available, and
// reports whether some were made available meanwhile (then take them
// instead of waiting).
func (b *Buffers) EnableKicks() bool { return b.e.q.EnableNotification() }

// DisableKicks tells the driver that kicks are not needed for now.
func (b *Buffers) DisableKicks() { b.e.q.DisableNotification() }

// EnableKicksForMore asks the driver to kick once it makes chains available
// beyond those available now: for a producer that found them too few.
// Chains added before the request was visible raise no kick, so look at
// the ring once more before WaitKick.
func (b *Buffers) EnableKicksForMore() { b.e.q.EnableNotificationForMore() }

// WaitKick blocks until the driver kicks the ring, or the ring stops (the
// producer's ctx is then done). It returns an error only when the kick
// eventfd fails.
func (b *Buffers) WaitKick() error { return b.e.waitKick() }
