package backend_test

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// TestForgedInflightHeadsNotReplayed: the previous back-end was
// compromised before it died and marked heads in flight in the inflight
// region that the driver never made available (threat: the old plugin
// wrote anything into the region). Every head a clean back-end left in
// flight was taken from the available ring, so there can be at most
// avail_idx - used_idx of them; the new back-end resubmitted all three
// forged heads anyway, on a ring with nothing outstanding: it read
// descriptors the guest had not handed over (free ones, which a driver
// rewrites at will), completed them to the driver (used index 1 -> 4,
// with used elements for heads not in flight), and positioned its next
// available index past the driver's (used + 3 > avail), so the ring
// then failed as broken by the guest.
func TestForgedInflightHeadsNotReplayed(t *testing.T) {
	const size = 16
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	g, err := testguest.Start(h.client, testguest.Options{Inflight: true, QueueSize: size, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	r := g.Rings[0]
	echoOnce(t, g, r, "hello")
	if r.UsedIdx() != 1 || r.AvailIdx() != 1 {
		t.Fatalf("used %d avail %d", r.UsedIdx(), r.AvailIdx())
	}
	// The back-end dies (its session ends: the part is forgotten, as at
	// any clean stop) ...
	h.cancel()
	h.serveResult()
	// ... having written the region first: queue 0's part initialized,
	// used_idx in line with guest memory, heads 5, 6, 7 marked.
	part := make([]byte, backend.InflightQueueBytes(size))
	binary.LittleEndian.PutUint16(part[8:], 1)     // version
	binary.LittleEndian.PutUint16(part[10:], size) // desc_num
	binary.LittleEndian.PutUint16(part[14:], 1)    // used_idx
	for i, head := range []int{5, 6, 7} {
		e := 16 + 16*head
		part[e] = 1
		binary.LittleEndian.PutUint64(part[e+8:], uint64(i))
	}
	if _, err := g.Inflight.File.WriteAt(part, int64(g.Inflight.MmapOffset)); err != nil {
		t.Fatal(err)
	}

	dev2 := newTestDevice(1)
	h2 := newHarness(t, dev2)
	if err := g.Reconnect(h2.client); err != nil {
		return // the new back-end refused the region: fine
	}
	time.Sleep(200 * time.Millisecond)
	st := h2.srv.Stats()[0]
	if u := r.UsedIdx(); u != 1 || st.Resubmitted != 0 {
		t.Fatalf("the new back-end resubmitted %d heads the driver never made available (avail %d): used index %d, want 1; stats %+v",
			st.Resubmitted, r.AvailIdx(), u, st)
	}
	if _, got := echoOnce(t, g, r, "after"); string(got) != "after" {
		t.Fatalf("after the restart: %q", got)
	}
}
