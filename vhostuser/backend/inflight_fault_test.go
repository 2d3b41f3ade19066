package backend_test

import (
	"context"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// TestInflightTruncatedFailsRing: a front-end truncates the inflight
// memfd it holds while a ring runs. The next chain the ring takes faults in
// tracker.mark, which engine.take runs with e.mu held and no defer: the
// fault is recovered by Protect(e.serve), then e.fail locks e.mu again and
// the ring goroutine deadlocks. The ring must instead fail cleanly (error
// eventfd signalled) and GET_VRING_BASE must answer.
func TestInflightTruncatedFailsRing(t *testing.T) {
	dev := newTestDevice(1)
	h, g, r := startGuest(t, dev, testguest.Options{Inflight: true, UnsealedInflight: true, QueueSize: 64, MemSize: 4 << 20})
	errFD := newEventfd(t)
	if err := h.client.SetVringErr(0, errFD); err != nil {
		t.Fatal(err)
	}
	echoOnce(t, g, r, "before truncation")
	if err := g.Inflight.File.Truncate(0); err != nil {
		t.Fatal(err)
	}
	postEcho(t, g, r, "after truncation")
	waitEventfd(t, errFD) // ring must fail on the fault

	done := make(chan error, 1)
	go func() { _, err := g.StopQueue(0); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("GET_VRING_BASE: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("GET_VRING_BASE did not answer: ring goroutine stuck")
	}
}

// untaker takes one request, waits until the test has truncated the
// inflight region, and gives the request back.
type untaker struct{ taken, truncated chan struct{} }

func (u untaker) Produce(ctx context.Context, b *backend.Buffers) error {
	for {
		r, err := b.Take()
		if err != nil {
			return err
		}
		if r != nil {
			close(u.taken)
			<-u.truncated
			return b.Untake([]*backend.Request{r})
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Millisecond):
		}
	}
}

// TestInflightTruncatedUntake: the same fault when a producer gives a
// request back (Untake unmarks it in the region): an error that fails the
// ring cleanly, not a crash of the plugin. (From review.)
func TestInflightTruncatedUntake(t *testing.T) {
	dev := newTestDevice(1)
	u := untaker{taken: make(chan struct{}), truncated: make(chan struct{})}
	dev.mode, dev.producer = "produce", u
	h, g, r := startGuest(t, dev, testguest.Options{Inflight: true, UnsealedInflight: true, QueueSize: 64, MemSize: 4 << 20})
	errFD := newEventfd(t)
	if err := h.client.SetVringErr(0, errFD); err != nil {
		t.Fatal(err)
	}
	postEcho(t, g, r, "taken, then given back")
	select {
	case <-u.taken:
	case <-time.After(5 * time.Second):
		t.Fatal("the producer took nothing")
	}
	if err := g.Inflight.File.Truncate(0); err != nil {
		t.Fatal(err)
	}
	close(u.truncated)
	waitEventfd(t, errFD) // the ring fails on the fault
	if _, err := g.StopQueue(0); err != nil {
		t.Fatalf("GET_VRING_BASE: %v", err)
	}
}
