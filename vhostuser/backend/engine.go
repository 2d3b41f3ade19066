package backend

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/ratelog"
	"github.com/krun-core/krun-core/virtq"
)

// The ring engine: one per running ring, the only code that touches a
// virtqueue.
//
// One goroutine per ring (the ring goroutine) waits for kicks, takes chains
// and either handles them itself or passes them to a pool of workers over a
// channel. It waits on the kick eventfd through Go's poller (the goroutine
// parks; no thread is held) and is woken for a stop by a read deadline set
// once when the ring's context ends, so a wait costs no allocation. The
// queue's pop side belongs to the ring goroutine; its push side (used
// elements, notification) is shared under mu by whoever completes a
// request: the ring goroutine, a worker, or a goroutine of the device.
//
// Notifications are batched: while the ring goroutine is taking chains
// (a round), completions only add used elements, and the round ends with
// one publication of the used index and at most one interrupt, as the
// driver's EVENT_IDX or NO_INTERRUPT asks. A completion that comes while
// the ring goroutine waits publishes at once.
//
// Requests come from a pool that grows to the most requests in flight and
// is reused, so neither a request nor a kick allocates. Every access to
// guest memory (popping, handling, completing, publishing) runs with faults
// caught: a truncated memfd fails the ring, not the process.

// PollInterval is how long a ring without a kick descriptor (the front-end
// asked for polling) sleeps between looks at its available ring.
const PollInterval = 200 * time.Microsecond

// roundBatch is how many chains a round takes between publications of the
// used index.
const roundBatch = 64

// stopWarning is how long a stopping ring waits for its requests before it
// logs that it is slow to stop (it keeps waiting).
const stopWarning = 5 * time.Second

var longAgo = time.Unix(1, 0)

// ringConfig is a running ring as the session hands it to the engine.
type ringConfig struct {
	index int
	q     *virtq.Queue
	kick  *os.File // non-blocking, in Go's poller; nil: polling
	call  *fileSlot
	stats *counters
	log   hclog.Logger
	// track is the ring's part of the inflight region (nil: no
	// tracking), resubmit the heads a previous back-end took and did
	// not complete, in order: served before any new chain and consumed
	// as they are taken.
	track    *tracker
	resubmit *[]uint16
	// hook, for tests of crash recovery only, runs at named points of
	// the tracking sequence (Server.testHook).
	hook func(point string)
	// malformedLog spaces the warnings about a ring's first malformed
	// request across rings and resets (nil: one per ring).
	malformedLog *ratelog.Limiter
}

// request states
const (
	reqFree uint32 = iota
	reqTaken
)

type engine struct {
	ringConfig
	handler  Handler
	inliner  Inliner // handler's, if it implements it
	offload  Offloader
	drainer  Drainer
	producer Producer
	workers  int
	max      int // requests in flight at most

	ctx    context.Context // done when the ring stops or fails
	cancel context.CancelFunc
	work   chan *Request // to the workers; capacity max, so sends never block
	wake   chan struct{} // a request came back while the ring goroutine waited
	wg     sync.WaitGroup
	busy   atomic.Int32 // requests handed to workers whose Handle has not returned
	timer  *time.Timer  // polling rings
	// stopLeft is how many more chains the ring takes once told to stop:
	// those available at that moment (at most the queue size), so what
	// the driver sent before the stop is served. -1 until the stop.
	stopLeft int

	kickBuf         [8]byte
	loggedMalformed atomic.Bool
	loggedOverclaim atomic.Bool // a device's Complete past the writable bytes
	loggedLong      atomic.Bool
	held            *Request // got and not yet taken (ring goroutine only)
	// taken is a request taken and not yet handed to the handler or a
	// worker (ring goroutine only): dispatch reads guest memory (the
	// ring's pending chains, an Inliner's look at the request), and a
	// fault there must not leave finish waiting for it.
	taken *Request

	mu          sync.Mutex
	free        *Request   // free list
	all         []*Request // every request made
	inFlight    int        // handed out by get and not completed (or given back)
	batching    bool       // the ring goroutine publishes at the end of its round
	unpublished int        // used elements added and not published
	waiting     bool       // the ring goroutine waits on wake
	failed      error

	// workerDone: some of the unpublished elements were completed by
	// workers during the round (set and cleared under mu).
	workerDone atomic.Bool
	// serving: the ring goroutine is handling a request itself during a
	// round, for as long as that takes (a write served inline may wait
	// for a lock); a worker's completion meanwhile is published at once.
	serving atomic.Bool

	// Long requests (the handler's Offload says so) on workers: at most
	// workers-1 at once (longBusy), so that one worker is always left
	// for the others; the rest wait in longQ, in the ring's order, for a
	// worker that ends a long one (startLong, nextLong).
	longMu   sync.Mutex
	longBusy int
	longQ    []*Request
}

func newEngine(rc ringConfig, qc QueueConfig) (*engine, error) {
	if (qc.Handler == nil) == (qc.Producer == nil) {
		return nil, errors.New("queue config needs exactly one of Handler and Producer")
	}
	if qc.Workers < 0 || qc.Workers > 1024 {
		return nil, fmt.Errorf("queue config: %d workers, want 0..1024", qc.Workers)
	}
	if qc.MaxInFlight < 0 {
		return nil, fmt.Errorf("queue config: MaxInFlight %d", qc.MaxInFlight)
	}
	if rc.log == nil {
		rc.log = hclog.NewNullLogger()
	}
	e := &engine{ringConfig: rc, handler: qc.Handler, producer: qc.Producer, workers: qc.Workers, stopLeft: -1}
	e.inliner, _ = qc.Handler.(Inliner)
	e.offload, _ = qc.Handler.(Offloader)
	e.max = int(rc.q.Size())
	if qc.MaxInFlight > 0 && qc.MaxInFlight < e.max {
		e.max = qc.MaxInFlight
	}
	if d, ok := qc.Handler.(Drainer); ok {
		e.drainer = d
	}
	e.all = make([]*Request, 0, min(e.max, 64))
	e.wake = make(chan struct{}, 1)
	return e, nil
}

// run serves the ring until ctx is done (it returns nil) or the ring fails
// (it returns why, after calling cancel, which must end ctx). When it
// returns, every request it took has been completed and no goroutine of the
// ring touches guest memory any more.
func (e *engine) run(ctx context.Context, cancel context.CancelFunc) error {
	e.ctx, e.cancel = ctx, cancel
	if e.kick != nil {
		if err := e.kick.SetReadDeadline(time.Time{}); err != nil {
			return fmt.Errorf("queue %d kick: %w", e.index, err)
		}
		fired := make(chan struct{})
		stop := context.AfterFunc(e.ctx, func() {
			defer close(fired)
			e.kick.SetReadDeadline(longAgo)
		})
		defer func() {
			if !stop() {
				<-fired // a later start must not find its deadline moved
			}
		}()
	} else {
		e.timer = time.NewTimer(PollInterval)
		defer e.timer.Stop()
	}
	if e.handler != nil && e.workers > 1 {
		e.work = make(chan *Request, e.max)
		for i := range e.workers {
			e.wg.Add(1)
			go e.worker(i + 1)
		}
	}

	var err error
	if e.producer != nil {
		e.batching = true // a producer publishes with Buffers.Publish
		b := &Buffers{e: e}
		err = Protect(func() error { return e.producer.Produce(e.ctx, b) })
		if err == nil && e.ctx.Err() == nil {
			// Returned while the ring runs: the ring takes no more
			// buffers, which is a failure, and one with a name (the
			// session would otherwise report it with a nil error).
			err = fmt.Errorf("queue %d: %w", e.index, ErrProducerReturned)
		}
	} else {
		err = Protect(e.serve)
	}
	if err != nil {
		e.fail(err)
	}
	e.finish()
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.failed
}

// ErrProducerReturned fails a ring whose Producer returned nil while the
// ring was running: Produce returns nil only once its ctx is done.
var ErrProducerReturned = errors.New("the device's Producer returned before the ring stopped (Produce returns nil only once its context is done)")

// fail records the first error that fails the ring and stops it (the
// device's context for the ring ends too).
func (e *engine) fail(err error) {
	e.mu.Lock()
	if e.failed == nil {
		e.failed = err
	}
	e.mu.Unlock()
	e.cancel()
}

// serve is the ring goroutine's loop for a Handler.
func (e *engine) serve() error {
	q := e.q
	for {
		e.mu.Lock()
		e.batching = true
		e.mu.Unlock()
		q.DisableNotification()
		starved := false
		for n := 1; ; n++ {
			if e.stopLeft < 0 && e.ctx.Err() != nil {
				e.stopLeft = e.pending()
			}
			if e.stopLeft == 0 {
				break
			}
			if n%roundBatch == 0 {
				// A long round still lets the driver see progress.
				if err := e.publish(); err != nil {
					return err
				}
			}
			req := e.get()
			if req == nil {
				starved = true
				break
			}
			ok, err := e.pop(req)
			if err != nil && !errors.Is(err, virtq.ErrMalformedChain) {
				e.put(req)
				e.failRound()
				return fmt.Errorf("queue %d: %w", e.index, err)
			}
			if !ok && err == nil {
				e.put(req)
				if e.stopLeft > 0 {
					e.stopLeft = 0 // (a driver that moved its index back)
				}
				break
			}
			if e.stopLeft > 0 {
				e.stopLeft--
			}
			if err := e.take(req); err != nil {
				e.failRound()
				return err
			}
			if err != nil {
				// Malformed: completed with nothing written, counted,
				// never shown to the device.
				e.countMalformed(err)
				req.malformed = true
				req.Complete(0)
				continue
			}
			e.taken = req
			if n := req.chain.Buffers(); n > int(q.Size()) && e.loggedLong.CompareAndSwap(false, true) {
				// Once per ring: what a device's configuration allows
				// (virtio-blk's seg_max) on a smaller ring.
				e.log.Debug("chain longer than the ring, as the device allows", "queue", e.index, "buffers", n, "ring", q.Size())
			}
			if err := e.dispatch(req); err != nil {
				e.failRound()
				return err
			}
		}
		if e.drainer != nil && !starved {
			e.drainer.Drained()
		}
		if err := e.endRound(); err != nil {
			return err
		}
		if e.stopLeft < 0 && e.ctx.Err() != nil {
			e.stopLeft = e.pending()
		}
		switch {
		case e.stopLeft == 0:
			return nil
		case starved:
			e.waitFree()
		case e.stopLeft > 0:
			// Stopping: serve what was available at the stop.
		case q.EnableNotification():
			// The driver added chains while kicks were off.
		default:
			if err := e.waitKick(); err != nil {
				return err
			}
		}
	}
}

// pending is how many chains the ring can take now: those the driver made
// available and the heads left to resubmit.
func (e *engine) pending() int {
	p, _ := e.q.Pending()
	n := int(p)
	if e.resubmit != nil {
		n += len(*e.resubmit)
	}
	return n
}

// pop fills req with the next chain: the next head to resubmit, else the
// next available chain (as virtq.Queue.Pop reports it).
func (e *engine) pop(req *Request) (bool, error) {
	if e.resubmit != nil && len(*e.resubmit) > 0 {
		head := (*e.resubmit)[0]
		*e.resubmit = (*e.resubmit)[1:]
		req.resubmitted = true
		e.stats.resubmitted.Add(1)
		return true, e.q.PopHead(head, &req.chain)
	}
	req.resubmitted = false
	return e.q.Pop(&req.chain)
}

// dispatch hands a taken request to the handler: on this goroutine when
// there are no workers, when it is alone on an idle ring (no hand-off at
// queue depth 1) and the handler's Offload does not take it for a long
// one, or when the handler's Inline asks for it and Offload does not;
// otherwise to a worker (a long request perhaps only once another long one
// ended: startLong). An error (publishing failed) fails the ring; req was
// dropped.
func (e *engine) dispatch(req *Request) error {
	// The choice reads guest memory (the pending chains, an Inliner's
	// look at the request): req stays e.taken until it is made.
	long := e.work != nil && e.offload != nil && e.offload.Offload(req)
	here := e.work == nil ||
		(!long && e.busy.Load() == 0 && e.pending() == 0) ||
		(e.inliner != nil && e.inliner.Inline(req) && !long)
	e.taken = nil
	req.long = long
	switch {
	case e.work == nil:
		req.worker = 0
		e.handle(req)
		return nil
	case here:
		return e.handleHere(req)
	}
	e.busy.Add(1)
	if long && !e.startLong(req) {
		return nil // a worker that ends a long request takes it
	}
	e.work <- req
	return nil
}

// startLong counts long request req as on a worker and reports true while
// fewer than workers-1 are; otherwise it queues req for the first worker
// that ends a long request (nextLong) and reports false. A guest that
// discards a large disk sends many long requests at once: with each
// worker serving one, its reads waited in the workers' queue until a long
// request ended (found in review, helper-134).
func (e *engine) startLong(req *Request) bool {
	e.longMu.Lock()
	defer e.longMu.Unlock()
	if e.longBusy < e.workers-1 {
		e.longBusy++
		return true
	}
	e.longQ = append(e.longQ, req)
	return false
}

// nextLong is called by a worker that ended a long request: it returns
// the next queued long request for the worker to serve, or nil, and then
// the worker no longer counts as serving a long request. A queued request
// therefore always has workers-1 workers that will look for it.
func (e *engine) nextLong() *Request {
	e.longMu.Lock()
	defer e.longMu.Unlock()
	if len(e.longQ) == 0 {
		e.longBusy--
		return nil
	}
	r := e.longQ[0]
	e.longQ[0] = nil
	e.longQ = e.longQ[1:]
	return r
}

// handleHere serves req on the ring goroutine while the ring has workers.
// What workers completed earlier in the round is published first, and
// what they complete while req is served is published at once (serving),
// so a long request served here does not hold their answers back until
// the round ends.
func (e *engine) handleHere(req *Request) error {
	// serving before the look at workerDone (complete does the
	// opposite): a worker's completion is then either published by the
	// worker or seen here, and publish waits for mu, so for it.
	e.serving.Store(true)
	defer e.serving.Store(false)
	if e.workerDone.Load() {
		if err := e.publish(); err != nil {
			e.drop(req)
			return fmt.Errorf("queue %d: %w", e.index, err)
		}
	}
	req.worker = 0
	e.handle(req)
	return nil
}

func (e *engine) worker(id int) {
	defer e.wg.Done()
	for req := range e.work {
		long := req.long // req is not ours once completed
		for req != nil {
			req.worker = id
			e.handle(req)
			e.busy.Add(-1)
			req = nil
			if long {
				req = e.nextLong()
			}
		}
	}
}

// handle runs the handler on req with faults caught. A fault or panic
// fails the ring; the request is dropped (guest memory is unusable).
func (e *engine) handle(req *Request) {
	if err := e.protectHandle(req); err != nil {
		e.fail(fmt.Errorf("queue %d: %w", e.index, err))
		e.drop(req)
	}
}

func (e *engine) protectHandle(req *Request) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if p := recover(); p != nil {
			err = recovered(p)
		}
	}()
	e.handler.Handle(req)
	return nil
}

// get returns a free request, making one while fewer than max exist, or
// nil when all max are in flight. The request counts as in flight from
// here; until take or put it is also e.held, so that a fault in between
// (popping touches guest memory) does not leave the ring waiting for it.
// Ring goroutine only.
func (e *engine) get() *Request {
	e.mu.Lock()
	r := e.free
	switch {
	case r != nil:
		e.free = r.next
		r.next = nil
	case len(e.all) < e.max:
		r = &Request{e: e}
		e.all = append(e.all, r)
	default:
		e.mu.Unlock()
		return nil
	}
	e.inFlight++
	e.mu.Unlock()
	e.held = r
	return r
}

// put returns a request that get handed out and that was not taken.
func (e *engine) put(r *Request) {
	e.held = nil
	e.mu.Lock()
	e.release(r)
	e.mu.Unlock()
}

// freeLocked puts r on the free list and wakes the ring goroutine if it
// waits for one. Called with mu held.
func (e *engine) freeLocked(r *Request) {
	r.next = e.free
	e.free = r
	if e.waiting {
		e.waiting = false
		select {
		case e.wake <- struct{}{}:
		default:
		}
	}
}

// release ends a request in flight. Called with mu held.
func (e *engine) release(r *Request) {
	e.inFlight--
	e.freeLocked(r)
}

// take is where a chain becomes a request in flight: the one place a
// chain is taken from the ring. With inflight tracking its head is marked
// in the region before the device sees it (a resubmitted head keeps the
// mark, and the counter, of the back-end that took it first). The mark is
// made under mu: a head whose old mark a completion is still clearing
// (the driver reused it as soon as the used index moved) is marked after.
// The mark runs with faults caught: if the region faults (a front-end
// truncated the memfd it holds), the request goes back unused and the
// error fails the ring.
func (e *engine) take(r *Request) error {
	if e.track != nil && !r.resubmitted {
		e.mu.Lock()
		err := e.protect(func() { e.track.mark(r.chain.Head) })
		e.mu.Unlock()
		if err != nil {
			e.put(r)
			return fmt.Errorf("queue %d: mark a request in the inflight region: %w", e.index, err)
		}
	}
	e.held = nil
	r.malformed = false
	r.state.Store(reqTaken)
	return nil
}

// complete is where a request in flight is done: the one place a used
// element is added. The element is published now, unless the ring
// goroutine is in a round (it publishes at the end) or a producer runs
// the ring (it publishes with Buffers.Publish).
func (e *engine) complete(r *Request, written uint32) {
	e.mu.Lock()
	// With inflight tracking, pushLocked links the head into the last
	// batch and the publication clears it. A worker's completion in a
	// round is noted for the ring goroutine, and published at once while
	// it serves a request itself. workerDone is stored before serving is
	// loaded, as handleHere stores serving before it loads workerDone:
	// one of the two sees the other (a publication clears the note).
	worker := r.worker != 0 && e.batching
	if worker {
		e.workerDone.Store(true)
	}
	publish := !e.batching || worker && e.serving.Load()
	notify, err := e.pushLocked(r.chain.Head, written, publish)
	e.release(r)
	e.mu.Unlock()
	if err == nil && notify {
		err = e.signal()
	}
	if err != nil {
		e.fail(fmt.Errorf("queue %d: %w", e.index, err))
	}
}

// drop releases a request that cannot be completed (the ring failed while
// it was handled).
func (e *engine) drop(r *Request) {
	if r.state.CompareAndSwap(reqTaken, reqFree) {
		e.mu.Lock()
		e.release(r)
		e.mu.Unlock()
	}
}

// pushLocked adds a used element and, if publish is set, publishes every
// element added so far and reports whether the driver wants an interrupt.
// Faults on guest memory become errors. Called with mu held.
func (e *engine) pushLocked(head uint16, written uint32, publish bool) (notify bool, err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if p := recover(); p != nil {
			err = recovered(p)
		}
	}()
	if err := e.q.AddUsed(head, written); err != nil {
		return false, err
	}
	if e.track != nil {
		e.track.used(head)
		if e.hook != nil {
			e.hook("added")
		}
	}
	e.unpublished++
	if publish {
		return e.publishLocked(), nil
	}
	return false, nil
}

// publishLocked publishes the added used elements and reports whether the
// driver wants an interrupt. Called with mu held and faults caught.
func (e *engine) publishLocked() bool {
	return e.publishAddedLocked() && e.q.NeedsNotify()
}

// publishAddedLocked publishes the added used elements, if any, and says
// whether there were. Called with mu held and faults caught.
func (e *engine) publishAddedLocked() bool {
	if e.unpublished == 0 {
		return false
	}
	e.unpublished = 0
	e.workerDone.Store(false)
	e.q.PublishUsed()
	if e.track != nil {
		if e.hook != nil {
			e.hook("published")
		}
		e.track.published(e.q.NextUsed())
	}
	return true
}

// publish publishes what was added, with faults caught, and interrupts
// the driver if it asked for it.
func (e *engine) publish() error {
	e.mu.Lock()
	notify, err := e.protected(func() bool { return e.publishLocked() })
	e.mu.Unlock()
	if err == nil && notify {
		err = e.signal()
	}
	return err
}

// publishOnly publishes what was added without looking at interrupts.
func (e *engine) publishOnly() error {
	e.mu.Lock()
	err := e.protect(func() { e.publishAddedLocked() })
	e.mu.Unlock()
	return err
}

// notify interrupts the driver if it wants an interrupt for what was
// published since the last look.
func (e *engine) notify() error {
	e.mu.Lock()
	notify, err := e.protected(e.q.NeedsNotify)
	e.mu.Unlock()
	if err == nil && notify {
		err = e.signal()
	}
	return err
}

// protect runs fn (which touches guest memory or the inflight region)
// with faults caught.
func (e *engine) protect(fn func()) error {
	_, err := e.protected(func() bool { fn(); return false })
	return err
}

// protected runs fn (which touches guest memory) with faults caught.
func (e *engine) protected(fn func() bool) (v bool, err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if p := recover(); p != nil {
			err = recovered(p)
		}
	}()
	return fn(), nil
}

// failRound ends a round that a broken ring cut short: the handler's
// batched output goes out first (Drainer), as at every round's end, since
// the chains it came from are published as completed.
func (e *engine) failRound() {
	if e.drainer != nil {
		e.drainer.Drained()
	}
	e.endRound()
}

// endRound ends a round of the ring goroutine: completions publish on
// their own again, and what the round completed is published.
func (e *engine) endRound() error {
	e.mu.Lock()
	e.batching = e.producer != nil
	e.mu.Unlock()
	return e.publish()
}

// signal writes the call eventfd.
func (e *engine) signal() error {
	ok, err := e.call.signal()
	if ok {
		e.stats.notifications.Add(1)
	}
	if err != nil {
		return fmt.Errorf("write call eventfd: %w", err)
	}
	return nil
}

func (e *engine) countMalformed(err error) {
	e.stats.malformed.Add(1)
	if e.loggedMalformed.CompareAndSwap(false, true) {
		const msg = "malformed request (further ones on this ring are only counted)"
		if e.malformedLog != nil {
			e.malformedLog.Warn(e.log, msg, "queue", e.index, "error", err)
		} else {
			e.log.Warn(msg, "queue", e.index, "error", err)
		}
	}
}

// waitKick blocks until the driver kicks the ring (or, when polling, for
// PollInterval) or the ring stops; it returns nil in both cases.
func (e *engine) waitKick() error {
	if e.kick == nil {
		e.timer.Reset(PollInterval)
		select {
		case <-e.timer.C:
		case <-e.ctx.Done():
		}
		return nil
	}
	for {
		_, err := e.kick.Read(e.kickBuf[:])
		switch {
		case err == nil:
			e.stats.kicks.Add(1)
			return nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			if e.ctx.Err() != nil {
				return nil
			}
			// Not ours (the deadline is only set once ctx is done).
			if err := e.kick.SetReadDeadline(time.Time{}); err != nil {
				return fmt.Errorf("queue %d kick: %w", e.index, err)
			}
		default:
			return fmt.Errorf("queue %d: read kick eventfd: %w", e.index, err)
		}
	}
}

// waitFree blocks until a request comes back, or the ring is told to stop
// (while it serves its last chains it waits for requests in flight, which
// complete).
func (e *engine) waitFree() {
	e.mu.Lock()
	if e.free != nil || len(e.all) < e.max {
		e.mu.Unlock()
		return
	}
	e.waiting = true
	e.mu.Unlock()
	stop := e.ctx.Done()
	if e.stopLeft >= 0 {
		stop = nil
	}
	select {
	case <-e.wake:
	case <-stop:
	}
}

// finish ends the ring: it waits until every request taken is completed
// (the driver gets its answers, and GET_VRING_BASE then accounts for every
// chain taken), publishes, and stops the workers.
func (e *engine) finish() {
	if r := e.held; r != nil {
		// The ring goroutine failed between get and take.
		e.put(r)
	}
	if r := e.taken; r != nil {
		// It failed between take and the hand-off (a fault on guest
		// memory in dispatch): nobody else will complete it, and guest
		// memory is unusable, so it is dropped, as handle drops a
		// request whose handler faulted.
		e.taken = nil
		e.drop(r)
	}
	var warn *time.Timer
	for {
		e.mu.Lock()
		if e.inFlight == 0 {
			e.mu.Unlock()
			break
		}
		if e.producer != nil {
			// A producer that returned with requests still taken:
			// complete them empty, as nothing else will.
			e.mu.Unlock()
			e.completeLeftovers()
			continue
		}
		e.waiting = true
		e.mu.Unlock()
		if warn == nil {
			warn = time.NewTimer(stopWarning)
			defer warn.Stop()
		}
		select {
		case <-e.wake:
		case <-warn.C:
			e.log.Warn("queue is slow to stop: requests still in flight", "queue", e.index)
		}
	}
	e.mu.Lock()
	e.batching = false
	e.mu.Unlock()
	if err := e.publish(); err != nil {
		e.fail(fmt.Errorf("queue %d: %w", e.index, err))
	}
	if e.work != nil {
		close(e.work)
		e.wg.Wait()
	}
}

func (e *engine) completeLeftovers() {
	e.mu.Lock()
	var left []*Request
	for _, r := range e.all {
		if r.state.Load() == reqTaken {
			left = append(left, r)
		}
	}
	e.mu.Unlock()
	if len(left) > 0 {
		e.log.Warn("device left requests in flight when its ring stopped; completed empty", "queue", e.index, "requests", len(left))
	}
	for _, r := range left {
		r.Complete(0)
	}
}

// RunQueue serves q the way the back-end serves a running ring, for code
// that set up a queue itself (tests, embedders): kick is the driver's kick
// eventfd (nil: poll every PollInterval), call its call eventfd (nil:
// none); both are duplicated. It returns nil once ctx is done, or the error
// that failed the ring. Faults on guest memory are caught as in the
// back-end.
func RunQueue(ctx context.Context, q *virtq.Queue, kick, call *os.File, qc QueueConfig, log hclog.Logger) error {
	rc := ringConfig{q: q, call: &fileSlot{}, stats: &counters{}, log: log}
	if kick != nil {
		k, err := nonBlockingDup(kick)
		if err != nil {
			return fmt.Errorf("kick eventfd: %w", err)
		}
		defer k.Close()
		rc.kick = k
	}
	if call != nil {
		c, err := nonBlockingDup(call)
		if err != nil {
			return fmt.Errorf("call eventfd: %w", err)
		}
		rc.call.swap(c)
		defer rc.call.swap(nil)
	}
	e, err := newEngine(rc, qc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	return e.run(ctx, cancel)
}
