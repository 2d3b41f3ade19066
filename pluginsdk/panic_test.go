package pluginsdk

// From review (helper sdkreview): the SDK turns a panic in Configure into an
// error and one in Handle into a failed ring (Health FAILED, one line), but
// a panic in the optional extras it calls from its RPCs, Counters (Stats)
// and Check (Health), is not recovered: gRPC does not recover handler
// panics, so the plugin process dies. A Stats is what `kill -USR1` of
// krun-core serve asks for: a diagnostic that ends the device (serve exits
// 1 for a Restartable() false device, and a restart replays the requests
// in flight otherwise), where Stats should fail alone.

import (
	"context"
	"testing"

	"github.com/krun-core/krun-core/proto/pluginpb"
)

type panicCounters struct{ fakeDevice }

func (*panicCounters) Counters() map[string]uint64 {
	var m map[string]uint64
	m["requests"]++ // a plugin bug: assignment to entry in nil map
	return m
}

func TestPanicInCountersFailsStatsOnly(t *testing.T) {
	s, _ := newTestServer(&devPlugin{dev: &panicCounters{fakeDevice{cfg: []byte{1, 2, 3, 4}}}})
	if _, err := s.Configure(context.Background(), &pluginpb.ConfigureRequest{SandboxOff: true}); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if p := recover(); p != nil {
			t.Fatalf("Stats panicked (under gRPC: the plugin process exits): %v", p)
		}
	}()
	if _, err := s.Stats(context.Background(), &pluginpb.StatsRequest{}); err == nil {
		t.Error("Stats of a device whose Counters panics: no error")
	}
	// The device goes on: Health still says so.
	r, err := s.Health(context.Background(), &pluginpb.HealthRequest{})
	if err != nil || r.State != pluginpb.HealthResponse_STATE_CONFIGURED {
		t.Errorf("Health %v, %v after a failed Stats", r, err)
	}
}

// TestRingFailedNilError: the back-end calls RingFailed(q, nil)
// for a Producer that returned nil before its ring stopped
// (vhostuser/backend/sdkreview_producer_nil_test.go); ringFailed runs on the
// ring's goroutine, where its panic ends the plugin.
func TestRingFailedNilError(t *testing.T) {
	s, _ := newTestServer(&fakePlugin{})
	s.state = pluginpb.HealthResponse_STATE_SERVING
	defer func() {
		if p := recover(); p != nil {
			t.Fatalf("ringFailed(0, nil) panicked (on the ring goroutine: the plugin exits): %v", p)
		}
	}()
	s.ringFailed(0, nil)
}
