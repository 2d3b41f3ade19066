package backend

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/krun-core/krun-core/virtq"
)

// QueueStats are the counters of one ring, cumulative over the life of the
// Server (across reconnects).
type QueueStats struct {
	Index int
	// Requests is the number of chains completed by Vring.Run or counted
	// by the device (Vring.CountRequests).
	Requests uint64
	// Malformed counts malformed chains and requests a handler rejected.
	Malformed uint64
	// Notifications counts call eventfd signals.
	Notifications uint64
	// Kicks counts kick eventfd wake-ups seen by WaitKick.
	Kicks uint64
	// Failures counts ring workers that failed (fault, panic, broken ring).
	Failures uint64
	// Running reports whether a worker is serving the ring now.
	Running bool
}

type counters struct {
	requests      atomic.Uint64
	malformed     atomic.Uint64
	notifications atomic.Uint64
	kicks         atomic.Uint64
	failures      atomic.Uint64
	running       atomic.Bool
}

func (c *counters) snapshot(idx int) QueueStats {
	return QueueStats{
		Index:         idx,
		Requests:      c.requests.Load(),
		Malformed:     c.malformed.Load(),
		Notifications: c.notifications.Load(),
		Kicks:         c.kicks.Load(),
		Failures:      c.failures.Load(),
		Running:       c.running.Load(),
	}
}

// fileSlot holds an eventfd that the control loop may replace while a
// worker uses it.
type fileSlot struct{ p atomic.Pointer[os.File] }

func (s *fileSlot) swap(f *os.File) {
	if old := s.p.Swap(f); old != nil {
		old.Close()
	}
}

// PollInterval is how long WaitKick sleeps on a ring without a kick
// descriptor (the front-end asked for polling).
const PollInterval = 200 * time.Microsecond

// Vring is a started ring as a device sees it: the queue, its kick and call
// eventfds and its counters. It is valid until the ServeQueue call it was
// passed to returns. Only the serving goroutine may use Queue.
type Vring struct {
	index int
	q     *virtq.Queue
	kick  *os.File // non-blocking, in Go's poller; nil: polling
	call  *fileSlot
	stats *counters
	log   hclog.Logger

	loggedMalformed bool
}

// Index is the ring's index.
func (v *Vring) Index() int { return v.index }

// Queue is the device side of the ring.
func (v *Vring) Queue() *virtq.Queue { return v.q }

// CountRequests adds n to the ring's request counter (for devices that do
// not use Run).
func (v *Vring) CountRequests(n uint64) { v.stats.requests.Add(n) }

// CountMalformed counts one malformed request and logs the first of this
// ring start.
func (v *Vring) CountMalformed(err error) {
	v.stats.malformed.Add(1)
	if !v.loggedMalformed {
		v.loggedMalformed = true
		v.log.Warn("malformed request (further ones on this ring are only counted)", "queue", v.index, "error", err)
	}
}

var longAgo = time.Unix(1, 0)

// WaitKick blocks until the driver kicks the ring or ctx is cancelled (then
// it returns ctx.Err()). On a polling ring it waits PollInterval.
func (v *Vring) WaitKick(ctx context.Context) error {
	if v.kick == nil {
		t := time.NewTimer(PollInterval)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return nil
		}
	}
	var buf [8]byte
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := v.kick.SetReadDeadline(time.Time{}); err != nil {
			return fmt.Errorf("queue %d kick: %w", v.index, err)
		}
		stop := context.AfterFunc(ctx, func() { v.kick.SetReadDeadline(longAgo) })
		_, err := v.kick.Read(buf[:])
		stop()
		switch {
		case err == nil:
			v.stats.kicks.Add(1)
			return nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			continue // cancelled (checked above) or a stale wake-up
		default:
			return fmt.Errorf("queue %d: read kick eventfd: %w", v.index, err)
		}
	}
}

// Notify signals the call eventfd if the driver wants an interrupt for the
// used elements published since the last call (q.NeedsNotify).
func (v *Vring) Notify() error {
	if !v.q.NeedsNotify() {
		return nil
	}
	return v.Signal()
}

// Signal writes the call eventfd unconditionally. Without a call
// descriptor (the driver polls) it does nothing.
func (v *Vring) Signal() error {
	f := v.call.p.Load()
	if f == nil {
		return nil
	}
	v.stats.notifications.Add(1)
	if err := writeEventfd(f); err != nil {
		return fmt.Errorf("queue %d: write call eventfd: %w", v.index, err)
	}
	return nil
}

// usedBatch is how many used elements Run adds before publishing them.
const usedBatch = 64

// Run serves the ring synchronously until ctx is cancelled: it pops every
// available chain, passes it to handle, completes it with the number of
// bytes handle reports written, publishes and notifies, then re-enables
// kicks and waits. Kicks are disabled while it is busy.
//
// A malformed chain is completed with 0 bytes and counted; an error from
// handle is counted the same way (the chain is still completed with the
// bytes handle reports). Run returns nil when ctx is cancelled, and an error
// only when the ring itself is unusable (virtq.ErrQueueBroken, eventfd
// failure).
func (v *Vring) Run(ctx context.Context, handle func(*virtq.Chain) (written uint32, err error)) error {
	var c virtq.Chain
	q := v.q
	for {
		q.DisableNotification()
		n := 0
		for ctx.Err() == nil {
			ok, err := q.Pop(&c)
			if err != nil {
				if !errors.Is(err, virtq.ErrMalformedChain) {
					q.PublishUsed()
					v.Notify()
					return fmt.Errorf("queue %d: %w", v.index, err)
				}
				v.CountMalformed(err)
				if err := q.AddUsed(c.Head, 0); err != nil {
					return fmt.Errorf("queue %d: %w", v.index, err)
				}
			} else if !ok {
				break
			} else {
				written, herr := handle(&c)
				v.stats.requests.Add(1)
				if herr != nil {
					v.CountMalformed(herr)
				}
				if err := q.AddUsed(c.Head, written); err != nil {
					return fmt.Errorf("queue %d: %w", v.index, err)
				}
			}
			if n++; n%usedBatch == 0 {
				q.PublishUsed()
				if err := v.Notify(); err != nil {
					return err
				}
			}
		}
		q.PublishUsed()
		if err := v.Notify(); err != nil {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
		if q.EnableNotification() {
			continue
		}
		if err := v.WaitKick(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}
