package mmio

import (
	"errors"
	"fmt"
	"testing"

	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// setupFailer is a back-end that takes the first ok ring set-ups and fails
// the next one (a new plugin that dies, or is compromised, half-way
// through Resume).
type setupFailer struct {
	*fakeBackend
	ok int
}

func (b *setupFailer) SetupQueue(q frontend.QueueSetup, protocol bool) error {
	if b.ok == 0 {
		return fmt.Errorf("SET_VRING_KICK: %w", frontend.ErrDisconnected)
	}
	b.ok--
	return b.fakeBackend.SetupQueue(q, protocol)
}

// TestFailedResumeAbandonsTheNewBackend (from review): a Resume that fails
// after it handed rings to the new back-end left that back-end serving
// them, unconfirmed, while the device stayed suspended: a queue the driver
// stops (or resets) while suspended is stopped without asking any
// back-end, and the driver reuses the ring's memory at once, so the
// back-end given the ring must be gone before the device lock is let go
// (Config.Abandon), as for a back-end that did not confirm a stop. Only
// the caller's later clean-up (the core's dropPlugin, after Resume
// returned and the vCPUs could run) killed it.
func TestFailedResumeAbandonsTheNewBackend(t *testing.T) {
	var reasons []error
	r := newRig(t, func(c *Config) {
		c.Recover = func(error) bool { return true }
		c.Abandon = func(why error) error {
			reasons = append(reasons, why)
			return nil
		}
	})
	st := r.negotiate(featureVersion1)
	r.wr(RegStatus, st|StatusDriverOK)
	r.setupQueue(0, 128, 0x10000, 0x11000, 0x12000)
	r.setupQueue(1, 128, 0x20000, 0x21000, 0x22000)
	r.d.Suspend()
	if len(reasons) != 1 || !errors.Is(reasons[0], ErrReplaced) {
		t.Fatalf("Suspend's Abandon: %v", reasons)
	}

	nb := &setupFailer{fakeBackend: &fakeBackend{config: append([]byte(nil), r.b.config...)}, ok: 1}
	err := r.d.Resume(nb, func(uint64) (uint16, error) { return 0, nil })
	if err == nil {
		t.Fatal("Resume succeeded with a back-end that failed ring 1's set-up")
	}
	if len(nb.queues) != 1 {
		t.Fatalf("the new back-end got %d rings, want 1 (the test's premise)", len(nb.queues))
	}
	if !r.d.Suspended() {
		t.Fatal("device not suspended after the failed Resume")
	}
	if len(reasons) != 2 {
		t.Fatalf("the back-end that Resume handed ring 0 to was not abandoned before Resume returned (Abandon calls: %v)", reasons)
	}

	// A successful Resume abandons nothing.
	reasons = nil
	ok := &fakeBackend{config: append([]byte(nil), r.b.config...)}
	if err := r.d.Resume(ok, func(uint64) (uint16, error) { return 0, nil }); err != nil {
		t.Fatal(err)
	}
	if len(reasons) != 0 {
		t.Fatalf("a successful Resume abandoned: %v", reasons)
	}
}
