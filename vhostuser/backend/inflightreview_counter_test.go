package backend

import (
	"encoding/binary"
	"math"
	"slices"
	"testing"
)

// TestTrackerCounterWrap: a compromised back-end leaves an entry in
// flight with the counter 2^64-1 (threat: the old plugin wrote the
// region). recover sets the next counter to that plus one, which wraps to
// 0: the new back-end marks its own requests with counters below the
// recovered one, and a second crash resubmits them before it, out of the
// order the driver made them available. A clean back-end never comes near
// 2^63 requests; a counter there is forged.
func TestTrackerCounterWrap(t *testing.T) {
	const num = 8
	region := regionBytes(t, InflightQueueBytes(num))
	tr, _, err := newTracker(region, num, num, 0)
	if err != nil {
		t.Fatal(err)
	}
	tr.mark(3)
	// The compromised back-end rewrites head 3's counter.
	binary.LittleEndian.PutUint64(region[inflightHeaderSize+3*inflightEntrySize+inflightOffCounter:], math.MaxUint64)

	tr2, heads, err := newTracker(region, num, num, 0)
	if err != nil {
		return // refused as corrupt: fine
	}
	if !slices.Equal(heads, []uint16{3}) {
		t.Fatalf("first recovery: %v", heads)
	}
	// The new back-end resubmits 3 (its mark and counter kept) and takes
	// a new chain, 5, made available after it.
	tr2.mark(5)
	_, heads, err = newTracker(region, num, num, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(heads, []uint16{3, 5}) {
		t.Fatalf("second recovery resubmits %v, want [3 5]: the next counter wrapped to %d after a recovered counter of 2^64-1",
			heads, tr2.counter-1)
	}
}
