package backend_test

// From review (helper sdkreview): Producer.Produce "returns nil once ctx is
// done, or an error that fails the ring". A producer that returns nil
// early (its source reached its end: a device author's natural "nothing
// more to produce") is taken as a ring that failed on its own (ctx is not
// done) with a nil error: the back-end logs "queue failed ... error=<nil>"
// at ERROR and calls RingFailed(q, nil). pluginsdk's ringFailed then calls
// err.Error() on that nil: a nil-pointer panic on the ring's goroutine,
// outside any recover, which ends the plugin process with a stack inside
// pluginsdk (pluginsdk/sdkreview_panic_test.go shows that half).

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// doneProducer has nothing to produce and says so by returning.
type doneProducer struct{}

func (doneProducer) Produce(context.Context, *backend.Buffers) error { return nil }

func TestProducerReturningNilIsNoNilFailure(t *testing.T) {
	dev := newTestDevice(1)
	dev.mode, dev.producer = "produce", doneProducer{}
	var mu sync.Mutex
	var calls []error
	h := newHarness(t, dev, func(s *backend.Server) {
		s.RingFailed = func(q int, err error) {
			mu.Lock()
			calls = append(calls, err)
			mu.Unlock()
		}
	})
	g, err := testguest.Start(h.client, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	for _, err := range calls {
		if err == nil {
			t.Fatalf("RingFailed called with a nil error (pluginsdk's ringFailed dereferences it: the plugin panics); calls %v", calls)
		}
	}
}
