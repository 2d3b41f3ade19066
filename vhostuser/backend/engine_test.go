package backend_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// TestEngineModes runs batches of echo requests deeper than the ring
// through each way of serving a ring: in order on the ring goroutine, on a
// worker pool, with a small MaxInFlight (the ring waits for completions),
// and completed later from a goroutine of the device.
func TestEngineModes(t *testing.T) {
	tests := []struct {
		name                       string
		mode                       string
		workers, maxInFlight, size int
	}{
		{"inline", "echo", 0, 0, 16},
		{"workers", "echo", 4, 0, 16},
		{"workers, 2 in flight", "echo", 4, 2, 64},
		{"async", "async", 0, 0, 16},
		{"async with workers", "async", 3, 5, 32},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dev := newTestDevice(1)
			dev.mode, dev.workers, dev.maxInFlight = tt.mode, tt.workers, tt.maxInFlight
			h := newHarness(t, dev)
			g, err := testguest.Start(h.client, testguest.Options{QueueSize: uint16(tt.size)})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			r := g.Rings[0]
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			const n = 300
			pending := map[string][2]uint64{}
			check := func() {
				done, err := r.Wait(ctx)
				if err != nil {
					t.Fatalf("%d pending: %v", len(pending), err)
				}
				for _, c := range done {
					msg := c.Token.(string)
					bufs, ok := pending[msg]
					if !ok {
						t.Fatalf("completion for %q, not in flight", msg)
					}
					got, _ := g.Mem.Bytes(bufs[1], uint64(len(msg)))
					if string(got) != msg || c.Len != uint32(len(msg)) {
						t.Fatalf("echo %q: got %q, len %d", msg, got, c.Len)
					}
					g.Mem.Free(bufs[0])
					g.Mem.Free(bufs[1])
					delete(pending, msg)
				}
			}
			for i := 0; i < n; i++ {
				msg := fmt.Sprintf("request %03d", i)
				for r.Free() < 3 {
					check()
				}
				in, out := postEcho(t, g, r, msg)
				pending[msg] = [2]uint64{in, out}
			}
			for len(pending) > 0 {
				check()
			}
			if st := h.srv.Stats()[0]; st.Requests != n || st.Malformed != 0 || st.Failures != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

// TestWorkerCompletionNotHeldByInline: while the ring's goroutine serves a
// request itself (Inline) for a long time, a request a worker completes
// meanwhile reaches the driver at once, not when the round ends.
func TestWorkerCompletionNotHeldByInline(t *testing.T) {
	dev := newTestDevice(1)
	dev.mode, dev.workers, dev.gate = "gate", 4, make(chan struct{})
	_, g, r := startGuest(t, dev, testguest.Options{QueueSize: 64})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// Both chains are in the ring before the kick: the long one goes to
	// a worker (another chain waits), the short one to the ring's
	// goroutine, which holds it until the gate opens.
	postThenKick(t, g, r, "to a worker, at once", "gated")
	done, err := waitWithin(ctx, r, 3*time.Second)
	close(dev.gate)
	if err != nil {
		t.Fatalf("the worker's completion did not reach the driver while the ring's goroutine served the other request: %v", err)
	}
	if len(done) != 1 || done[0].Token != "to a worker, at once" {
		t.Fatalf("first completions %+v, want the worker's alone", done)
	}
	if done, err = r.Wait(ctx); err != nil || len(done) != 1 || done[0].Token != "gated" {
		t.Fatalf("then %+v, %v; want the gated request", done, err)
	}
}

// TestInliner: requests the handler's Inline picks are served on the ring's
// goroutine (worker 0) even while workers are busy and chains wait in the
// ring; the others go to workers.
func TestInliner(t *testing.T) {
	dev := newTestDevice(1)
	dev.mode, dev.workers = "inline", 4
	_, g, r := startGuest(t, dev, testguest.Options{QueueSize: 64})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const n = 400
	msgOf := func(i int) string {
		if i%2 == 1 {
			return fmt.Sprintf("long request %03d", i) // to a worker
		}
		return fmt.Sprintf("s%03d", i) // 4 bytes: inline
	}
	inFlight := 0
	for i := 0; i < n; i++ {
		msg := msgOf(i)
		for r.Free() < 3 {
			done, err := r.Wait(ctx)
			if err != nil {
				t.Fatal(err)
			}
			inFlight -= len(done)
		}
		postEcho(t, g, r, msg)
		inFlight++
	}
	for inFlight > 0 {
		done, err := r.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		inFlight -= len(done)
	}
	onWorkers := 0
	for i := 0; i < n; i++ {
		msg := msgOf(i)
		w, ok := dev.workerOf.Load(msg)
		switch {
		case !ok:
			t.Fatalf("%q was not served", msg)
		case i%2 == 0 && w.(int) != 0:
			t.Fatalf("%q (Inline: true) was served by worker %d, not the ring's goroutine", msg, w)
		case i%2 == 1 && w.(int) != 0:
			onWorkers++
		}
	}
	if onWorkers == 0 {
		t.Fatal("no request went to a worker: the ring was never busy, the test proves nothing")
	}
}

// TestOffloader: a request alone on an idle ring is served on the ring's
// goroutine, unless the handler's Offload sends it to a worker (a long
// request, during which the ring would take no new chains).
func TestOffloader(t *testing.T) {
	dev := newTestDevice(1)
	dev.mode, dev.workers = "offload", 2
	_, g, r := startGuest(t, dev, testguest.Options{QueueSize: 64})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i, msg := range []string{"s000", "long request 001", "s002", "long request 003"} {
		postEcho(t, g, r, msg)
		if done, err := r.Wait(ctx); err != nil || len(done) != 1 {
			t.Fatalf("%q: %+v, %v", msg, done, err)
		}
		w, ok := dev.workerOf.Load(msg)
		switch {
		case !ok:
			t.Fatalf("%q was not served", msg)
		case i%2 == 0 && w.(int) != 0:
			t.Fatalf("%q alone on an idle ring (Offload: false) was served by worker %d, not the ring's goroutine", msg, w)
		case i%2 == 1 && w.(int) == 0:
			t.Fatalf("%q (Offload: true) was served on the ring's goroutine", msg)
		}
	}
}

// TestLongRequestsLeaveAWorker: more long requests (Offload) than the
// queue has workers, then a short one: the short one gets a worker while
// the long ones wait for it, at most workers-1 long ones are in Handle at
// once, and every long one is served (those queued by workers that ended
// one), also when the ring is stopped at once (the stop waits for them).
// With every worker on a long request, the short one waited in the
// workers' queue until one ended (found in review, helper-134).
func TestLongRequestsLeaveAWorker(t *testing.T) {
	const workers = 3
	for _, stop := range []bool{false, true} {
		t.Run(fmt.Sprintf("stop=%v", stop), func(t *testing.T) {
			dev := newTestDevice(1)
			dev.mode, dev.workers, dev.gate = "long", workers, make(chan struct{})
			_, g, r := startGuest(t, dev, testguest.Options{QueueSize: 64})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			msgs := []string{}
			for i := range 2*workers + 1 {
				msgs = append(msgs, fmt.Sprintf("long request %03d", i))
			}
			msgs = append(msgs, "short")
			for _, msg := range msgs {
				postEcho(t, g, r, msg)
			}
			if stop {
				base, err := g.StopQueue(0)
				if err != nil {
					t.Fatal(err)
				}
				if used := r.UsedIdx(); uint32(used) != base || base != uint32(len(msgs)) {
					t.Fatalf("stopped at base %d, used %d, want %d", base, used, len(msgs))
				}
			}
			got := map[string]uint32{}
			for len(got) < len(msgs) {
				done, err := r.Wait(ctx)
				if err != nil {
					t.Fatalf("%d of %d requests completed: %v", len(got), len(msgs), err)
				}
				for _, d := range done {
					got[d.Token.(string)] = d.Len
				}
			}
			for _, msg := range msgs {
				if got[msg] != uint32(len(msg)) {
					t.Errorf("%q: %d bytes written, want %d (a long request that no short one passed writes nothing)", msg, got[msg], len(msg))
				}
			}
			if m := dev.longMost.Load(); m > workers-1 {
				t.Errorf("%d long requests in Handle at once, want at most %d", m, workers-1)
			}
		})
	}
}

// TestStopWaitsForAsync stops a ring whose requests are completed later by
// the device: the stop (GET_VRING_BASE) returns only once they are, and
// the base accounts for all of them.
func TestStopWaitsForAsync(t *testing.T) {
	dev := newTestDevice(1)
	dev.mode, dev.workers = "async", 2
	_, g, r := startGuest(t, dev, testguest.Options{QueueSize: 64})
	for i := 0; i < 20; i++ {
		postEcho(t, g, r, fmt.Sprintf("message %d", i))
	}
	base, err := g.StopQueue(0)
	if err != nil {
		t.Fatal(err)
	}
	if used := r.UsedIdx(); uint32(used) != base {
		t.Fatalf("base %d, used %d", base, used)
	}
}

// TestRequestPathNoAlloc: once warm, a request through the back-end —
// kick, ring goroutine, handler (inline or on a worker), used element,
// notification — allocates nothing, at depth 1 and with requests in
// flight. The driver side (testguest with direct descriptors and
// WaitInto) allocates nothing either, so the count is the back-end's.
func TestRequestPathNoAlloc(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates: no allocation count under -race")
	}
	for _, workers := range []int{0, 4} {
		for _, depth := range []int{1, 8} {
			t.Run(fmt.Sprintf("workers=%d/depth=%d", workers, depth), func(t *testing.T) {
				run := statusRig(t, workers, depth)
				run(100) // warm up: pools grow, goroutines start
				if a := testing.AllocsPerRun(200, func() { run(depth) }); a != 0 {
					t.Fatalf("%v allocations per batch of %d requests", a, depth)
				}
			})
		}
	}
}

// statusRig starts a back-end whose handler writes one status byte, and
// returns a function that runs n requests through it, depth at a time.
func statusRig(t testing.TB, workers, depth int) func(n int) {
	dev := newTestDevice(1)
	dev.mode, dev.workers = "status", workers
	h := newHarnessTB(t, dev)
	g, err := testguest.Start(h.client, testguest.Options{NoIndirect: true, QueueSize: 256})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	r := g.Rings[0]
	in, _ := g.Mem.Alloc(16, 16)
	out, _ := g.Mem.Alloc(1, 16)
	segs := []testguest.Segment{{Addr: in, Len: 16}, {Addr: out, Len: 1, Writable: true}}
	done := make([]testguest.Completion, 0, depth)
	ctx := context.Background()
	var mu sync.Mutex
	return func(n int) {
		mu.Lock()
		defer mu.Unlock()
		inflight := 0
		for i := 0; i < n || inflight > 0; {
			for inflight < depth && i < n {
				if _, err := r.Post(segs, nil); err != nil {
					t.Fatal(err)
				}
				inflight++
				i++
			}
			if _, err := r.Kick(); err != nil {
				t.Fatal(err)
			}
			var err error
			if done, err = r.WaitInto(ctx, done); err != nil {
				t.Fatal(err)
			}
			inflight -= len(done)
		}
	}
}

// BenchmarkRequest is one request through the back-end and back with a
// driver that allocates nothing: allocs/op is the back-end's own per
// request, kick included.
func BenchmarkRequest(b *testing.B) {
	for _, workers := range []int{0, 4} {
		for _, depth := range []int{1, 32} {
			b.Run(fmt.Sprintf("workers=%d/depth=%d", workers, depth), func(b *testing.B) {
				run := statusRig(b, workers, depth)
				run(1000)
				b.ReportAllocs()
				b.ResetTimer()
				run(b.N)
			})
		}
	}
}

// TestCompleteAfterTruncation: the front-end truncates guest memory while
// the device holds requests, and the device completes them afterwards from
// a goroutine of its own, without Protect: the completion (used element,
// index, notification) faults inside the engine, which fails the ring
// with one log line; the back-end keeps serving the connection.
func TestCompleteAfterTruncation(t *testing.T) {
	for _, workers := range []int{0, 4} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			dev := newTestDevice(1)
			dev.mode, dev.workers = "hold", workers
			h := newHarness(t, dev)
			g, err := testguest.Start(h.client, testguest.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			errFD := newEventfd(t)
			if err := h.client.SetVringErr(0, errFD); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 3; i++ {
				postEcho(t, g, g.Rings[0], fmt.Sprintf("held %d", i))
			}
			var reqs []*backend.Request
			for len(reqs) < 3 {
				select {
				case r := <-dev.held:
					reqs = append(reqs, r)
				case <-time.After(5 * time.Second):
					t.Fatalf("%d requests reached the device", len(reqs))
				}
			}
			if err := g.Mem.File().Truncate(0); err != nil {
				t.Fatal(err)
			}
			for _, r := range reqs {
				r.Complete(1)
			}
			waitEventfd(t, errFD)
			logContains(t, h, "memory fault")
			if n := strings.Count(h.logs.String(), "memory fault"); n != 1 {
				t.Fatalf("%d log lines about the fault:\n%s", n, h.logs.String())
			}
			if st := h.srv.Stats()[0]; st.Failures != 1 || st.Running {
				t.Fatalf("stats %+v", st)
			}
			if _, err := h.client.GetFeatures(); err != nil {
				t.Fatalf("back-end unusable after the fault: %v", err)
			}
		})
	}
}

// raceEnabled is set in builds with the race detector (race_test.go).
var raceEnabled bool

// A fault in dispatch, between take and the hand-off to the handler or a
// worker (its look at the pending chains, an Inliner's at the request),
// left that request in flight with no owner: finish waited for it for
// ever, the queue never reported its failure and Serve never returned
// (make race, devices/fs TestTruncatedGuestMemory/workers=8, under load).
// Fixed: finish drops it, as handle drops a request whose handler faulted.
func TestFaultBeforeHandOffEndsTheRing(t *testing.T) {
	dev := newTestDevice(1)
	dev.mode, dev.workers = "inline-panic", 4
	h, g, r := startGuest(t, dev, testguest.Options{QueueSize: 64})
	// Two chains made available at once: with one pending behind the
	// first, dispatch asks the Inliner.
	r.HoldAvail()
	postEcho(t, g, r, "one")
	postEcho(t, g, r, "two")
	r.ReleaseAvail()
	if err := r.KickAlways(); err != nil {
		t.Fatal(err)
	}
	backendtest.WaitFailed(t, h.srv, 0)
	g.Close()
	h.serveResult()
}
