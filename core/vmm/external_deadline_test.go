package vmm

import (
	"strings"
	"testing"
	"time"
)

// TestNegotiationPastItsDeadline: connectExternal and reattachExternal gave
// the vhost-user client time.Until(deadline) for the negotiation. When the
// deadline passed between the dial (which refuses a deadline already past)
// and the first request (a loaded machine), that was a timeout of 0 or
// less, which the client takes for "no limit": a back-end that accepts and
// never answers then held the VM's start, or a reconnection, for ever
// instead of failing it at the limit. What is left is now checked first.
func TestNegotiationPastItsDeadline(t *testing.T) {
	v := externalSpec(t, "type=blk,socket=/nonexistent.sock")
	for _, past := range []time.Duration{0, time.Nanosecond, time.Second} {
		left, err := timeLeft(v, 300*time.Millisecond, time.Now().Add(-past))
		if err == nil || !strings.Contains(err.Error(), "did not answer the negotiation within 300ms") {
			t.Errorf("deadline %v ago: %v, %v; want the negotiation's timeout, not a client without a limit", past, left, err)
		}
	}
	if left, err := timeLeft(v, time.Second, time.Now().Add(time.Second)); err != nil || left <= 0 || left > time.Second {
		t.Errorf("deadline a second away: %v, %v", left, err)
	}
}
