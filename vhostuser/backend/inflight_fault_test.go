package backend_test

import (
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
)

// TestInflightTruncatedFailsRing: a front-end truncates the inflight
// memfd it holds while a ring runs. The next chain the ring takes faults in
// tracker.mark, which engine.take runs with e.mu held and no defer: the
// fault is recovered by Protect(e.serve), then e.fail locks e.mu again and
// the ring goroutine deadlocks. The ring must instead fail cleanly (error
// eventfd signalled) and GET_VRING_BASE must answer.
func TestInflightTruncatedFailsRing(t *testing.T) {
	dev := newTestDevice(1)
	h, g, r := startGuest(t, dev, testguest.Options{Inflight: true, QueueSize: 64, MemSize: 4 << 20})
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
