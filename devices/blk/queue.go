package blk

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// A queue is served by one dispatcher goroutine (the ServeQueue goroutine,
// the only one that touches the ring) and a small pool of request
// goroutines, so that several requests of one queue can wait on the disk at
// once — what queue depth means to a real disk. Writes (OUT) go to one
// writer goroutine of their own instead: buffered writes to one file
// serialise on the file's inode lock anyway, and several threads contending
// for it are slower than one (measured: 1 MiB sequential writes lose a third
// of their throughput on 8 threads). A request that arrives alone on an idle
// queue is served inline by the dispatcher, so queue depth 1 pays no
// hand-off. Requests complete out of order, as virtio-blk allows.

// slot is one request in flight: its chain and its outcome.
type slot struct {
	c       virtq.Chain
	written uint32
	bad     error // malformed request (counted on the ring)
	fault   error // memory fault or panic while handling: the ring fails
}

// poolWorker is one request goroutine's state; run is its Protect body,
// bound once so that a request allocates nothing.
type poolWorker struct {
	w   *worker
	cur *slot
	run func() error
}

func (p *poolWorker) handle() error {
	s := p.cur
	s.written, s.bad = p.w.handleChain(&s.c)
	return nil
}

// serveConcurrent serves one queue with n requests in flight at most.
func (d *Device) serveConcurrent(ctx context.Context, vr *backend.Vring, n int) (err error) {
	q := vr.Queue()
	slots := make([]slot, n)
	free := make([]int, 0, n) // free slot indexes; dispatcher only
	for i := n - 1; i >= 0; i-- {
		free = append(free, i)
	}
	work := make(chan int, n)
	writes := make(chan int, n)
	done := make(chan int, n)
	var pool sync.WaitGroup
	for k := range n + 1 {
		p := &poolWorker{w: d.newWorker()}
		p.run = p.handle
		in := work
		if k == n {
			in = writes
		}
		pool.Add(1)
		go func() {
			defer pool.Done()
			for i := range in {
				p.cur = &slots[i]
				p.cur.fault = backend.Protect(p.run)
				done <- i
			}
		}()
	}

	// Kicks arrive on their own goroutine; the dispatcher waits for a kick
	// or a completion, whichever comes first.
	kicks := make(chan error, 1)
	kctx, kcancel := context.WithCancel(ctx)
	kdone := make(chan struct{})
	go func() {
		defer close(kdone)
		for {
			err := vr.WaitKick(kctx)
			if kctx.Err() != nil {
				return
			}
			select {
			case kicks <- err:
			default: // a wake-up is already pending
			}
			if err != nil {
				return
			}
		}
	}()
	// On every way out — including a fault unwinding this goroutine — no
	// request goroutine may still touch guest memory when ServeQueue
	// returns.
	defer func() {
		close(work)
		close(writes)
		pool.Wait()
		kcancel()
		<-kdone
	}()

	inflight := 0
	inline := d.newWorker()
	var pending int // used elements added but not yet published

	complete := func(i int) error {
		s := &slots[i]
		inflight--
		free = append(free, i)
		if s.fault != nil {
			return fmt.Errorf("queue %d: request failed: %w", vr.Index(), s.fault)
		}
		vr.CountRequests(1)
		if s.bad != nil {
			vr.CountMalformed(s.bad)
		}
		pending++
		return q.AddUsed(s.c.Head, s.written)
	}
	publish := func() error {
		if pending == 0 {
			return nil
		}
		pending = 0
		q.PublishUsed()
		return vr.Notify()
	}
	// drain completes every request still in flight, so that nothing the
	// dispatcher popped is lost when the ring stops.
	drain := func() error {
		var first error
		for inflight > 0 {
			if err := complete(<-done); err != nil && first == nil {
				first = err
			}
		}
		if err := publish(); err != nil && first == nil {
			first = err
		}
		return first
	}

	for {
		q.DisableNotification()
		for ctx.Err() == nil && len(free) > 0 {
			i := free[len(free)-1]
			s := &slots[i]
			ok, err := q.Pop(&s.c)
			if err != nil {
				if !errors.Is(err, virtq.ErrMalformedChain) {
					drain()
					return fmt.Errorf("queue %d: %w", vr.Index(), err)
				}
				vr.CountMalformed(err)
				if err := q.AddUsed(s.c.Head, 0); err != nil {
					drain()
					return fmt.Errorf("queue %d: %w", vr.Index(), err)
				}
				pending++
				continue
			}
			if !ok {
				break
			}
			if inflight == 0 {
				if more, _ := q.Pending(); more == 0 {
					// Alone on an idle queue: no hand-off.
					written, bad := inline.handleChain(&s.c)
					vr.CountRequests(1)
					if bad != nil {
						vr.CountMalformed(bad)
					}
					if err := q.AddUsed(s.c.Head, written); err != nil {
						return fmt.Errorf("queue %d: %w", vr.Index(), err)
					}
					pending++
					continue
				}
			}
			free = free[:len(free)-1]
			inflight++
			if isWrite(&s.c) {
				writes <- i
			} else {
				work <- i
			}
		}
		// Collect what finished meanwhile, then publish it all at once.
	harvest:
		for inflight > 0 {
			select {
			case i := <-done:
				if err := complete(i); err != nil {
					drain()
					return err
				}
			default:
				break harvest
			}
		}
		if err := publish(); err != nil {
			drain()
			return err
		}
		if ctx.Err() != nil {
			return drain()
		}
		if len(free) > 0 && q.EnableNotification() {
			continue // the driver added requests meanwhile
		}
		select {
		case i := <-done:
			if err := complete(i); err != nil {
				drain()
				return err
			}
		case err := <-kicks:
			if err != nil {
				drain()
				return err
			}
		case <-ctx.Done():
			return drain()
		}
	}
}

// isWrite peeks at a request's type: true for VIRTIO_BLK_T_OUT. A request
// too short to tell is not a write (the handler fails it).
func isWrite(c *virtq.Chain) bool {
	var t [4]byte
	var segs [4][]byte
	if c.ReadableLen() < HeaderSize {
		return false
	}
	rd := c.PeekReadable(segs[:0], 4)
	if segLen(rd) < 4 {
		return false
	}
	gather(t[:], rd, 0)
	return binary.LittleEndian.Uint32(t[:]) == TypeOut
}
