package backend_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// raceDev (found in review, helper-63): 'W' goes to a worker, 'G' is Inline and gated. Inline(G) waits
// until W's completion has loaded serving (hook "added", in pushLocked);
// the hook waits until G's Handle began (past handleHere's workerDone look).
type raceDev struct {
	*testDevice
	inlineCalled, workerAdded, gateEntered, gate chan struct{}
	armed                                        atomic.Bool
}

func (d *raceDev) Queue(context.Context, int) (backend.QueueConfig, error) {
	return backend.QueueConfig{Handler: d, Workers: 4}, nil
}

func (d *raceDev) Inline(req *backend.Request) bool {
	var b [1]byte
	if req.Chain().ReadableLen() != 1 || req.Chain().ReadFull(b[:]) != nil || b[0] != 'G' {
		return false
	}
	close(d.inlineCalled)
	<-d.workerAdded
	return true
}

func (d *raceDev) Handle(req *backend.Request) {
	if req.Worker() == 0 {
		close(d.gateEntered)
		<-d.gate
	} else {
		<-d.inlineCalled
		d.armed.Store(true)
	}
	n, _ := req.Chain().Write([]byte{'x'})
	req.Complete(uint32(n))
}

func (d *raceDev) hook(point string) {
	if point == "added" && d.armed.CompareAndSwap(true, false) {
		close(d.workerAdded)
		select { // a fixed engine may wait for mu, held here
		case <-d.gateEntered:
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// TestWorkerCompletionRacesServing: a worker's completion that loads
// serving just before the ring goroutine starts serving a request itself,
// and notes workerDone just after the ring goroutine looked at it, must
// still reach the driver while that request is served.
func TestWorkerCompletionRacesServing(t *testing.T) {
	d := &raceDev{testDevice: newTestDevice(1), inlineCalled: make(chan struct{}), workerAdded: make(chan struct{}),
		gateEntered: make(chan struct{}), gate: make(chan struct{})}
	srv, err := backend.NewServer(d, newLogger(&syncbuf.Buffer{}))
	if err != nil {
		t.Fatal(err)
	}
	backend.SetTestHook(srv, d.hook)
	fa, fb, err := vhostuser.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Serve(ctx, fa)
	client, err := frontend.NewFromFile(fb)
	if err != nil {
		t.Fatal(err)
	}
	g, err := testguest.Start(client, testguest.Options{Inflight: true, QueueSize: 64, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	r := g.Rings[0]
	postThenKick(t, g, r, "W", "G")
	done, err := waitWithin(ctx, r, 3*time.Second)
	close(d.gate)
	if err != nil || len(done) != 1 || done[0].Token != "W" {
		t.Fatalf("worker's completion while the ring goroutine served G: %+v, %v", done, err)
	}
}
