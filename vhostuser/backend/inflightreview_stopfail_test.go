package backend_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// stopFailDevice echoes, except that a request reading "slow-panic" waits
// in Handle until release is closed and then panics (a device bug that
// shows while a request is long in flight), and stopping is closed once a
// ring's context ends (the front-end's stop).
type stopFailDevice struct {
	*testDevice
	entered  chan struct{}
	release  chan struct{}
	stopping chan struct{}
	once     sync.Once
}

func (d *stopFailDevice) Queue(ctx context.Context, idx int) (backend.QueueConfig, error) {
	context.AfterFunc(ctx, func() { d.once.Do(func() { close(d.stopping) }) })
	return backend.QueueConfig{Handler: stopFailHandler{d}, Workers: 2}, nil
}

type stopFailHandler struct{ d *stopFailDevice }

func (h stopFailHandler) Handle(req *backend.Request) {
	if req.Chain().ReadableLen() == uint64(len("slow-panic")) {
		close(h.d.entered)
		<-h.d.release
		panic("device bug while the ring stops")
	}
	echoHandler{}.Handle(req)
}

// TestRingFailingWhileStoppingKeepsInflight: a ring whose handler
// fails (a panic: the request is dropped, still marked in the inflight
// region) while the front-end stops the ring (GET_VRING_BASE waits for
// the requests in flight) is taken for a ring stopped cleanly: the worker
// goroutine sees its context cancelled and records no failure, so
// stopRing forgets the part (version 0) with the dropped request still
// marked. The next back-end (or the same ring started again at the used
// index, as QEMU does after a stop) starts the part afresh at the used
// index: the dropped request A is never completed, and B, completed
// before the stop, is taken from the available ring again and completed
// twice. Had the ring failed a moment before the stop, the part would
// have been kept and A resubmitted.
func TestRingFailingWhileStoppingKeepsInflight(t *testing.T) {
	dev := &stopFailDevice{testDevice: newTestDevice(1), entered: make(chan struct{}), release: make(chan struct{}), stopping: make(chan struct{})}
	logs := &syncbuf.Buffer{}
	srv, err := backend.NewServer(dev, newLogger(logs))
	if err != nil {
		t.Fatal(err)
	}
	path := t.TempDir() + "/a.sock"
	backendtest.Serve(t, srv, path)
	g, err := testguest.Dial(path, testguest.Options{Inflight: true, QueueSize: 16, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	r := g.Rings[0]
	postThenKick(t, g, r, "slow-panic", "B")
	<-dev.entered
	got, err := waitWithin(context.Background(), r, 5*time.Second)
	if err != nil || len(got) != 1 || got[0].Token != "B" {
		t.Fatalf("B: %v %v", got, err)
	}
	// The front-end stops the ring (a VM stop, a queue stop): the
	// back-end waits for A; A's handler then fails.
	base := make(chan error, 1)
	go func() {
		_, err := g.StopQueue(0)
		base <- err
	}()
	<-dev.stopping
	time.Sleep(50 * time.Millisecond)
	close(dev.release)
	if err := <-base; err != nil {
		t.Fatalf("GET_VRING_BASE: %v", err)
	}

	// The plugin is replaced; the new one gets the region and the ring
	// at the used index in guest memory (1).
	dev2 := newTestDevice(1)
	logs2 := &syncbuf.Buffer{}
	srv2, err := backend.NewServer(dev2, newLogger(logs2))
	if err != nil {
		t.Fatal(err)
	}
	path2 := t.TempDir() + "/b.sock"
	backendtest.Serve(t, srv2, path2)
	c2, err := frontend.Dial(path2)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Reconnect(c2); err != nil {
		t.Fatal(err)
	}
	var all []testguest.Completion
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		all = append(all, r.Reap()...)
		time.Sleep(20 * time.Millisecond)
	}
	var gotA, twice bool
	for _, c := range all {
		switch c.Token {
		case "slow-panic":
			gotA = true
		default:
			twice = true
		}
	}
	if !gotA || twice {
		t.Logf("first back-end:\n%s\nsecond back-end:\n%s", logs.String(), logs2.String())
		t.Fatalf("after the restart: completions %+v (used index %d, avail %d): the dropped request was resubmitted %v, and a completed one completed again %v; stats %+v",
			all, r.UsedIdx(), r.AvailIdx(), gotA, twice, srv2.Stats()[0])
	}
}
