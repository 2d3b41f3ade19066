package backend_test

import (
	"errors"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// TestStuckWorkerReported: a device whose Handle never returns keeps the
// ring's worker, and so the session, from ending when the front-end goes
// away: a listening back-end (krun-core serve) took no next front-end, for
// good, while its plugin's Health said SERVING. After StuckWorkerTimeout
// the server now calls RingFailed with ErrWorkerStuck (pluginsdk reports
// the plugin failed; serve restarts it), and the session ends once the
// request does.
func TestStuckWorkerReported(t *testing.T) {
	dev := newTestDevice(1)
	dev.mode, dev.workers, dev.gate = "gate", 2, make(chan struct{})
	failed := make(chan error, 4)
	h := newHarness(t, dev, func(s *backend.Server) {
		s.StuckWorkerTimeout = 300 * time.Millisecond
		s.RingFailed = func(q int, err error) { failed <- err }
	})
	g, err := testguest.Start(h.client, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	postThenKick(t, g, g.Rings[0], "stuck") // held by the gate: never completes
	time.Sleep(50 * time.Millisecond)
	g.Close()
	h.client.Close() // the front-end leaves
	select {
	case err := <-failed:
		if !errors.Is(err, backend.ErrWorkerStuck) {
			t.Fatalf("RingFailed got %v, want ErrWorkerStuck", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("RingFailed was not called for a worker stuck in Handle")
	}
	logContains(t, h, "queue worker has not stopped")
	close(dev.gate) // the request ends; so does the session
	if err := h.serveResult(); err != nil {
		t.Logf("Serve: %v", err)
	}
}
