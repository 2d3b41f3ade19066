package pluginhost

import (
	"context"
	"runtime"
	"testing"
	"time"
)

// TestBrokerFloodDoesNotGrowHost: go-plugin's client opens the
// broker stream (plugin.GRPCBroker/StartStream) to every plugin, and its
// GRPCBroker.Run keeps, for each knock with a new service id, a pending
// entry holding the message in serverStreams for as long as the plugin
// lives (only its own Accept deletes one). krun-core uses no broker, yet a
// compromised plugin can send knocks for any of 2^32 ids, each with up to
// MaxReplyBytes of address, and make the core hold that memory: the
// plugin's RLIMIT_DATA does not bound the core. 400 knocks of 256 KiB
// must not leave ~100 MiB in the core's heap.
//
// From review, helper-95; fixed: the host refuses go-plugin's broker stream (refuseBroker).
func TestBrokerFloodDoesNotGrowHost(t *testing.T) {
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	p, err := Launch(testConfig(t, "brokerflood"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()

	// A host that refuses the broker stream never lets the plugin send:
	// after 3 s the heap is measured all the same.
	deadline := time.Now().Add(3 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := p.Stats(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if c["broker_sent"] >= 400 {
			break
		}
		if time.Now().After(deadline) {
			t.Logf("plugin sent %d of 400 knocks", c["broker_sent"])
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // the host's broker takes the last ones
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("host heap grew by %d MiB while the plugin lives", grew>>20)
	if grew > 32<<20 {
		t.Errorf("a plugin's broker knocks made the core hold %d MiB (400 knocks of 256 KiB, never freed while the plugin lives); the core uses no broker and should refuse the stream", grew>>20)
	}
}
